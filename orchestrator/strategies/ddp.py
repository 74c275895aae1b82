"""Replicated strategies: one process (``none``) and DistributedDataParallel (``ddp``).

Every rank holds the whole model and optimizer, so rank 0 alone writes them, as plain state dicts of the
unwrapped module: a checkpoint that any strategy and ``trainer.init_from`` can read.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import ContextManager

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from orchestrator.config.schema import DDPConfig
from orchestrator.strategies.base import OptimizerFactory, TorchStrategy

MODEL_FILE = "model.pt"
OPTIMIZER_FILE = "optimizer.pt"
SCALER_FILE = "scaler.pt"


class SingleStrategy(TorchStrategy):
    """One process: the model as it is, on the worker's device."""

    def setup(self, model: nn.Module, *, build_optimizer: OptimizerFactory) -> None:
        self.module = model.to(self.dist.device)
        self.model = self.module
        self.optimizer = build_optimizer(self.module)

    def save(self, directory: Path) -> None:
        if not self.dist.is_main:
            return
        torch.save(self.module.state_dict(), directory / MODEL_FILE)
        torch.save(self.optimizer.state_dict(), directory / OPTIMIZER_FILE)
        if self.scaler.is_enabled():
            torch.save(self.scaler.state_dict(), directory / SCALER_FILE)

    def load(self, directory: Path) -> None:
        self.module.load_state_dict(_load(directory / MODEL_FILE))
        self.optimizer.load_state_dict(_load(directory / OPTIMIZER_FILE))
        if self.scaler.is_enabled() and (directory / SCALER_FILE).exists():
            self.scaler.load_state_dict(_load(directory / SCALER_FILE))


class DDPStrategy(SingleStrategy):
    """Full replicas; gradients all-reduced in buckets, overlapped with backward."""

    cfg: DDPConfig

    def setup(self, model: nn.Module, *, build_optimizer: OptimizerFactory) -> None:
        self.module = model.to(self.dist.device)
        on_gpu = self.dist.device.type == "cuda"
        self.model = DistributedDataParallel(
            self.module,
            device_ids=[self.dist.device.index] if on_gpu else None,
            bucket_cap_mb=self.cfg.bucket_cap_mb,
            find_unused_parameters=self.cfg.find_unused_parameters,
            static_graph=self.cfg.static_graph,
            gradient_as_bucket_view=self.cfg.gradient_as_bucket_view,
        )
        self.optimizer = build_optimizer(self.module)

    def accumulate(self, *, sync: bool) -> ContextManager:
        # Skipping the all-reduce on all but the last micro-batch is what makes accumulation cheap.
        return contextlib.nullcontext() if sync else self.model.no_sync()


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def load_model_weights(directory: Path) -> dict[str, torch.Tensor]:
    """The plain model state dict of a checkpoint directory written by a replicated strategy."""
    return _load(directory / MODEL_FILE)
