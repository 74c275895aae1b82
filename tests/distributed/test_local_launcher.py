"""``launcher=local``: the rendezvous store and everything the workers open listen on loopback, through a
restart too."""

from __future__ import annotations

import ipaddress
import os

import psutil
import torch.distributed as dist
from torch.distributed.launcher.api import elastic_launch

from orchestrator.config.compose import compose, to_config
from orchestrator.launch.local import launch_config


def _listening_in_launch() -> list[tuple[str, int]]:
    """The LISTEN sockets of the launcher (this worker's parent) and all its workers."""
    launcher = psutil.Process(os.getppid())
    found = []
    for process in [launcher, *launcher.children(recursive=True)]:
        found += [
            (c.laddr.ip, c.laddr.port) for c in process.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN
        ]
    return found


def _worker() -> tuple[str, list[tuple[str, int]] | None]:
    """Dies in the first round; in the second, rank 0 lists the sockets while every rank holds its
    process group."""
    if os.environ["TORCHELASTIC_RESTART_COUNT"] == "0":
        os._exit(1)
    dist.init_process_group("gloo")
    dist.barrier()
    listening = _listening_in_launch() if dist.get_rank() == 0 else None
    dist.barrier()
    dist.destroy_process_group()
    return os.environ["MASTER_ADDR"], listening


def test_the_launcher_and_its_workers_listen_on_loopback_only() -> None:
    config = to_config(
        compose(["job=gpt_tiny_cpu", "launcher=local", "launcher.num_workers=2", "trainer.max_restarts=1"])
    )
    results = elastic_launch(launch_config(config), _worker)()

    master_addr, listening = results[0]
    assert master_addr == "127.0.0.1"
    assert len({port for _, port in listening}) >= 2  # the store, and gloo's
    assert [(ip, port) for ip, port in listening if not ipaddress.ip_address(ip).is_loopback] == []
