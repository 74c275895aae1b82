"""Launcher ``local``: N worker processes on this machine through torch's elastic launch API.

torchrun ``--standalone``'s restart policy: when a worker dies, all are restarted, up to
``trainer.max_restarts`` times, and each restart resumes from the run's newest valid checkpoint. Its
rendezvous is this module's own (``_LoopbackRendezvous``): nothing the launcher or its workers start
listens beyond 127.0.0.1.

CPU workers are forked from the launcher, so they start with torch and orchestrator already imported
(half the CPU time of a spawned worker's start-up, which imports them again). GPU workers are spawned:
a CUDA runtime touched before a fork is unusable in the children.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil
from torch.distributed import TCPStore
from torch.distributed.elastic.rendezvous import (
    RendezvousHandler,
    RendezvousInfo,
    RendezvousParameters,
    RendezvousStoreInfo,
    rendezvous_handler_registry,
)

from orchestrator.config.schema import Config
from orchestrator.errors import LaunchError
from orchestrator.launchers.spec import uses_gpu
from orchestrator.train.worker import run_worker

if TYPE_CHECKING:
    from torch.distributed.launcher.api import LaunchConfig

LOOPBACK_IP = "127.0.0.1"
RENDEZVOUS_BACKEND = "orchestrator-loopback"


def launch_local(config: Config, run_dir: Path) -> dict[str, Any]:
    """Runs the job's workers to completion; returns rank 0's summary.

    Raises:
        LaunchError: the workers crashed more often than ``trainer.max_restarts`` allows.
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import elastic_launch

    try:
        results = elastic_launch(launch_config(config), _worker)(config, str(run_dir))
    except ChildFailedError as exc:
        raise LaunchError(first_failure(exc, config.trainer.max_restarts)) from None
    return results[0]


def launch_config(config: Config) -> LaunchConfig:
    """torchrun ``--standalone``'s settings for the job's workers on this machine."""
    from torch.distributed.launcher.api import LaunchConfig

    _condense_elastic_logs()
    rendezvous_handler_registry.register(RENDEZVOUS_BACKEND, _LoopbackRendezvous)  # again: a no-op
    return LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=config.launcher.num_workers,
        run_id=f"orchestrator-{uuid.uuid4().hex[:12]}",
        rdzv_backend=RENDEZVOUS_BACKEND,
        rdzv_endpoint=f"{LOOPBACK_IP}:0",
        local_addr=LOOPBACK_IP,
        max_restarts=config.trainer.max_restarts,
        monitor_interval=0.1,
        start_method="spawn" if uses_gpu(config) else "fork",
    )


def _worker(config: Config, run_dir: str) -> dict[str, Any]:
    """One local worker: named after its rank in ``ps``, with default signal handling, then ``run_worker``."""
    # A forked worker inherits the agent's handlers, which turn SIGTERM into an exception; a worker is
    # stopped by SIGTERM and interrupted by SIGINT, as a spawned one is.
    for name in ("SIGTERM", "SIGHUP", "SIGQUIT"):
        signal.signal(getattr(signal, name), signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    with contextlib.suppress(OSError):  # Linux: the process name that ps, top and psutil show
        Path("/proc/self/comm").write_text(f"orch-rank{os.environ.get('RANK', '0')}")
    # gloo listens on the address this machine's hostname resolves to, unless told an interface.
    loopback = _loopback_interface()
    if loopback:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", loopback)
    return run_worker(config, run_dir)


def _loopback_interface() -> str | None:
    """The name of the network interface that holds 127.0.0.1 (``lo`` on Linux)."""
    for name, addresses in psutil.net_if_addrs().items():
        if any(address.address == LOOPBACK_IP for address in addresses):
            return name
    return None


class _LoopbackRendezvous(RendezvousHandler):
    """The rendezvous of one agent on this machine: each round a new TCPStore on a socket bound to
    127.0.0.1, which the workers use too (``use_agent_store``).

    torch's c10d rendezvous (torchrun ``--standalone``'s) and rank 0's process-group store listen on
    every interface, whatever address they are given; a store listens on 127.0.0.1 only on a socket
    bound there first (``master_listen_fd``). A new store per round also keeps a restarted round from
    reading the killed round's keys: a dead peer's gloo address, read before the new one overwrites it.
    """

    def __init__(self, params: RendezvousParameters) -> None:
        self._run_id = params.run_id
        self._store: TCPStore | None = None
        self._closed = False

    def get_backend(self) -> str:
        return RENDEZVOUS_BACKEND

    @property
    def use_agent_store(self) -> bool:
        return True

    def next_rendezvous(self) -> RendezvousInfo:
        listener = socket.socket()
        listener.bind((LOOPBACK_IP, 0))
        port = listener.getsockname()[1]
        self._store = TCPStore(
            LOOPBACK_IP,
            port,
            is_master=True,
            multi_tenant=True,
            wait_for_workers=False,
            master_listen_fd=listener.detach(),
        )
        return RendezvousInfo(
            self._store,
            rank=0,
            world_size=1,
            bootstrap_store_info=RendezvousStoreInfo(master_addr=LOOPBACK_IP, master_port=port),
        )

    def is_closed(self) -> bool:
        return self._closed

    def set_closed(self) -> None:
        self._closed = True

    def num_nodes_waiting(self) -> int:
        return 0

    def get_run_id(self) -> str:
        return self._run_id

    def shutdown(self) -> bool:
        self._store = None
        return True


class _OneLineFormatter(logging.Formatter):
    """torch elastic logs a worker's death with the agent's own traceback: keep the one line that matters."""

    def format(self, record: logging.LogRecord) -> str:
        first_line = record.getMessage().strip().splitlines()[0]
        return f"warning: {first_line}"


def _condense_elastic_logs() -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(_OneLineFormatter())
    elastic = logging.getLogger("torch.distributed.elastic")
    elastic.handlers[:] = [handler]
    elastic.setLevel(logging.WARNING)
    elastic.propagate = False


def first_failure(exc: Any, max_restarts: int) -> str:
    """One line for torch elastic's ``ChildFailedError``: the first rank that failed, and how."""
    rank, failure = exc.get_first_failure()
    if failure.exitcode < 0:
        reason = f"killed by {failure.signal_name()}"
    elif isinstance(failure.message, dict):  # the worker raised: its error file holds "Type: message"
        reason = str(failure.message.get("message", "")).strip().splitlines()[0]
    else:
        reason = f"exit code {failure.exitcode}"
    return f"worker rank {rank} failed ({reason}) after {max_restarts} restart(s) (trainer.max_restarts)"
