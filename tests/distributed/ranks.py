"""Runs a function on N CPU ranks (gloo), the way the launchers start workers, and collects the results."""

from __future__ import annotations

import os
import socket
from typing import Any, Callable

import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(
    rank: int, fn: Callable[..., Any], world_size: int, port: int, results: Any, args: tuple, kwargs: dict[str, Any]
) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    import warnings

    import torch

    from orchestrator.config.schema import Device
    from orchestrator.distributed import DistContext

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
    dist = DistContext.from_env(Device.cpu)
    dist.init_process_group(timeout_s=120)
    try:
        results[rank] = fn(dist, *args, **kwargs)
    finally:
        dist.destroy_process_group()


def run_ranks(fn: Callable[..., Any], *args: Any, world_size: int = 2, **kwargs: Any) -> list[Any]:
    """``fn(dist, *args, **kwargs)`` on every rank; returns each rank's (picklable) return value, by rank."""
    with mp.Manager() as manager:
        results = manager.dict()
        # Forked, as launcher=local starts CPU workers: the ranks start with this process's imports.
        mp.start_processes(
            _entry,
            args=(fn, world_size, _free_port(), results, args, kwargs),
            nprocs=world_size,
            join=True,
            start_method="fork",
        )
        return [results[rank] for rank in range(world_size)]
