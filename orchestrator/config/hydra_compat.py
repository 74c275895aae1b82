"""Hydra's private APIs, in one place (tested with hydra-core 1.3.x; pyproject.toml pins ``<1.4``).

The CLI checks every run's config before Hydra makes a run directory, and runs a single job without
Hydra's ``main`` (which would compose the config twice more). For that it needs four things Hydra
keeps internal: its argument parser, the basic sweeper's expansion of ``-m`` overrides into points,
the override parser, and ``run_job`` with the callbacks ``main`` would call around it.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.errors import HydraException

from orchestrator.errors import UserError

TESTED_VERSIONS = ("1.3",)  # hydra-core major.minor this module is tested against


def args_parser() -> argparse.ArgumentParser:
    """Hydra's own command-line parser (its flags and the overrides)."""
    from hydra._internal.utils import get_args_parser

    return get_args_parser()


def parse_overrides(overrides: list[str]) -> list[Override]:
    """The overrides as Hydra parses them; UserError with Hydra's first line for one it cannot parse."""
    try:
        return OverridesParser.create().parse_overrides(overrides)
    except HydraException as exc:
        raise UserError(str(exc).strip().splitlines()[0]) from None


def sweep_points(overrides: list[str]) -> list[list[str]]:
    """Every point of a basic ``-m`` sweep (the cross product of its comma-separated values)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    try:
        batches = BasicSweeper.split_arguments(parse_overrides(overrides), max_batch_size=None)
    except HydraException as exc:
        raise UserError(str(exc).strip().splitlines()[0]) from None
    return [list(point) for batch in batches for point in batch]


def run_single(cfg: Any, task: Callable[[Any], Any]) -> Any:
    """Runs ``task`` on the composed ``cfg`` (hydra node included) as Hydra's ``main`` runs one job: the run
    dir, ``HydraConfig``, job logging and callbacks. Returns the task's return value, or raises what it raised."""
    from hydra._internal.callbacks import Callbacks
    from hydra.core.utils import run_job
    from hydra.types import HydraContext, RunMode

    cfg.hydra.mode = RunMode.RUN
    callbacks = Callbacks(cfg)
    callbacks.on_run_start(config=cfg, config_name="config")
    result = run_job(
        hydra_context=HydraContext(config_loader=None, callbacks=callbacks),
        task_function=task,
        config=cfg,
        job_dir_key="hydra.run.dir",
        job_subdir_key=None,
    )
    callbacks.on_run_end(config=cfg, config_name="config", job_return=result)
    return result.return_value  # raises what the task raised
