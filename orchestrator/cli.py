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
from orchestrator.rundir import REPORT_FILE, RunDir, RunSummary

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
    sweeper = _search_sweeper(parsed.overrides) if parsed.multirun else None
    if parsed.multirun:  # a sweep's runs share a W&B group
        extra = sweep_overrides(parsed.overrides, job_type="search" if sweeper else "sweep")
        args, parsed.overrides = [*args, *extra], [*parsed.overrides, *extra]
    if not any(getattr(parsed, flag) for flag in _HYDRA_INFO_FLAGS):
        points = (_search_points(parsed.overrides) if sweeper
                  else sweep_points(parsed.overrides) if parsed.multirun else [parsed.overrides])
        for overrides in points:
            config = _precheck(overrides, prepare=parsed.cfg is None)
            if sweeper and not config.trainer.eval_every:
                raise UserError(f"hydra/sweeper={sweeper} minimizes the final eval loss: set trainer.eval_every > 0")
    return _run_hydra(args, search=sweeper is not None)


def sweep_overrides(overrides: list[str], *, job_type: str) -> list[str]:
    """``logger.group`` (one name for the sweep) and ``logger.job_type``, unless the overrides set them."""
    from datetime import datetime

    job = next((o.partition("=")[2] for o in overrides if o.partition("=")[0].lstrip("+~") == "job"), "default")
    extra = {"logger.group": f"{job}-{job_type}-{datetime.now():%Y%m%d-%H%M%S}", "logger.job_type": job_type}
    return [f"{key}={value}" for key, value in extra.items()
            if not any(o.partition("=")[0].lstrip("+~") == key for o in overrides)]


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
    flags = (*_HYDRA_INFO_FLAGS, "multirun", "cfg", "package", "config_path", "config_name", "config_dir",
             "experimental_rerun")
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


def _search_sweeper(overrides: list[str]) -> str | None:
    """The sweeper the command line picks (``hydra/sweeper=optuna``), unless it is Hydra's basic one."""
    for override in parse_overrides(overrides):
        if override.key_or_group == "hydra/sweeper" and override.value() != "basic":
            return str(override.value())
    return None


def _search_points(overrides: list[str]) -> list[list[str]]:
    """What to check before a search whose points are sampled as it goes: every dimension at its first
    value, then each other choice and each end the sampler can reach, one dimension at a time."""
    import warnings

    from hydra_plugins.hydra_optuna_sweeper._impl import create_optuna_distribution_from_override
    from optuna.distributions import LogUniformDistribution, UniformDistribution

    dimensions: list[list[str]] = []
    for override in parse_overrides(overrides):
        if override.key_or_group == "hydra.sweeper.storage" and override.value() is not None:
            _check_study_storage()
        if not override.is_sweep_override():
            dimensions.append([override.input_line])
            continue
        try:
            with warnings.catch_warnings():  # Optuna warns about an uneven step; the search warns again
                warnings.simplefilter("ignore")
                space = create_optuna_distribution_from_override(override)
        except Exception as exc:  # the plugin asserts on glob(); Optuna raises ValueError on reversed ends
            raise UserError(f"{override.input_line}: not a search space ({exc or 'use choice, range or interval'})") from None
        if hasattr(space, "choices"):
            values = list(space.choices)
        elif isinstance(space, (UniformDistribution, LogUniformDistribution)):
            values = [space.low]  # a float interval is sampled from [low, high): high itself never runs
        else:
            values = [space.low, space.high]
        dimensions.append([f"{override.get_key_element()}={value}" for value in values])
    base = [values[0] for values in dimensions]
    return [base] + [base[:i] + [value] + base[i + 1:]
                     for i, values in enumerate(dimensions) for value in values[1:]]


def _check_study_storage() -> None:
    from importlib.metadata import version

    # The sweeper plugin takes optuna < 3, whose database storage fails an assertion under SQLAlchemy 2.
    installed = version("sqlalchemy")
    if int(installed.split(".")[0]) >= 2:
        raise UserError(f"hydra.sweeper.storage: Optuna {version('optuna')} keeps studies in a database only with "
                        f"SQLAlchemy < 2 (installed: {installed}); leave it unset for an in-memory study")


def _run_hydra(args: list[str], *, search: bool = False) -> int:
    import hydra

    register()
    failed_runs: list[str] = []
    saved_argv = sys.argv
    sys.argv = ["orchestrator train", *args]
    try:
        hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")(_task(failed_runs))()
    finally:
        sys.argv = saved_argv
    # A search that returns has found a best point: its failed trials are results (Optuna state FAIL,
    # summary.json status failed), not errors. With no trial completed the sweeper itself exits 1.
    return 1 if failed_runs and not search else 0


def _task(failed_runs: list[str], *, prepared: PreparedJob | None = None) -> Callable[[Any], float | None]:
    """``_train_task`` for Hydra, appending the run dir of each run that fails to ``failed_runs``.

    Hydra passes the task only the config, and a search sweeper takes its return value as the objective:
    the failures of a sweep's runs need this channel of their own.
    """
    task = functools.partial(_train_task, failed_runs=failed_runs, prepared=prepared)
    return functools.update_wrapper(task, _train_task)  # Hydra names the job after the wrapped function's module


def _train_task(cfg: Any, *, failed_runs: list[str], prepared: PreparedJob | None) -> float | None:
    """Hydra's task function: one run, in the run dir Hydra made; a run that fails is added to ``failed_runs``.

    Returns the final eval loss, the objective of a search sweeper; None where there is none, which the
    Optuna sweeper records as a failed trial (state FAIL) before it samples the next point.
    """
    import math

    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    configure_logging()
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    try:
        job = prepared or prepare_composed(cfg, job_name=hydra_cfg.runtime.choices.get("job"))
        summary = run_job(job, run_dir=run_dir)
    except UserError as exc:  # found only once Hydra named the run dir: still before any worker
        print(f"error: {exc}", file=sys.stderr)
        if hydra_cfg.mode != RunMode.MULTIRUN or hydra_cfg.runtime.choices.get("hydra/sweeper") == "basic":
            sys.exit(2)
        # A sampled point the schema rejects (the checks saw only the ends) is a failed trial.
        summary = RunSummary(status="failed", error=str(exc), run_dir=str(run_dir))
        if not RunDir(run_dir).summary.exists():
            summary.write(RunDir(run_dir).summary)
    if not summary.completed:
        failed_runs.append(str(run_dir))
        return None  # a failed run's summary still holds the eval loss of its last eval: not an objective
    loss = summary.final_eval_loss
    # Optuna's tell() rejects NaN and the sweeper would stop; None is a failed trial.
    return loss if loss is not None and math.isfinite(loss) else None


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

    parser = argparse.ArgumentParser(prog="orchestrator report",
                                     description="One self-contained HTML file of one or more runs.")
    parser.add_argument("run_dirs", nargs="+", type=Path, help="run dirs, or dirs of run dirs (a sweep's)")
    parser.add_argument("-o", "--output", type=Path, default=None,
                        help="the HTML file (default: RUN_DIR/report.html for one run, ./report.html for several)")
    parsed = parser.parse_args(args)
    output = parsed.output or (RunDir(parsed.run_dirs[0]).report if len(parsed.run_dirs) == 1
                               else Path(REPORT_FILE))
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
    "report": report_command,
    "export": export_command,
    "cluster": cluster_commands.cluster_command,
    "submit": cluster_commands.submit_command,
    "jobs": cluster_commands.jobs_command,
    "run-submitted": cluster_commands.run_submitted_command,
}
