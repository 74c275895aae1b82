"""The ``orchestrator`` command.

Every command that takes a job takes it the Hydra way (``job=NAME group=option key=value``). Before
a run directory exists, the CLI composes every run's config, converts it to the typed schema, checks
it against this machine and prepares the data; bad input ends here, in a second or two, as one line
on stderr and exit status 2. A single run then goes through Hydra's ``run_job`` with that same
config; sweeps and Hydra's own flags (``--cfg``, ``--help``) through Hydra's ``main``.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Any, Callable

from orchestrator import __version__
from orchestrator.cluster import commands as cluster_commands
from orchestrator.config.checks import check_environment
from orchestrator.config.compose import CONF_DIR, compose, to_config, without_hydra
from orchestrator.config.hydra_compat import args_parser, parse_overrides, run_single, sweep_points
from orchestrator.config.schema import Config
from orchestrator.config.store import register
from orchestrator.errors import UserError
from orchestrator.experiments.estimate import estimate_command as run_estimate
from orchestrator.experiments.scale import scale_command as run_scale
from orchestrator.experiments.verify import verify_command as run_verify
from orchestrator.launch import run_job
from orchestrator.launch.prepared import PreparedJob, prepare_composed
from orchestrator.logs import configure_logging
from orchestrator.report import write_report
from orchestrator.rundir import REPORT_FILE, RunDir
from orchestrator.search.command import search_command as run_search

USAGE = f"""orchestrator {__version__}: distributed PyTorch training from one Hydra config

usage: orchestrator <command> [job=NAME] [group=option ...] [key=value ...]

commands:
  train    train a job                    orchestrator train job=gpt_tiny_cpu trainer.max_steps=50
                                          orchestrator train --help      (config groups and options)
                                          orchestrator train --cfg job   (print the composed config)
                                          orchestrator train -m optim.lr=1e-3,3e-4   (one run per point)
  verify   the job under several strategies, losses and gradient norms side by side
                                          orchestrator verify verify.strategies=[ddp,fsdp2,zero1,zero2,zero3]
  estimate per-rank memory of the job under every strategy, and the world size it needs
                                          orchestrator estimate job=llama3_70b_zero3 estimate.world_sizes=[8,64] [--json]
  search   trials of the job over a search space, concurrently on Ray; ASHA stops the worse early
                                          orchestrator search job=gpt_tiny_cpu search.num_samples=8 'optim.lr=tag(log,interval(1e-4,1e-2))'
  scale    throughput, scaling efficiency and memory across worker counts x strategies (one run per point)
                                          orchestrator scale job=gpt_tiny_cpu scale.workers=[1,2] scale.strategies=[ddp,zero2]
  report   one HTML file (no network needed) of runs' curves, throughput, MFU, memory and per-rank resources
                                          orchestrator report outputs/default/2026-11-23_11-58-30 [RUN_DIR ...] [-o report.html]
  export   a checkpoint of any strategy as a transformers model directory (safetensors, config.json, tokenizer)
                                          orchestrator export outputs/default/2026-11-23_11-58-30 -o gpt-export [--dtype bf16]
  cluster  a token-authenticated Ray cluster of several nodes on this machine
                                          orchestrator cluster up --nodes 3 | status | down
  submit   the job to a Ray cluster (Job Submission API); -m submits one job per point
                                          orchestrator submit cluster=local job=gpt_tiny_cpu [--follow]
  jobs     the cluster's jobs              orchestrator jobs list | status ID | logs ID [--follow] | stop ID
"""

_HYDRA_INFO_FLAGS = ("help", "hydra_help", "info", "shell_completion")


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    if args[0] == "--version":
        print(__version__)
        return 0
    command = COMMANDS.get(args[0])
    if command is None:
        public = [name for name in COMMANDS if name != "run-submitted"]
        print(f"error: unknown command {args[0]!r}; commands: {', '.join(public)}", file=sys.stderr)
        return 2
    try:
        return command(args[1:])
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def train_command(args: list[str]) -> int:
    """``orchestrator train``: Hydra's command line, checked first, then run (Hydra's main for sweeps and flags)."""
    parsed = args_parser().parse_args(args)
    if _plain_run(parsed):
        from hydra.types import RunMode

        cfg = compose(parsed.overrides, with_hydra=True)
        if cfg.hydra.mode in (None, RunMode.RUN):  # not a config that sets hydra.mode=MULTIRUN
            return _train_one(cfg)
    _refuse_search_sweeper(parsed.overrides)
    if parsed.multirun:  # a sweep's runs share a W&B group
        extra = sweep_overrides(parsed.overrides, job_type="sweep")
        args, parsed.overrides = [*args, *extra], [*parsed.overrides, *extra]
    if not any(getattr(parsed, flag) for flag in _HYDRA_INFO_FLAGS):
        for overrides in sweep_points(parsed.overrides) if parsed.multirun else [parsed.overrides]:
            _precheck(overrides, prepare=parsed.cfg is None)
    return _run_hydra(args)


def sweep_overrides(overrides: list[str], *, job_type: str) -> list[str]:
    """``logger.group`` (one name for the sweep) and ``logger.job_type``, unless the overrides set them."""
    from datetime import datetime

    job = next((o.partition("=")[2] for o in overrides if o.partition("=")[0].lstrip("+~") == "job"), "default")
    extra = {"logger.group": f"{job}-{job_type}-{datetime.now():%Y%m%d-%H%M%S}", "logger.job_type": job_type}
    return [
        f"{key}={value}"
        for key, value in extra.items()
        if not any(o.partition("=")[0].lstrip("+~") == key for o in overrides)
    ]


def _precheck(overrides: list[str], *, prepare: bool) -> Config:
    """Checks one run of the command line against this machine; with ``prepare``, prepares it too (its data,
    its model on the meta device, the checkpoints it names)."""
    cfg = compose(overrides)
    if prepare:
        return prepare_composed(cfg, job_name=None).config
    config = to_config(cfg)
    check_environment(config)
    return config


def _plain_run(parsed: Any) -> bool:
    """One run of the packaged config, no Hydra flag but the overrides."""
    flags = (
        *_HYDRA_INFO_FLAGS,
        "multirun",
        "cfg",
        "package",
        "config_path",
        "config_name",
        "config_dir",
        "experimental_rerun",
    )
    return not any(getattr(parsed, flag) for flag in flags)


def _train_one(cfg: Any) -> int:
    """One run through Hydra's ``run_job``, with the config the checks use (``cfg``, hydra node included).

    Hydra's ``main`` would compose the config twice more (for the run mode, then for the run): ~0.5 s
    of every start-up. ``run_job`` does the rest of what ``main`` does for a single run: the run dir,
    ``HydraConfig``, job logging, callbacks.
    """
    job = prepare_composed(without_hydra(cfg), job_name=cfg.hydra.runtime.choices.get("job"))
    failed_runs: list[str] = []
    run_single(cfg, _task(failed_runs, prepared=job))
    return 1 if failed_runs else 0


def _refuse_search_sweeper(overrides: list[str]) -> None:
    """``hydra/sweeper=optuna`` (hydra-optuna-sweeper) is retired: ``orchestrator search`` replaced it."""
    for override in parse_overrides(overrides):
        if override.key_or_group == "hydra/sweeper" and override.value() != "basic":
            raise UserError(
                f"hydra/sweeper={override.value()}: the Optuna sweeper is retired; search with "
                f"`orchestrator search` (docs/search.md), which runs trials concurrently on Ray"
            )


def _run_hydra(args: list[str]) -> int:
    import hydra

    register()
    failed_runs: list[str] = []
    saved_argv = sys.argv
    sys.argv = ["orchestrator train", *args]
    try:
        hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")(_task(failed_runs))()
    finally:
        sys.argv = saved_argv
    return 1 if failed_runs else 0


def _task(failed_runs: list[str], *, prepared: PreparedJob | None = None) -> Callable[[Any], None]:
    """``_train_task`` for Hydra, appending the run dir of each run that fails to ``failed_runs``
    (Hydra passes the task only the config: the failures of a sweep's runs need this channel of their own).
    ``prepared``: a single run's job, prepared before Hydra made its run dir."""
    task = functools.partial(_train_task, failed_runs=failed_runs, prepared=prepared)
    return functools.update_wrapper(task, _train_task)  # Hydra names the job after the wrapped function's module


def _train_task(cfg: Any, *, failed_runs: list[str], prepared: PreparedJob | None) -> None:
    """Hydra's task function: one run, in the run dir Hydra made; a run that fails is added to ``failed_runs``."""
    from hydra.core.hydra_config import HydraConfig

    configure_logging()
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    try:
        job = prepared or prepare_composed(cfg, job_name=hydra_cfg.runtime.choices.get("job"))
        summary = run_job(job, run_dir=run_dir)
    except UserError as exc:  # found only once Hydra named the run dir: still before any worker
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    if not summary.completed:
        failed_runs.append(str(run_dir))


def verify_command(args: list[str]) -> int:
    """``orchestrator verify``: the job under several strategies, step by step."""
    if any(arg in ("-h", "--help") for arg in args):
        print(USAGE)
        return 0
    configure_logging()
    return run_verify(args)


def estimate_command(args: list[str]) -> int:
    """``orchestrator estimate``: per-rank memory under every strategy, before launch."""
    if any(arg in ("-h", "--help") for arg in args):
        print(USAGE)
        return 0
    return run_estimate(args)


def search_command(args: list[str]) -> int:
    """``orchestrator search``: trials over a search space on Ray Tune (``search/command.py``)."""
    return run_search(args)


def scale_command(args: list[str]) -> int:
    """``orchestrator scale``: one run per (strategy, worker count), tables and plots of the lot."""
    if any(arg in ("-h", "--help") for arg in args):
        print(USAGE)
        return 0
    configure_logging()
    return run_scale(args)


def report_command(args: list[str]) -> int:
    """``orchestrator report RUN_DIR [RUN_DIR ...] [-o FILE]``: the HTML report of the runs."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="orchestrator report", description="One self-contained HTML file of one or more runs."
    )
    parser.add_argument("run_dirs", nargs="+", type=Path, help="run dirs, or dirs of run dirs (a sweep's)")
    parser.add_argument(
        "-o",
        "--output",
        type=Path,
        default=None,
        help="the HTML file (default: RUN_DIR/report.html for one run, ./report.html for several)",
    )
    parsed = parser.parse_args(args)
    output = parsed.output or (RunDir(parsed.run_dirs[0]).report if len(parsed.run_dirs) == 1 else Path(REPORT_FILE))
    print(f"report: {write_report(parsed.run_dirs, output)}")
    return 0


def export_command(args: list[str]) -> int:
    """``orchestrator export RUN_DIR_OR_CHECKPOINT -o DIR``: the model as a directory transformers loads."""
    from orchestrator.export import export_command as run_export  # lazy: imports torch

    return run_export(args)


COMMANDS: dict[str, Callable[[list[str]], int]] = {
    "train": train_command,
    "verify": verify_command,
    "estimate": estimate_command,
    "scale": scale_command,
    "search": search_command,
    "report": report_command,
    "export": export_command,
    "cluster": cluster_commands.cluster_command,
    "submit": cluster_commands.submit_command,
    "jobs": cluster_commands.jobs_command,
    "run-submitted": cluster_commands.run_submitted_command,
}
