"""Replicated strategies: one process (``none``) and DistributedDataParallel (``ddp``).

Every rank holds the whole model and optimizer, so rank 0 alone writes them, as plain state dicts of
the unwrapped module: a checkpoint that any strategy and ``trainer.init_from`` can read.
"""

from __future__ import annotations

import contextlib
from functools import partial
from pathlib import Path
from typing import Any, ContextManager

import torch
from torch.nn.parallel import DistributedDataParallel

from orchestrator.checkpoints import unpickle
from orchestrator.checkpoints.hashing import FileDigest, save_hashed
from orchestrator.models.recipe import ModelRecipe
from orchestrator.strategies.base import OptimizerFactory, PendingWrite, TorchStrategy
from orchestrator.strategies.blocks import prepare_blocks
from orchestrator.strategies.ddp import DDPConfig
from orchestrator.strategies.weights import StoredTensor, itself

MODEL_FILE = "model.pt"
OPTIMIZER_FILE = "optimizer.pt"
SCALER_FILE = "scaler.pt"


class SingleStrategy(TorchStrategy):
    """One process: the model as it is, on the worker's device."""

    def setup(self, recipe: ModelRecipe, *, build_optimizer: OptimizerFactory) -> None:
        module = recipe.build_complete()
        prepare_blocks(
            module,
            recipe.blocks(module),
            activation_checkpointing=self.cfg.activation_checkpointing,
            compile=self.cfg.compile,
        )
        self.module = module.to(self.dist.device)
        self.model = self._wrap(self.module)
        self.optimizer = build_optimizer(self.module)

    def _wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        return module

    def save(self, directory: Path) -> dict[Path, FileDigest]:
        return _write(directory, self._states())

    def snapshot(self, directory: Path) -> PendingWrite:
        return partial(_write, directory, self.staging.stage(self._states()))

    def _states(self) -> dict[str, Any]:
        """What rank 0 writes, by file name (nothing on other ranks: they hold the same)."""
        if not self.dist.is_main:
            return {}
        states = {MODEL_FILE: self.module.state_dict(), OPTIMIZER_FILE: self.optimizer.state_dict()}
        if self.scaler.is_enabled():
            states[SCALER_FILE] = self.scaler.state_dict()
        return states

    def load(self, directory: Path) -> None:
        self.module.load_state_dict(_load(directory / MODEL_FILE))
        self.optimizer.load_state_dict(_load(directory / OPTIMIZER_FILE))
        if self.scaler.is_enabled() and (directory / SCALER_FILE).exists():
            self.scaler.load_state_dict(_load(directory / SCALER_FILE))


class DDPStrategy(SingleStrategy):
    """Full replicas; gradients all-reduced in buckets, overlapped with backward."""

    cfg: DDPConfig

    def _wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        if not torch.distributed.is_initialized():  # one process (launcher=local, 1 worker): one replica
            return module
        on_gpu = self.dist.device.type == "cuda"
        return DistributedDataParallel(
            module,
            device_ids=[self.dist.device.index] if on_gpu else None,
            bucket_cap_mb=self.cfg.bucket_cap_mb,
            find_unused_parameters=self.cfg.find_unused_parameters,
            static_graph=self.cfg.static_graph,
            gradient_as_bucket_view=self.cfg.gradient_as_bucket_view,
        )

    def accumulate(self, *, sync: bool) -> ContextManager:
        # Skipping the all-reduce on all but the last micro-batch is what makes accumulation cheap.
        if sync or not isinstance(self.model, DistributedDataParallel):
            return contextlib.nullcontext()
        return self.model.no_sync()


def _write(directory: Path, states: dict[str, Any]) -> dict[Path, FileDigest]:
    return {directory / name: save_hashed(state, directory / name) for name, state in states.items()}


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


STRATEGIES = {"none": SingleStrategy, "ddp": DDPStrategy}


def read_weights(directory: Path) -> dict[str, torch.Tensor]:
    """The plain model state dict of a checkpoint written by a replicated strategy."""
    return _load(directory / MODEL_FILE)


def stored_weights(directory: Path) -> dict[str, StoredTensor]:
    """``model.pt`` memory-mapped: a tensor's pages are read from disk when it is used."""
    state = torch.load(directory / MODEL_FILE, map_location="cpu", mmap=True, weights_only=True)
    return {
        name: StoredTensor(shape=tuple(tensor.shape), dtype=tensor.dtype, read=partial(itself, tensor))
        for name, tensor in state.items()
    }


def check_files(directory: Path) -> None:
    """The state dicts are loaded with ``weights_only=True``; checked through the tensors' allow-list too."""
    names = (MODEL_FILE, OPTIMIZER_FILE, SCALER_FILE)
    unpickle.check_torch_files(
        [directory / name for name in names if (directory / name).is_file()],
        allowed=unpickle.TORCH_TENSORS,
        root=directory,
    )
