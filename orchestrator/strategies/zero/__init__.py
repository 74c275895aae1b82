"""DeepSpeed ZeRO stages 0-3 (``strategy=zero0|zero1|zero2|zero3``), with CPU offload.

Each stage partitions its state its own way (format ``deepspeed-zero<stage>``): a checkpoint resumes at
the world size it was written at. The memory model is the ZeRO paper's with the tensors DeepSpeed adds
(``orchestrator estimate``'s docs give the table).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING

from orchestrator.config.schema import Offload, Precision, StrategyConfig, require
from orchestrator.errors import UserError
from orchestrator.strategies.spec import BytesPerParam, ModelShape, ModelStates, StrategySpec, TrainingSettings
from orchestrator.strategies.spec import model_states as states_of
from orchestrator.strategies.zero.ds_config import deepspeed_config, unknown_keys

ZERO_STAGES = {"zero0": 0, "zero1": 1, "zero2": 2, "zero3": 3}

# Bytes per parameter by (stage, offload): (on every rank, sharded over N ranks, on the host sharded over N
# ranks). The paper's figures plus what DeepSpeed keeps beside them: an fp32 partition of the gradients
# (+4Ψ/N, mixed precision) and an fp32 master copy of the parameter partition even in fp32 (+4Ψ/N).
_MIXED: dict[tuple[int, str], BytesPerParam] = {
    (1, "none"): (4, 16, 0),
    (1, "optimizer"): (4, 0, 16),
    (2, "none"): (2, 18, 0),
    (2, "optimizer"): (2, 0, 16),
    (3, "none"): (0, 18, 0),
    (3, "optimizer"): (0, 2, 16),
    (3, "params+optimizer"): (0, 0, 18),
}
_FP32: dict[tuple[int, str], BytesPerParam] = {
    (1, "none"): (8, 12, 0),
    (1, "optimizer"): (8, 0, 12),
    (2, "none"): (4, 16, 0),
    (2, "optimizer"): (4, 0, 16),
    (3, "none"): (0, 20, 0),
    (3, "optimizer"): (0, 4, 16),
    (3, "params+optimizer"): (0, 0, 20),
}
# ZeRO-1 in bf16 (without offload) is DeepSpeed's BF16_Optimizer: bf16 parameters and gradients, and an
# unpartitioned fp32 gradient accumulation buffer.
_BF16: dict[tuple[int, str], BytesPerParam] = {(1, "none"): (8, 12, 0)}


@dataclass(kw_only=True)
class ZeroConfig(StrategyConfig):
    """DeepSpeed ZeRO stage 0-3, named ``zero0`` ... ``zero3``.

    The DeepSpeed JSON is generated from the job's own settings (batch sizes, accumulation, clipping,
    precision); ``deepspeed_overrides`` is merged into it, and may set what the job does not (for
    example ``zero_optimization.overlap_comm``) but not contradict it.
    """

    name: str = MISSING
    offload_optimizer: Offload = Offload.none
    offload_params: Offload = Offload.none
    deepspeed_overrides: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        require(
            self.name in ZERO_STAGES,
            f"strategy.name={self.name!r} is not a ZeRO stage; choose one of: {', '.join(ZERO_STAGES)}",
        )
        if self.offload_optimizer is Offload.cpu:
            require(self.stage >= 1, "strategy.offload_optimizer=cpu needs ZeRO stage 1, 2 or 3 (strategy=zero1|2|3)")
        if self.offload_params is Offload.cpu:
            require(
                self.stage == 3,
                "strategy.offload_params=cpu needs strategy=zero3 "
                "(ZeRO-1 and ZeRO-2 keep the full parameters on every rank)",
            )

    @property
    def stage(self) -> int:
        return ZERO_STAGES[self.name]


class ZeroSpec(StrategySpec):
    options = tuple(ZERO_STAGES)
    schema = "zero"
    config = ZeroConfig

    def checkpoint_format(self, option: str) -> str:
        return f"deepspeed-{option}"

    def plans(self, option: str) -> tuple[str, ...]:
        return tuple(offload for stage, offload in _MIXED if stage == ZERO_STAGES[option])

    def memory(
        self, option: str, offload: str, precision: Precision, shape: ModelShape, world_size: int
    ) -> ModelStates:
        stage = ZERO_STAGES[option]
        mixed = precision is not Precision.fp32
        table = _BF16 if precision is Precision.bf16 else _MIXED if mixed else _FP32
        per_param = table.get((stage, offload)) or _MIXED.get((stage, offload))
        if per_param is None:
            return super().memory(option, offload, precision, shape, world_size)
        return states_of(
            per_param,
            shape,
            world_size,
            offload=offload,
            # DeepSpeed casts the whole module to the compute dtype, frozen parameters too.
            frozen_bytes_each=min(shape.frozen_param_bytes, 2 if mixed else 4),
            shards_params=stage == 3,
            working=4 * shape.largest_layer_params if stage == 3 else 0,  # ZeRO-3 gathers a layer at a time
            builds_sharded=stage == 3,  # under deepspeed.zero.Init
        )

    def check(self, cfg: StrategyConfig, settings: TrainingSettings, *, on_gpu: bool) -> None:
        """The generated DeepSpeed config with the overrides, as DeepSpeed itself parses it."""
        assert isinstance(cfg, ZeroConfig)
        os.environ.update(self.worker_env(on_gpu=on_gpu))
        unknown = unknown_keys(deepspeed_config(cfg, settings, on_gpu=on_gpu))
        if unknown:
            raise UserError(
                f"strategy.deepspeed_overrides: {', '.join(unknown)} "
                f"{'is not a DeepSpeed setting' if len(unknown) == 1 else 'are not DeepSpeed settings'} "
                f"(https://www.deepspeed.ai/docs/config-json/)"
            )
        if settings.precision is Precision.fp16 and not on_gpu:
            from deepspeed.accelerator import get_accelerator

            if not get_accelerator().is_fp16_supported():
                raise UserError(
                    f"trainer.precision=fp16: DeepSpeed does not support fp16 on this CPU with "
                    f"strategy={cfg.name}; use trainer.precision=bf16 or fp32"
                )

    def worker_env(self, *, on_gpu: bool) -> dict[str, str]:
        # DeepSpeed picks its accelerator when first imported: make it the worker's device, not a guess.
        return {"DS_ACCELERATOR": "cuda" if on_gpu else "cpu"}


SPECS = (ZeroSpec(),)
