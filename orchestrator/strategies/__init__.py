"""Strategies by name. The config group ``strategy`` picks one; nothing outside this package asks which."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from orchestrator.config.schema import Precision, StrategyConfig
from orchestrator.distributed import DistContext
from orchestrator.strategies.base import MemoryReport, Strategy
from orchestrator.strategies import ddp
from orchestrator.strategies.ddp import DDPStrategy, SingleStrategy

_STRATEGIES: dict[str, type[Strategy]] = {
    "none": SingleStrategy,
    "ddp": DDPStrategy,
}


def build_strategy(cfg: StrategyConfig, *, dist: DistContext, precision: Precision, accum_steps: int) -> Strategy:
    """The strategy named by ``cfg.name``, not yet set up."""
    return _STRATEGIES[cfg.name](cfg, dist=dist, precision=precision, accum_steps=accum_steps)


def load_model_weights(directory: Path) -> dict[str, torch.Tensor]:
    """The full model state dict of a verified checkpoint, whichever strategy wrote it."""
    written_by = json.loads((directory / "manifest.json").read_text())["strategy"]
    if written_by in ("none", "ddp"):
        return ddp.load_model_weights(directory)
    raise ValueError(f"{directory}: no reader for checkpoints written by strategy={written_by}")


__all__ = ["MemoryReport", "Strategy", "build_strategy", "load_model_weights"]
