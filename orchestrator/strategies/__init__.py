"""Strategies by name. The config group ``strategy`` picks one; nothing outside this package asks which."""

from __future__ import annotations

from pathlib import Path

import torch

from orchestrator.config.schema import Config
from orchestrator.distributed import DistContext
from orchestrator.strategies.base import MemoryReport, StepOutcome, Strategy
from orchestrator.strategies.ddp import (
    DDPStrategy,
    SingleStrategy,
    read_replicated_weights,
)

_STRATEGIES: dict[str, type[Strategy]] = {
    "none": SingleStrategy,
    "ddp": DDPStrategy,
}

# How to read the full model weights out of a checkpoint, by the strategy that wrote it.
_WEIGHT_READERS = {
    "none": read_replicated_weights,
    "ddp": read_replicated_weights,
}


def build_strategy(config: Config, *, dist: DistContext) -> Strategy:
    """The strategy ``config.strategy`` names, not yet set up."""
    return _STRATEGIES[config.strategy.name](config, dist=dist)


def read_model_weights(directory: Path, *, written_by: str) -> dict[str, torch.Tensor]:
    """The full model state dict of a verified checkpoint, whichever strategy wrote it."""
    return _WEIGHT_READERS[written_by](directory)


__all__ = ["MemoryReport", "StepOutcome", "Strategy", "build_strategy", "read_model_weights"]
