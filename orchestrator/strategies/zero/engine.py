"""DeepSpeed ZeRO stages 0-3 (``strategy=zero0|zero1|zero2|zero3``), with CPU offload.

``deepspeed.initialize`` gets the model, the same torch optimizer every strategy builds, and a
config generated from the job (``ds_config.py``). Gradient accumulation is the loop's: the
strategy marks the last micro-batch as DeepSpeed's accumulation boundary and steps the engine once.
Checkpoints are DeepSpeed's own files, written with ``save_latest=False`` inside orchestrator's
atomic protocol (DeepSpeed's ``latest`` file is never written or read). DeepSpeed loads them with
``weights_only=False``, so each is walked through ``checkpoints.unpickle``'s allow-list before DeepSpeed
opens it: a file naming anything but tensors and DeepSpeed's plain records is refused.
"""

from __future__ import annotations

import contextlib
import io
import math
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from orchestrator.checkpoints import unpickle
from orchestrator.checkpoints.hashing import FileDigest, read_back, save_hashed
from orchestrator.checkpoints.staging import HostStaging
from orchestrator.config.schema import Offload, OptimName, Precision
from orchestrator.models.meta import INIT_FILLS
from orchestrator.models.recipe import ModelRecipe, check_weights_fit
from orchestrator.strategies.base import (
    FP16_OVERFLOW,
    LOW_PRECISION,
    GradNormGuard,
    MemoryReport,
    OptimizerFactory,
    PendingWrite,
    StepOutcome,
    Strategy,
    squared_norm,
    tensor_bytes,
)
from orchestrator.strategies.blocks import prepare_blocks
from orchestrator.strategies.weights import StoredTensor
from orchestrator.strategies.zero import ZERO_STAGES, ZeroConfig
from orchestrator.strategies.zero.ds_config import deepspeed_config

TAG = "ds"


def _skip_shared_memory_all_reduce() -> None:
    """DeepSpeed's CPU backend compiles a shared-memory all-reduce when it starts (~26 s on two cores,
    once per machine and DeepSpeed install). Only ``inference_all_reduce`` uses it; training's
    collectives are torch.distributed's. Marked incompatible, it is not built."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


class ZeroStrategy(Strategy):
    cfg: ZeroConfig

    def setup(self, recipe: ModelRecipe, *, build_optimizer: OptimizerFactory) -> None:
        import deepspeed

        on_gpu = self.dist.device.type == "cuda"
        model = self.build_model(recipe)
        self.engine, *_ = deepspeed.initialize(
            model=model,
            optimizer=self._client_optimizer(model, build_optimizer, on_gpu=on_gpu),
            config=deepspeed_config(self.cfg, self.settings, on_gpu=on_gpu),
        )
        self.model = _CastInputs(self.engine, LOW_PRECISION.get(self.precision))
        self._peak = MemoryReport(param_bytes=0, grad_bytes=0, optimizer_bytes=0, master_bytes=0)

    def build_model(self, recipe: ModelRecipe) -> nn.Module:
        """The model before DeepSpeed's engine wraps it: partitioned over the ranks as it is built under
        ZeRO-3, whole on every rank under stages 0-2 (which replicate the parameters anyway)."""
        on_gpu = self.dist.device.type == "cuda"
        if not on_gpu:
            _skip_shared_memory_all_reduce()
        if self.cfg.stage == 3:
            config = deepspeed_config(self.cfg, self.settings, on_gpu=on_gpu)
            model = _build_partitioned(recipe, config, is_main=self.dist.is_main)
        else:
            model = recipe.build_complete(cast_frozen=False)  # DeepSpeed casts the whole model to bf16 itself
        prepare_blocks(
            model,
            recipe.blocks(model),
            activation_checkpointing=self.cfg.activation_checkpointing,
            compile=self.cfg.compile,
        )
        return model

    def _client_optimizer(
        self, model: nn.Module, build_optimizer: OptimizerFactory, *, on_gpu: bool
    ) -> torch.optim.Optimizer:
        optimizer = build_optimizer(model)
        optim = self.settings.optim
        if on_gpu and self.cfg.offload_optimizer is Offload.cpu and optim.name is not OptimName.sgd:
            # Offloaded Adam steps on the host, where DeepSpeed's vectorized CPU Adam is several times
            # faster than torch's; same update, same parameter groups.
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            return DeepSpeedCPUAdam(
                optimizer.param_groups,
                lr=optim.lr,
                betas=tuple(optim.betas),
                eps=optim.eps,
                adamw_mode=optim.name is OptimName.adamw,
            )
        return optimizer

    def accumulate(self, *, sync: bool) -> Any:
        # DeepSpeed reduces (and, under ZeRO, partitions) gradients at its accumulation boundary.
        self.engine.set_gradient_accumulation_boundary(sync)
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)  # scales by 1 / gradient_accumulation_steps (and the fp16 loss scale)
        self._record_memory()

    def step(self, *, lr: float, max_norm: float, guard: GradNormGuard) -> StepOutcome:
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr
        self._record_memory()
        if self.cfg.stage == 0:
            # Without ZeRO, DeepSpeed neither computes the norm nor skips a non-finite step: do both first.
            grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
            grad_norm = math.sqrt(float(squared_norm(grads, device=self.dist.device)))
            if not guard(grad_norm):
                self.discard_gradients()
                return StepOutcome(
                    grad_norm=grad_norm, applied=False, skipped=f"non-finite gradient norm ({grad_norm})"
                )
            self.engine.step()
            return StepOutcome(grad_norm=grad_norm, applied=True)
        # ZeRO computes the global norm inside step, clips with it, and skips the update when it is
        # not finite (and, under fp16, lowers the loss scale): the guard learns of it afterwards.
        self.engine.step()
        grad_norm = float(self.engine.get_global_grad_norm())
        if math.isfinite(grad_norm):
            return StepOutcome(grad_norm=grad_norm, applied=True)
        if self.precision is Precision.fp16:
            return StepOutcome(grad_norm=grad_norm, applied=False, skipped=FP16_OVERFLOW)
        guard(grad_norm)
        return StepOutcome(grad_norm=grad_norm, applied=False, skipped=f"non-finite gradient norm ({grad_norm})")

    def discard_gradients(self) -> None:
        self.engine.zero_grad()

    def save(self, directory: Path) -> dict[Path, FileDigest]:
        return self._save(directory, staging=None)()

    def snapshot(self, directory: Path) -> PendingWrite:
        return self._save(directory, staging=self.staging)

    def _save(self, directory: Path, *, staging: HostStaging | None) -> PendingWrite:
        """DeepSpeed's ``save_checkpoint`` through a checkpoint engine that hashes what it writes, or (given
        ``staging``) keeps a host copy of each state it is handed, written later by the function returned."""
        torch_engine = self.engine.checkpoint_engine
        engine = _HashingCheckpointEngine(torch_engine, keep=staging is not None)
        self.engine.checkpoint_engine = engine
        try:
            self.engine.save_checkpoint(str(directory), tag=TAG, client_state={}, save_latest=False)
        finally:
            self.engine.checkpoint_engine = torch_engine
        if staging is not None:
            engine.kept = staging.stage(engine.kept)  # one copy of every state DeepSpeed handed over
        # DeepSpeed's state files went through the engine: per-rank ones are named zero_pp_rank_<rank>_...,
        # the rest (model states under ZeRO-0/1/2) rank 0 writes. Its conversion scripts rank 0 copies in
        # place, past the engine: those are read back.
        copied = []
        if self.dist.is_main:
            copied = [
                p
                for p in sorted(directory.rglob("*"))
                if p.is_file() and "zero_pp_rank_" not in p.name and p not in engine.digests and p not in engine.kept
            ]

        def write() -> dict[Path, FileDigest]:
            return {**engine.write_kept(), **{path: read_back(path) for path in copied}}

        return write

    def load(self, directory: Path) -> None:
        check_zero(directory)
        loaded, _ = self.engine.load_checkpoint(
            str(directory), tag=TAG, load_optimizer_states=True, load_lr_scheduler_states=False, load_module_strict=True
        )
        if loaded is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint in {directory}")

    def memory(self) -> MemoryReport:
        return self._peak

    def _record_memory(self) -> None:
        """Keeps the largest model-state footprint seen (sampled after each backward and before each step)."""
        now = _zero_memory(self.engine, stage=self.cfg.stage)
        if now.total_bytes > self._peak.total_bytes:
            self._peak = now


class _HashingCheckpointEngine:
    """DeepSpeed's torch checkpoint engine with ``save`` hashing what it writes (``digests``, by path); or,
    with ``keep``, keeping what it is handed (``kept``) for ``write_kept`` to write later."""

    def __init__(self, torch_engine: Any, *, keep: bool) -> None:
        from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine  # heavy: deepspeed

        if type(torch_engine) is not TorchCheckpointEngine:
            raise ValueError(f"checkpoints need DeepSpeed's TorchCheckpointEngine, not {type(torch_engine).__name__}")
        self._torch_engine = torch_engine
        self._keep = keep
        self.digests: dict[Path, FileDigest] = {}
        self.kept: dict[Path, Any] = {}

    def save(self, state_dict: Any, path: str) -> None:
        if self._keep:
            self.kept[Path(path)] = state_dict
        else:
            self.digests[Path(path)] = save_hashed(
                state_dict, Path(path), zipfile=self._torch_engine.zipfile_serialization
            )

    def write_kept(self) -> dict[Path, FileDigest]:
        """Writes what ``save`` kept, in the order DeepSpeed saved it; returns every file this engine wrote."""
        while self.kept:
            path = next(iter(self.kept))
            self.digests[path] = save_hashed(
                self.kept.pop(path), path, zipfile=self._torch_engine.zipfile_serialization
            )
        return self.digests

    def __getattr__(self, name: str) -> Any:
        return getattr(self._torch_engine, name)


def _build_partitioned(recipe: ModelRecipe, config: dict[str, Any], *, is_main: bool) -> nn.Module:
    """The model built under ``deepspeed.zero.Init``: each module's parameters are partitioned over the
    ranks as soon as the module is constructed, so no rank ever holds more than its partition and one
    module.

    The model's own initialization (``init_weights``) then runs on partitioned parameters, which hold
    nothing locally: each in-place fill it makes is applied to its parameter gathered whole, one at a
    time. Every rank draws the same numbers from the same seed in the same order as a full build, so
    the weights equal every other strategy's. Initial weights (``trainer.init_from``) are copied in
    the same way, one parameter at a time.
    """
    import deepspeed

    if torch.distributed.is_initialized():  # zero.Init reads the world size from DeepSpeed's own view of it
        deepspeed.init_distributed(
            dist_backend=torch.distributed.get_backend(), auto_mpi_discovery=False, verbose=False
        )
    with deepspeed.zero.Init(config_dict_or_path=config), _FillsGathered():
        model = recipe.build()
    if recipe.initial_state is not None:
        source = recipe.initial_state()
        entries = model.state_dict(keep_vars=True)  # partitioned parameters know their full shape as ds_shape
        check_weights_fit({name: list(getattr(t, "ds_shape", t.shape)) for name, t in entries.items()}, source)
        with torch.no_grad():
            for name, tensor in model.named_parameters():  # a tied weight once
                # Gathered whole, one at a time; rank 0 alone reads it, and its copy is partitioned to all.
                with deepspeed.zero.GatheredParameters([tensor], modifier_rank=0):
                    if is_main:
                        tensor.data.copy_(source.read(name))
            for name, buffer in model.named_buffers():
                if name in entries:  # a non-persistent buffer is not part of the weights
                    buffer.copy_(source.read(name))
    # Adapters are built whole: they are small, and deepspeed.initialize partitions every parameter not yet
    # partitioned. DeepSpeed casts the whole model to the training dtype itself.
    recipe.finish(model, cast_frozen=False)
    return model


class _FillsGathered(TorchFunctionMode):
    """Applies in-place initialization to a partitioned ZeRO-3 parameter gathered whole."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        import deepspeed

        kwargs = kwargs or {}
        tensor = args[0] if args else kwargs.get("tensor")
        if getattr(func, "__name__", "") in INIT_FILLS and hasattr(tensor, "ds_id"):
            with deepspeed.zero.GatheredParameters([tensor], modifier_rank=0):
                return func(*args, **kwargs)
        return func(*args, **kwargs)


def _zero_memory(engine: Any, *, stage: int) -> MemoryReport:
    """The bytes DeepSpeed's own tensors hold on this rank, by kind.

    Reads DeepSpeed's internal buffers (checked against deepspeed 0.17-0.19): parameters are the
    module's (ZeRO-0/1/2) or their partitions ``ds_tensor`` (ZeRO-3); gradients are the module's
    ``.grad`` plus ZeRO's reduced partitions; the fp32 master copy ZeRO keeps of its partition (even
    when training in fp32) is reported apart from the optimizer's moments.
    """
    params = list(engine.module.parameters())
    optimizer = engine.optimizer
    inner = getattr(optimizer, "optimizer", optimizer)
    moments = [t for state in inner.state.values() for t in state.values() if torch.is_tensor(t) and t.dim() > 0]
    grads = [p.grad for p in params if p.grad is not None]
    if stage == 3:
        param_tensors = [p.ds_tensor for p in params]
        grads += [getattr(optimizer, "grad_partitions_flat_buffer", None)]
        master = getattr(optimizer, "fp32_partitioned_groups_flat", [])
    elif hasattr(optimizer, "fp32_groups_gradients_flat"):
        # ZeRO-1 in bf16 runs DeepSpeed's BF16_Optimizer: an unpartitioned fp32 gradient buffer.
        param_tensors = [p.data for p in params]
        grads += list(optimizer.fp32_groups_gradients_flat)
        master = optimizer.fp32_groups_flat_partition
    else:
        param_tensors = [p.data for p in params]
        averaged = getattr(optimizer, "averaged_gradients", {}) or {}
        grads += [t for group in (averaged.values() if isinstance(averaged, dict) else averaged) for t in group or []]
        master = getattr(optimizer, "single_partition_of_fp32_groups", [])
    return MemoryReport(
        param_bytes=tensor_bytes(param_tensors),
        grad_bytes=tensor_bytes(t for t in grads if t is not None),
        optimizer_bytes=tensor_bytes(moments),
        master_bytes=tensor_bytes(master),
    )


class _CastInputs(nn.Module):
    """The engine, called with floating-point inputs cast to its compute dtype (DeepSpeed casts the
    model to bf16/fp16 but not what is fed to it)."""

    def __init__(self, engine: nn.Module, dtype: torch.dtype | None) -> None:
        super().__init__()
        self.engine = engine
        self.dtype = dtype

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        if self.dtype is not None and inputs.is_floating_point():
            inputs = inputs.to(self.dtype)
        return self.engine(inputs)

    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]:
        return self.engine.module.parameters(recurse)


def read_weights(directory: Path) -> dict[str, torch.Tensor]:
    """The full fp32 model state dict of a DeepSpeed checkpoint, consolidated in one process."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    check_zero(directory)
    return get_fp32_state_dict_from_zero_checkpoint(str(directory), tag=TAG)


def stored_weights(directory: Path) -> dict[str, StoredTensor]:
    """DeepSpeed's ``zero_to_fp32`` in its lazy mode: the ranks' fp32 partitions are memory-mapped and a tensor
    is gathered from them when it is read (ZeRO-0/1/2 concatenate each parameter group's partitions into one
    fp32 vector when the source is opened)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    check_zero(directory)
    # zero_to_fp32 prints its progress and draws progress bars: not the command's output.
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        state = get_fp32_state_dict_from_zero_checkpoint(str(directory), tag=TAG, lazy_mode=True)
    # A gathered tensor's contiguous() assembles it from the ranks' partitions; a buffer is a tensor already.
    return {
        name: StoredTensor(shape=tuple(tensor.shape), dtype=tensor.dtype, read=tensor.contiguous)
        for name, tensor in state.items()
    }


def check_files(directory: Path) -> None:
    """``check_zero`` where DeepSpeed's files are (a checkpoint of another format has none)."""
    if (directory / TAG).is_dir():
        check_zero(directory)


def check_zero(directory: Path) -> None:
    """Walks every file DeepSpeed would ``torch.load`` from the checkpoint ``directory`` through the
    allow-list: ``UnsafeCheckpoint`` naming the file and the global for one that would run code."""
    unpickle.check_torch_files(sorted((directory / TAG).rglob("*.pt")), allowed=unpickle.DEEPSPEED, root=directory)


STRATEGIES = {name: ZeroStrategy for name in ZERO_STAGES}
