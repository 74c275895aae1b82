"""The Strategy protocol: how a model is replicated or sharded across ranks, and how it steps.

The training loop holds a ``Strategy`` and never asks which one. One optimizer step reads::

    for i, batch in enumerate(micro_batches):
        with strategy.accumulate(sync=(i == last)), strategy.autocast():
            loss = loss_fn(strategy.model(inputs), targets)
            strategy.backward(loss)
    grad_norm = strategy.clip_grad_norm(max_norm)   # global norm, before clipping
    strategy.set_lr(lr)
    stepped = strategy.step()                       # optimizer step (False if fp16 overflow skipped it)

``TorchStrategy`` implements everything for strategies that keep a plain ``torch.optim`` optimizer on
the (possibly wrapped or sharded) parameters, which is every strategy but DeepSpeed's: a subclass only
says how to wrap the model, how to defer gradient sync, and how to save and load its state.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ContextManager, Iterable

import torch
from torch import nn

from orchestrator.config.schema import Precision, StrategyConfig
from orchestrator.distributed import DistContext

OptimizerFactory = Callable[[nn.Module], torch.optim.Optimizer]

_DTYPES = {Precision.fp32: torch.float32, Precision.bf16: torch.bfloat16, Precision.fp16: torch.float16}


@dataclass(frozen=True, kw_only=True)
class MemoryReport:
    """Bytes this rank's tensors really hold (local shards only)."""

    param_bytes: int
    grad_bytes: int
    optimizer_bytes: int

    @property
    def model_state_bytes(self) -> int:
        return self.param_bytes + self.grad_bytes + self.optimizer_bytes


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The part of ``tensor`` this rank stores (a DTensor's local shard, else the tensor itself)."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if to_local is not None else tensor


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Storage bytes of ``tensors``, each storage counted once (tied weights, grad bucket views)."""
    seen: set[int] = set()
    total = 0
    for tensor in tensors:
        local = local_tensor(tensor)
        storage = local.untyped_storage()
        if storage.data_ptr() in seen:
            continue
        seen.add(storage.data_ptr())
        total += storage.nbytes()
    return total


class Strategy(ABC):
    """Wraps a model for N ranks and owns everything between a loss and an optimizer step.

    Args:
        cfg: the strategy's own config node.
        dist: ranks and device.
        precision: fp32 | bf16 | fp16, meaning the same under every strategy: fp32 master weights and
            optimizer state, forward and backward in the low-precision dtype, fp16 with dynamic loss scaling.
        accum_steps: micro-batches per optimizer step; ``backward`` scales each loss by its inverse.
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer

    def __init__(self, cfg: StrategyConfig, *, dist: DistContext, precision: Precision, accum_steps: int) -> None:
        self.cfg = cfg
        self.dist = dist
        self.precision = precision
        self.accum_steps = accum_steps

    @abstractmethod
    def setup(self, model: nn.Module, *, build_optimizer: OptimizerFactory) -> None:
        """Moves, wraps or shards ``model`` (built on CPU, on every rank identically) and builds the optimizer."""

    @property
    def handles_grad_overflow(self) -> bool:
        """True when a non-finite gradient is expected now and then and the strategy skips that step itself."""
        return False

    def accumulate(self, *, sync: bool) -> ContextManager:
        """Context for one micro-batch's forward and backward; gradients are synchronized only when ``sync``."""
        return contextlib.nullcontext()

    def autocast(self) -> ContextManager:
        return contextlib.nullcontext()

    @abstractmethod
    def backward(self, loss: torch.Tensor) -> None:
        """Backward of one micro-batch's mean loss, scaled for accumulation (and fp16 loss scaling)."""

    @abstractmethod
    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        """The global gradient norm before clipping; clips to ``max_norm`` when it is > 0."""

    @abstractmethod
    def set_lr(self, lr: float) -> None: ...

    @abstractmethod
    def step(self) -> bool:
        """Applies the optimizer step and zeroes gradients. Returns False if the step was skipped."""

    @abstractmethod
    def zero_grad(self) -> None:
        """Drops this step's gradients without stepping (a skipped non-finite step)."""

    @abstractmethod
    def save(self, directory: Path) -> None:
        """Writes this rank's share of model and optimizer state into ``directory`` (which exists)."""

    @abstractmethod
    def load(self, directory: Path) -> None:
        """Restores what ``save`` wrote, on every rank."""

    @abstractmethod
    def memory(self) -> MemoryReport: ...


class TorchStrategy(Strategy):
    """A strategy whose optimizer is a plain ``torch.optim`` optimizer over the wrapped model's parameters."""

    def __init__(self, cfg: StrategyConfig, *, dist: DistContext, precision: Precision, accum_steps: int) -> None:
        super().__init__(cfg, dist=dist, precision=precision, accum_steps=accum_steps)
        # Dynamic loss scaling keeps small fp16 gradients from flushing to zero; bf16 has fp32's range.
        self.scaler = torch.amp.GradScaler(dist.device.type, enabled=precision is Precision.fp16)

    @property
    def handles_grad_overflow(self) -> bool:
        return self.scaler.is_enabled()

    def autocast(self) -> ContextManager:
        if self.precision is Precision.fp32:
            return contextlib.nullcontext()
        return torch.autocast(self.dist.device.type, dtype=_DTYPES[self.precision])

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss / self.accum_steps).backward()

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        self.scaler.unscale_(self.optimizer)
        params = [p for p in self.model.parameters() if p.grad is not None]
        limit = max_norm if max_norm > 0 else float("inf")
        return torch.nn.utils.clip_grad_norm_(params, limit, foreach=True)

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def step(self) -> bool:
        scale_before = self.scaler.get_scale() if self.scaler.is_enabled() else None
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        # GradScaler lowers its scale exactly when it skipped the step for inf/nan gradients.
        return scale_before is None or self.scaler.get_scale() >= scale_before

    def zero_grad(self) -> None:
        if self.scaler.is_enabled():
            self.scaler.update()  # closes the unscale_ that clip_grad_norm opened for this step
        self.optimizer.zero_grad(set_to_none=True)

    def memory(self) -> MemoryReport:
        params = list(self.model.parameters())
        optimizer_tensors = [
            value for state in self.optimizer.state.values() for value in state.values() if torch.is_tensor(value)
        ]
        return MemoryReport(
            param_bytes=tensor_bytes(params),
            grad_bytes=tensor_bytes(p.grad for p in params if p.grad is not None),
            optimizer_bytes=tensor_bytes(optimizer_tensors),
        )
