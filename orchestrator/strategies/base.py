"""The Strategy protocol: how a model is built, replicated or sharded across ranks, and how it steps.

The training loop holds a ``Strategy`` and never asks which one. One optimizer step reads::

    for i, (inputs, targets) in enumerate(micro_batches):
        with strategy.accumulate(sync=(i == last)):
            with strategy.autocast():
                loss = loss_fn(strategy.model(inputs), targets)
            strategy.backward(loss)
    outcome = strategy.step(lr=lr, max_norm=clip, guard=guard)   # norm, clip, check, update

``step`` owns everything between the gradients and the update because strategies disagree on where
the global gradient norm exists: torch strategies compute it from (sharded) gradients, DeepSpeed
inside its engine. Each calls ``guard`` with the norm before applying the update, which is where the
loop's non-finite policy runs.

``TorchStrategy`` implements the protocol for every strategy that keeps a plain ``torch.optim``
optimizer over the (possibly wrapped or sharded) parameters: a subclass says how to build and wrap
the model, how to defer gradient sync, and how to save and load its state.
"""

from __future__ import annotations

import contextlib
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ContextManager, Iterable

import torch
from torch import nn

from orchestrator.checkpoints.hashing import FileDigest
from orchestrator.checkpoints.staging import HostStaging
from orchestrator.config.schema import Precision, StrategyConfig
from orchestrator.distributed import DistContext
from orchestrator.models.recipe import ModelRecipe
from orchestrator.strategies.spec import TrainingSettings

OptimizerFactory = Callable[[nn.Module], torch.optim.Optimizer]
# Writes a snapshot's files (in a background thread, while training goes on); returns them with their digests.
PendingWrite = Callable[[], dict[Path, FileDigest]]
GradNormGuard = Callable[[float], bool]  # True: apply the update; False: skip it; may raise TrainingError

LOW_PRECISION = {Precision.bf16: torch.bfloat16, Precision.fp16: torch.float16}
FP16_OVERFLOW = "fp16 gradient overflow (loss scale lowered)"


@dataclass(frozen=True, kw_only=True)
class MemoryReport:
    """Bytes this rank's tensors really hold (local shards only).

    ``optimizer_bytes`` is the optimizer's state (Adam's moments). ``master_bytes`` is a separate
    fp32 copy of the parameters that some strategies keep for the optimizer to update: DeepSpeed's
    ZeRO keeps one of its partition even when the model itself is fp32.
    """

    param_bytes: int
    grad_bytes: int
    optimizer_bytes: int
    master_bytes: int = 0

    @property
    def model_state_bytes(self) -> int:
        return self.param_bytes + self.grad_bytes + self.optimizer_bytes

    @property
    def total_bytes(self) -> int:
        return self.model_state_bytes + self.master_bytes


@dataclass(frozen=True, kw_only=True)
class StepOutcome:
    grad_norm: float  # global, before clipping (NaN when the step was rejected before it was computed)
    applied: bool
    skipped: str | None = None  # why the update was not applied


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The part of ``tensor`` this rank stores (a DTensor's local shard, else the tensor itself)."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if to_local is not None else tensor


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Storage bytes of ``tensors``, each storage counted once (tied weights, gradient bucket views)."""
    seen: set[int] = set()
    total = 0
    for tensor in tensors:
        storage = local_tensor(tensor).untyped_storage()
        if storage.data_ptr() in seen:
            continue
        seen.add(storage.data_ptr())
        total += storage.nbytes()
    return total


def squared_norm(tensors: Iterable[torch.Tensor], *, device: torch.device) -> torch.Tensor:
    """The sum of squares of this rank's (local) elements, accumulated in float64.

    In float32 the norm of a million-element gradient depends on the summation order at the 1e-5
    level, which differs between replicated and sharded layouts; the clipping coefficient would then
    differ too and strategies would drift apart. In float64 they agree to rounding.
    """
    total = torch.zeros((), dtype=torch.float64, device=device)
    for tensor in tensors:
        total += torch.linalg.vector_norm(local_tensor(tensor), dtype=torch.float64).square()
    return total


class Strategy(ABC):
    """Builds the model for N ranks and owns everything between a loss and an optimizer update.

    Args:
        cfg: the job's ``strategy`` node (the strategy's own config class).
        settings: what it must agree with the loop on (precision, batch sizes, accumulation, clipping,
            the optimizer).
        dist: ranks and device.

    ``precision`` means the same under every strategy: fp32 master weights and optimizer state,
    forward and backward in the low-precision dtype, fp16 with dynamic loss scaling.
    """

    model: nn.Module  # what the loop calls forward on

    def __init__(self, cfg: StrategyConfig, *, settings: TrainingSettings, dist: DistContext) -> None:
        self.cfg = cfg
        self.settings = settings
        self.dist = dist
        self.precision = settings.precision
        self.accum_steps = settings.grad_accum_steps
        self.staging = HostStaging()  # asynchronous checkpoints' host copy, reused from save to save

    @abstractmethod
    def setup(self, recipe: ModelRecipe, *, build_optimizer: OptimizerFactory) -> None:
        """Builds the model from ``recipe`` (identically on every rank), wraps or shards it, builds the optimizer."""

    def accumulate(self, *, sync: bool) -> ContextManager:
        """Context for one micro-batch's forward and backward; gradients are synchronized only when ``sync``."""
        return contextlib.nullcontext()

    def autocast(self) -> ContextManager:
        return contextlib.nullcontext()

    @abstractmethod
    def backward(self, loss: torch.Tensor) -> None:
        """Backward of one micro-batch's mean loss, scaled for accumulation (and fp16 loss scaling)."""

    @abstractmethod
    def step(self, *, lr: float, max_norm: float, guard: GradNormGuard) -> StepOutcome:
        """Computes the global gradient norm, asks ``guard``, clips to ``max_norm`` (> 0), updates at ``lr``.

        Gradients are gone afterwards, whether the update was applied or not.
        """

    @abstractmethod
    def discard_gradients(self) -> None:
        """Drops this step's gradients without an update (a step rejected before ``step``)."""

    @abstractmethod
    def save(self, directory: Path) -> dict[Path, FileDigest]:
        """Writes this rank's share of model and optimizer state into ``directory``; returns the files written,
        each with the digest of the bytes written (``checkpoints.hashing``)."""

    @abstractmethod
    def snapshot(self, directory: Path) -> PendingWrite:
        """Copies this rank's share of model and optimizer state into host memory (collective where ``save``
        is); returns the function that writes that copy into ``directory`` as ``save`` would, safe to run in
        a background thread while training goes on, and that performs no collective on the training group."""

    @abstractmethod
    def load(self, directory: Path) -> None:
        """Restores what ``save`` wrote, on every rank."""

    @abstractmethod
    def memory(self) -> MemoryReport:
        """Model-state bytes on this rank at their peak (parameters, gradients and optimizer state all live)."""


class TorchStrategy(Strategy):
    """A strategy whose optimizer is a plain ``torch.optim`` optimizer over the wrapped model's parameters."""

    optimizer: torch.optim.Optimizer

    def __init__(self, cfg: StrategyConfig, *, settings: TrainingSettings, dist: DistContext) -> None:
        super().__init__(cfg, settings=settings, dist=dist)
        # Dynamic loss scaling keeps small fp16 gradients from flushing to zero; bf16 has fp32's range.
        self.scaler = self._make_scaler(enabled=self.precision is Precision.fp16)
        self._peak_memory: MemoryReport | None = None

    def _make_scaler(self, *, enabled: bool) -> torch.amp.GradScaler:
        return torch.amp.GradScaler(self.dist.device.type, enabled=enabled)

    def autocast(self) -> ContextManager:
        if self.precision is Precision.fp32:
            return contextlib.nullcontext()
        return torch.autocast(self.dist.device.type, dtype=LOW_PRECISION[self.precision])

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss / self.accum_steps).backward()

    def step(self, *, lr: float, max_norm: float, guard: GradNormGuard) -> StepOutcome:
        self.scaler.unscale_(self.optimizer)
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        grad_norm = self._grad_norm(grads)
        if self.optimizer.state and self._peak_memory is None:
            # Gradients and (after a first update) optimizer state are both live now: the model-state peak.
            self._peak_memory = self._current_memory()
        if not math.isfinite(grad_norm) and self.scaler.is_enabled():
            self.scaler.step(self.optimizer)  # sees the inf gradients, skips the update, and lowers the scale
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
            return StepOutcome(grad_norm=grad_norm, applied=False, skipped=FP16_OVERFLOW)
        if not guard(grad_norm):
            if self.scaler.is_enabled():
                self.scaler.update()  # closes this step's unscale_
            self.discard_gradients()
            return StepOutcome(grad_norm=grad_norm, applied=False, skipped=f"non-finite gradient norm ({grad_norm})")
        if 0 < max_norm < grad_norm:
            # torch's and DeepSpeed's clipping coefficient, so that every strategy clips alike.
            torch._foreach_mul_(grads, max_norm / (grad_norm + 1e-6))
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return StepOutcome(grad_norm=grad_norm, applied=True)

    def _grad_norm(self, grads: list[torch.Tensor]) -> float:
        return math.sqrt(float(self._sum_over_shards(squared_norm(grads, device=self.dist.device))))

    def _sum_over_shards(self, value: torch.Tensor) -> torch.Tensor:
        """Sums a per-rank partial result when gradients are sharded; replicated gradients need nothing."""
        return value

    def discard_gradients(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def memory(self) -> MemoryReport:
        return self._peak_memory or self._current_memory()

    def _current_memory(self) -> MemoryReport:
        params = list(self.model.parameters())
        optimizer_tensors = [
            value for state in self.optimizer.state.values() for value in state.values() if torch.is_tensor(value)
        ]
        return MemoryReport(
            param_bytes=tensor_bytes(params),
            grad_bytes=tensor_bytes(p.grad for p in params if p.grad is not None),
            optimizer_bytes=tensor_bytes(optimizer_tensors),
        )
