"""The process group as the loop and the strategies see it: ranks, the device, and a few collectives.

Every launcher (torch elastic, Ray Train) starts workers with the torchrun environment variables set
(RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT); ``DistContext.from_env``
reads them and nothing else does.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from orchestrator.config.schema import Device


@dataclass(frozen=True, kw_only=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_env(cls, device: Device) -> "DistContext":
        """Reads the torchrun variables (a single process when they are absent) and picks the device."""
        rank = int(os.environ.get("RANK", 0))
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        use_cuda = device is Device.cuda or (device is Device.auto and torch.cuda.is_available())
        if use_cuda:
            torch_device = torch.device("cuda", local_rank)
            torch.cuda.set_device(torch_device)
        else:
            torch_device = torch.device("cpu")
        return cls(
            rank=rank,
            world_size=int(os.environ.get("WORLD_SIZE", 1)),
            local_rank=local_rank,
            local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", 1)),
            device=torch_device,
        )

    # ------------------------------------------------------------------------------------- lifecycle

    def init_process_group(self, *, timeout_s: float = 600.0) -> None:
        """Joins the default process group: nccl on GPUs, gloo on CPU. A no-op for one process."""
        if not self.is_distributed or dist.is_initialized():
            return
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        dist.init_process_group(
            backend=backend,
            rank=self.rank,
            world_size=self.world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
            device_id=self.device if self.device.type == "cuda" else None,
        )

    def destroy_process_group(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()

    # ----------------------------------------------------------------------------------- collectives

    def barrier(self) -> None:
        if self.is_distributed:
            dist.barrier()

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sums ``tensor`` over ranks in place (gloo has no AVG, so averages divide by world size)."""
        if self.is_distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def broadcast_object(self, obj: Any, *, src: int = 0) -> Any:
        """Rank ``src``'s ``obj`` on every rank."""
        if not self.is_distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def all_gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, as a list by rank, on every rank."""
        if not self.is_distributed:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def gather_objects(self, obj: Any) -> list[Any] | None:
        """Every rank's ``obj`` as a list on rank 0, ``None`` elsewhere."""
        if not self.is_distributed:
            return [obj]
        out: list[Any] | None = [None] * self.world_size if self.is_main else None
        dist.gather_object(obj, out, dst=0)
        return out
