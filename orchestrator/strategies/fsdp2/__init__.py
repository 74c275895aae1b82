"""torch FSDP2 (``strategy=fsdp2``): ``fully_shard`` per repeated block, then the root.

Checkpoints are torch.distributed.checkpoint shards (format ``dcp``), which reshard to any number of ranks.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from orchestrator.config.schema import Offload, Precision, StrategyConfig
from orchestrator.strategies.spec import ModelShape, ModelStates, StrategySpec, model_states

# init_device=auto builds models this large on the meta device: a full fp32 copy per rank (4 GB at
# 1B parameters) is no longer cheap, and sharded initialization draws different (equally good) weights.
META_INIT_MIN_PARAMS = 250_000_000


class InitDevice(str, Enum):
    auto = "auto"
    cpu = "cpu"
    meta = "meta"


@dataclass(kw_only=True)
class FSDP2Config(StrategyConfig):
    """torch FSDP2 (``fully_shard``): parameters, gradients and optimizer state sharded over ranks.

    ``fully_shard`` is applied to each repeated block, then the root. ``init_device=cpu`` builds the
    whole model on every rank and shards it (the same initial weights as every other strategy);
    ``meta`` builds it on the meta device and initializes only the local shards (no full copy
    anywhere, for models that do not fit in host memory). ``auto`` (the default) is ``meta`` when
    the weights come from a file (``trainer.init_from``) or the model has ``META_INIT_MIN_PARAMS``
    parameters or more, ``cpu`` otherwise. ``offload_params=cpu`` keeps parameters, gradients and
    optimizer state in host memory (``CPUOffloadPolicy``), stepping on the CPU.
    """

    name: str = "fsdp2"
    reshard_after_forward: bool = True
    offload_params: Offload = Offload.none
    init_device: InitDevice = InitDevice.auto


class FSDP2Spec(StrategySpec):
    options = ("fsdp2",)
    schema = "fsdp2"
    config = FSDP2Config
    reshardable = True

    def checkpoint_format(self, option: str) -> str:
        return "dcp"

    def plans(self, option: str) -> tuple[str, ...]:
        return ("none", "params")

    def memory(
        self, option: str, offload: str, precision: Precision, shape: ModelShape, world_size: int
    ) -> ModelStates:
        # 16Ψ/N of fp32 state, on the device or (offload_params=cpu) the host, at any precision.
        per_param = (0, 0, 16) if offload == "params" else (0, 16, 0)
        compute_bytes = 4 if precision is Precision.fp32 else 2
        return model_states(
            per_param,
            shape,
            world_size,
            offload=offload,
            frozen_bytes_each=shape.frozen_param_bytes,
            shards_params=True,
            # Unsharded parameters and gradients in the compute dtype: the root unit (kept between forward
            # and backward), the block being computed and the one prefetched.
            working=2 * compute_bytes * (shape.root_params + 2 * shape.largest_block_params),
            # init_device=auto builds large models on the meta device, each rank only its shards.
            builds_sharded=shape.num_params >= META_INIT_MIN_PARAMS,
        )


SPECS = (FSDP2Spec(),)
