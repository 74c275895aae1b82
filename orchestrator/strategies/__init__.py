"""Strategies by name. The config group ``strategy`` picks one; nothing outside this package asks which.

Every package under ``orchestrator/strategies/`` is a strategy: its ``SPECS`` (``spec.StrategySpec``) are
found here, so a new strategy is its package and its YAML files under ``conf/strategy/``, nothing else.
Importing this package imports no torch; a strategy's engine is imported when it is built or read.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

from orchestrator.config.schema import Config
from orchestrator.errors import UserError
from orchestrator.strategies.spec import StrategySpec, TrainingSettings

if TYPE_CHECKING:
    import torch

    from orchestrator.distributed import DistContext
    from orchestrator.strategies.base import Strategy


@functools.cache
def _registry() -> dict[str, StrategySpec]:
    specs: dict[str, StrategySpec] = {}
    for module in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if module.ispkg:
            for spec in importlib.import_module(f"{__name__}.{module.name}").SPECS:
                for option in spec.options:
                    if option in specs:
                        raise RuntimeError(f"strategy={option} is defined twice ({module.name} and another package)")
                    specs[option] = spec
    return specs


def strategy_names() -> list[str]:
    """Every name ``strategy=`` takes."""
    return list(_registry())


def strategy_specs() -> list[StrategySpec]:
    """Each strategy's spec once, in a stable order."""
    return list({id(spec): spec for spec in _registry().values()}.values())


def strategy_spec(name: str) -> StrategySpec:
    """The spec of ``strategy=name``; ``UserError`` listing the names there are."""
    spec = _registry().get(name)
    if spec is None:
        raise UserError(f"strategy={name}: no such strategy; choose one of: {', '.join(_registry())}")
    return spec


def build_strategy(config: Config, *, dist: DistContext) -> Strategy:
    """The strategy ``config.strategy`` names, not yet set up."""
    name = config.strategy.name
    cls = strategy_spec(name).engine().STRATEGIES[name]
    return cls(config.strategy, settings=TrainingSettings.of(config), dist=dist)


def check_checkpoint(directory: Path) -> None:
    """Reads every pickle in a checkpoint through ``checkpoints.unpickle``'s allow-lists under every format,
    whichever strategy the manifest claims wrote it (the manifest is data too): ``UnsafeCheckpoint`` naming
    the file and the global for a checkpoint that would run code when any strategy's reader loaded it."""
    for spec in strategy_specs():
        spec.engine().check_files(directory)


def read_model_weights(directory: Path, *, written_by: str) -> dict[str, torch.Tensor]:
    """The full model state dict of a verified checkpoint, whichever strategy wrote it."""
    return engine_for(directory, written_by=written_by).read_weights(directory)


def checkpoint_format(strategy: str) -> str | None:
    """The on-disk format ``strategy`` writes, or None for a strategy this orchestrator does not know."""
    spec = _registry().get(strategy)
    return None if spec is None else spec.checkpoint_format(strategy)


def resume_problem(*, written_by: str, world_size: int, resuming_with: str, num_workers: int) -> str | None:
    """Why a checkpoint cannot resume this job, or None when it can."""
    format_ = checkpoint_format(written_by)
    if format_ is None or format_ != checkpoint_format(resuming_with):
        return f"it was written by strategy={written_by}, which strategy={resuming_with} cannot resume from"
    if not strategy_spec(written_by).reshardable and world_size != num_workers:
        return (
            f"strategy={written_by} checkpoints resume at the world size they were written at "
            f"({world_size}), not launcher.num_workers={num_workers}"
        )
    return None


def weights_problem(*, written_by: str) -> str | None:
    """Why the model weights of a checkpoint cannot be read, or None when they can."""
    if checkpoint_format(written_by) is None:
        return f"it was written by strategy={written_by}, whose checkpoints this orchestrator cannot read"
    return None


def engine_for(directory: Path, *, written_by: str) -> ModuleType:
    """The engine that reads the checkpoint ``directory``, written by ``strategy=written_by``."""
    spec = _registry().get(written_by)
    if spec is None:
        raise ValueError(f"{directory}: no reader for checkpoints written by strategy={written_by}")
    return spec.engine()


__all__ = [
    "StrategySpec",
    "TrainingSettings",
    "build_strategy",
    "check_checkpoint",
    "checkpoint_format",
    "engine_for",
    "read_model_weights",
    "resume_problem",
    "strategy_names",
    "strategy_spec",
    "strategy_specs",
    "weights_problem",
]
