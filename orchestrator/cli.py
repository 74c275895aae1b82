"""The ``orchestrator`` command.

Every command that takes a job takes it the Hydra way (``job=NAME group=option key=value``). Before
Hydra's own ``main`` runs (and creates a run directory), the CLI composes every run's config, converts
it to the typed schema, checks it against this machine and prepares the data; bad input ends here,
in a second or two, as one line on stderr and exit status 2.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable

from orchestrator import __version__
from orchestrator.errors import UserError

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
        print(f"error: unknown command {args[0]!r}; commands: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    try:
        return command(args[1:])
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def train_command(args: list[str]) -> int:
    """``orchestrator train``: Hydra's command line, checked first, then Hydra's main."""
    from hydra._internal.utils import get_args_parser

    parsed = get_args_parser().parse_args(args)
    if not any(getattr(parsed, flag) for flag in _HYDRA_INFO_FLAGS):
        for overrides in _sweep_points(parsed.overrides, multirun=parsed.multirun):
            _precheck(overrides, prepare=parsed.cfg is None)
    return _run_hydra(args)


def _precheck(overrides: list[str], *, prepare: bool) -> None:
    from orchestrator.config.checks import check_environment
    from orchestrator.config.compose import compose, to_config

    config = to_config(compose(overrides))
    check_environment(config)
    if prepare:
        from orchestrator.launch.preflight import preflight

        preflight(config)


def _sweep_points(overrides: list[str], *, multirun: bool) -> list[list[str]]:
    """Each run's overrides: one run, or every point of a basic ``-m`` sweep."""
    if not multirun:
        return [overrides]
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
        batches = BasicSweeper.split_arguments(parsed, max_batch_size=None)
    except HydraException as exc:
        raise UserError(str(exc).strip().splitlines()[0]) from None
    return [list(point) for batch in batches for point in batch]


_failed_runs: list[str] = []


def _run_hydra(args: list[str]) -> int:
    import hydra

    from orchestrator.config.compose import CONF_DIR
    from orchestrator.config.store import register

    register()
    _failed_runs.clear()
    saved_argv = sys.argv
    sys.argv = ["orchestrator train", *args]
    try:
        hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")(_train_task)()
    finally:
        sys.argv = saved_argv
    return 1 if _failed_runs else 0


def _train_task(cfg: Any) -> float | None:
    """Hydra's task function: one run, in the run dir Hydra made. Returns the final eval loss (for sweepers)."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    from orchestrator.config.compose import to_config
    from orchestrator.launch import run_job
    from orchestrator.logs import configure_logging

    configure_logging()
    hydra_cfg = HydraConfig.get()
    try:
        summary = run_job(
            to_config(cfg),
            run_dir=Path(hydra_cfg.runtime.output_dir),
            resolved_yaml=OmegaConf.to_yaml(cfg, resolve=True),
            job_name=hydra_cfg.runtime.choices.get("job"),
        )
    except UserError as exc:  # found only once Hydra named the run dir: still before any worker
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    if summary["status"] != "completed":
        _failed_runs.append(summary["run_dir"])
    return summary.get("final_eval_loss")


def verify_command(args: list[str]) -> int:
    """``orchestrator verify``: the job under several strategies, step by step."""
    if any(arg in ("-h", "--help") for arg in args):
        print(USAGE)
        return 0
    from orchestrator.experiments.verify import verify_command as run_verify
    from orchestrator.logs import configure_logging

    configure_logging()
    return run_verify(args)


def estimate_command(args: list[str]) -> int:
    """``orchestrator estimate``: per-rank memory under every strategy, before launch."""
    if any(arg in ("-h", "--help") for arg in args):
        print(USAGE)
        return 0
    from orchestrator.experiments.estimate import estimate_command as run_estimate

    return run_estimate(args)


COMMANDS: dict[str, Callable[[list[str]], int]] = {
    "train": train_command,
    "verify": verify_command,
    "estimate": estimate_command,
}
