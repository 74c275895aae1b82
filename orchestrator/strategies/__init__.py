"""Strategies by name. The config group ``strategy`` picks one; nothing outside this package asks which."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from orchestrator.checkpoints import unpickle
from orchestrator.config.schema import Config
from orchestrator.distributed import DistContext
from orchestrator.strategies.base import MemoryReport, StepOutcome, Strategy
from orchestrator.strategies.formats import checkpoint_format


def _strategy_class(name: str) -> type[Strategy]:
    # Imported on demand: DeepSpeed takes seconds to import and FSDP pulls in torch.distributed's extras.
    if name in ("none", "ddp"):
        from orchestrator.strategies.ddp import DDPStrategy, SingleStrategy  # lazy: imports torch

        return SingleStrategy if name == "none" else DDPStrategy
    if name == "fsdp2":
        from orchestrator.strategies.fsdp import FSDP2Strategy  # lazy: imports torch.distributed's FSDP and DCP

        return FSDP2Strategy
    from orchestrator.strategies.deepspeed import ZeroStrategy  # lazy: imports deepspeed

    return ZeroStrategy


def _weights_reader(format_: str) -> Callable[[Path], dict[str, torch.Tensor]]:
    if format_ == "replicated":
        from orchestrator.strategies.ddp import read_replicated_weights  # lazy: imports torch

        return read_replicated_weights
    if format_ == "dcp":
        from orchestrator.strategies.fsdp import read_dcp_weights  # lazy: imports torch.distributed's FSDP and DCP

        return read_dcp_weights
    from orchestrator.strategies.deepspeed import read_zero_weights  # lazy: imports deepspeed

    return read_zero_weights


def build_strategy(config: Config, *, dist: DistContext) -> Strategy:
    """The strategy ``config.strategy`` names, not yet set up."""
    return _strategy_class(config.strategy.name)(config, dist=dist)


def check_checkpoint(directory: Path) -> None:
    """Reads every pickle in a checkpoint through ``checkpoints.unpickle``'s allow-lists, whichever strategy
    the manifest claims wrote it (the manifest is data too): ``UnsafeCheckpoint`` naming the file and the
    global for a checkpoint that would run code when any strategy's reader loaded it."""
    from orchestrator.strategies.fsdp import check_dcp  # lazy: imports torch.distributed's FSDP and DCP

    unpickle.check_torch_files(sorted(directory.rglob("*.pt")), allowed=unpickle.DEEPSPEED, root=directory)
    for index in sorted(directory.rglob(".metadata")):
        check_dcp(index.parent)


def read_model_weights(directory: Path, *, written_by: str) -> dict[str, torch.Tensor]:
    """The full model state dict of a verified checkpoint, whichever strategy wrote it."""
    format_ = checkpoint_format(written_by)
    if format_ is None:
        raise ValueError(f"{directory}: no reader for checkpoints written by strategy={written_by}")
    return _weights_reader(format_)(directory)


__all__ = ["MemoryReport", "StepOutcome", "Strategy", "build_strategy", "check_checkpoint", "read_model_weights"]
