"""What the driver knows of a strategy without importing torch: its ``StrategySpec``.

A strategy is one package under ``orchestrator/strategies/`` (and one YAML file per option under
``conf/strategy/``). The package's ``__init__`` is light: its config class, a ``SPECS`` tuple, and
what the driver asks before any worker starts (checkpoint format, memory model, checks). Its
``engine`` module, beside it, holds the torch implementation and is imported only when a worker
builds the strategy or a command reads a checkpoint. The engine module provides:

- ``STRATEGIES``: option name -> ``Strategy`` subclass, built as ``cls(cfg, settings=..., dist=...)``;
- ``read_weights(directory)``: the full model state dict of a verified checkpoint;
- ``stored_weights(directory)``: the same, each tensor read only when asked (``weights.StoredTensor``);
- ``check_files(directory)``: ``UnsafeCheckpoint`` for any file of the format that would run code.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType
from typing import ClassVar

from orchestrator.config.schema import Config, OptimConfig, Precision, StrategyConfig


@dataclass(frozen=True, kw_only=True)
class TrainingSettings:
    """The job's settings a strategy must agree with, beside its own ``strategy`` node."""

    precision: Precision
    micro_batch_size: int
    global_batch_size: int
    grad_accum_steps: int
    grad_clip: float
    optim: OptimConfig

    @classmethod
    def of(cls, config: Config) -> TrainingSettings:
        trainer = config.trainer
        return cls(
            precision=trainer.precision,
            micro_batch_size=trainer.micro_batch_size,
            global_batch_size=trainer.global_batch_size,
            grad_accum_steps=config.grad_accum_steps,
            grad_clip=trainer.grad_clip,
            optim=config.optim,
        )


@dataclass(frozen=True, kw_only=True)
class ModelShape:
    num_params: int
    largest_layer_params: int  # the module with the most parameters of its own (ZeRO-3's gather buffer)
    largest_block_params: int  # the largest repeated block (an FSDP2 unit)
    root_params: int  # everything outside the blocks (FSDP2's root unit: embeddings, head, final norm)
    trainable_params: int | None = None  # those with gradients and optimizer state (LoRA's adapters); None: all
    frozen_param_bytes: int = 4  # bytes of each frozen parameter (``model.lora.base_dtype``)
    layers: int | None = None  # transformer shape, for activations
    hidden: int | None = None
    heads: int | None = None
    vocab: int | None = None


@dataclass(frozen=True, kw_only=True)
class ModelStates:
    """Per-rank bytes of parameters, gradients and optimizer state under one plan."""

    sharded: int  # on the device: what each rank keeps between steps (the part memory reports measure)
    working: int  # on the device: buffers gathered for the computation (ZeRO-3's, FSDP2's unsharded units)
    host: int  # offloaded to host memory
    startup_host: int = 0  # host memory while the model is built (a whole fp32 model, unless the build is sharded)

    @property
    def device(self) -> int:
        return self.sharded + self.working


# Bytes per trainable parameter: (on every rank, sharded over N ranks, on the host sharded over N ranks).
BytesPerParam = tuple[int, int, int]


def model_states(
    per_param: BytesPerParam,
    shape: ModelShape,
    world_size: int,
    *,
    offload: str,
    frozen_bytes_each: int,
    shards_params: bool,
    working: int,
    builds_sharded: bool,
) -> ModelStates:
    """One plan's per-rank bytes from its bytes per trainable parameter.

    Frozen parameters (LoRA's base) hold their weights only, ``frozen_bytes_each`` bytes each: sharded where
    the strategy shards parameters (``shards_params``), on the host where ``offload`` moves parameters there.
    A plan that does not build only its shards (``builds_sharded``) holds a whole fp32 model in host memory
    while it builds it.
    """
    replicated, sharded, host = per_param
    psi = shape.num_params if shape.trainable_params is None else shape.trainable_params
    frozen_bytes = (shape.num_params - psi) * frozen_bytes_each
    frozen_host = frozen_bytes / world_size if "params" in offload else 0
    frozen_device = 0 if frozen_host else frozen_bytes / world_size if shards_params else frozen_bytes
    return ModelStates(
        sharded=int(replicated * psi + sharded * psi / world_size + frozen_device),
        working=working,
        host=int(host * psi / world_size + frozen_host),
        startup_host=0 if builds_sharded else 4 * shape.num_params,
    )


class StrategySpec:
    """One strategy as the driver sees it; a subclass per strategy, in its package's ``__init__``.

    ``options`` are the names ``strategy=`` takes (one YAML file each under ``conf/strategy/``);
    ``config`` is their schema dataclass, registered as the Hydra node ``schema/strategy/<schema>``;
    ``reshardable``: its checkpoints' optimizer state reshards when the number of ranks changes.
    """

    options: ClassVar[tuple[str, ...]]
    schema: ClassVar[str]
    config: ClassVar[type[StrategyConfig]]
    reshardable: ClassVar[bool] = False

    def checkpoint_format(self, option: str) -> str:
        """The name of the on-disk format ``option`` writes; two options read each other's checkpoints when
        their formats are equal."""
        raise NotImplementedError

    def plans(self, option: str) -> tuple[str, ...]:
        """The offload settings ``orchestrator estimate`` compares for ``option`` (none: not compared)."""
        return ()

    def memory(
        self, option: str, offload: str, precision: Precision, shape: ModelShape, world_size: int
    ) -> ModelStates:
        """Per-rank memory of one of ``plans(option)``."""
        raise ValueError(f"strategy={option} has no memory model")

    def check(self, cfg: StrategyConfig, settings: TrainingSettings, *, on_gpu: bool) -> None:
        """The driver's checks of ``cfg`` beyond its schema's: ``UserError`` naming the key."""

    def worker_env(self, *, on_gpu: bool) -> dict[str, str]:
        """Environment variables a worker sets before it imports anything of the strategy's."""
        return {}

    def engine(self) -> ModuleType:
        """The torch implementation: the ``engine`` module beside this spec, imported on first use."""
        return importlib.import_module(f"{type(self).__module__}.engine")
