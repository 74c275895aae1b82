"""Replicated strategies: one process (``strategy=none``) and DistributedDataParallel (``strategy=ddp``).

Every rank holds the whole model and optimizer; rank 0 alone writes them, as plain state dicts of the
unwrapped module (format ``replicated``), which reshard to any number of ranks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

from orchestrator.config.schema import Precision, StrategyConfig, positive
from orchestrator.strategies.spec import ModelShape, ModelStates, StrategySpec, model_states


@dataclass(kw_only=True)
class SingleStrategyConfig(StrategyConfig):
    """One process, no data parallelism."""

    name: str = "none"
    max_world_size: ClassVar[Optional[int]] = 1


@dataclass(kw_only=True)
class DDPConfig(StrategyConfig):
    """torch DistributedDataParallel: every rank holds the whole model; gradients are all-reduced."""

    name: str = "ddp"
    bucket_cap_mb: int = 25
    find_unused_parameters: bool = False
    static_graph: bool = False
    gradient_as_bucket_view: bool = True

    def __post_init__(self) -> None:
        positive("strategy", bucket_cap_mb=self.bucket_cap_mb)


class _Replicated(StrategySpec):
    reshardable = True

    def checkpoint_format(self, option: str) -> str:
        return "replicated"

    def memory(
        self, option: str, offload: str, precision: Precision, shape: ModelShape, world_size: int
    ) -> ModelStates:
        # fp32 parameters, gradients and Adam's two moments on every rank, whatever the precision: 16Ψ.
        return model_states(
            (16, 0, 0),
            shape,
            world_size,
            offload=offload,
            frozen_bytes_each=shape.frozen_param_bytes,
            shards_params=False,
            working=0,
            builds_sharded=False,
        )


class SingleSpec(_Replicated):
    options = ("none",)
    schema = "none"
    config = SingleStrategyConfig


class DDPSpec(_Replicated):
    options = ("ddp",)
    schema = "ddp"
    config = DDPConfig

    def plans(self, option: str) -> tuple[str, ...]:
        return ("none",)


SPECS = (SingleSpec(), DDPSpec())
