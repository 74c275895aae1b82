"""Launcher ``local``: N worker processes on this machine through torch's elastic launch API.

The same rendezvous torchrun's ``--standalone`` uses (a c10d store on a free loopback port), and the
same restart policy: when a worker dies, all are restarted, up to ``trainer.max_restarts`` times, and
each restart resumes from the run's newest valid checkpoint.

CPU workers are forked from the launcher, so they start with torch and orchestrator already imported
(half the CPU time of a spawned worker's start-up, which imports them again). GPU workers are spawned:
a CUDA runtime touched before a fork is unusable in the children.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestrator.config.checks import uses_gpu
from orchestrator.config.schema import Config
from orchestrator.errors import LaunchError
from orchestrator.train.worker import run_worker

if TYPE_CHECKING:
    from torch.distributed.launcher.api import LaunchConfig


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
    # torch elastic shares one TCPStore across restart rounds by default, and the gloo addresses the
    # killed round published stay in it: a restarted rank can read a dead peer's address before the new
    # one overwrites it and fail to connect. A fresh store per round (rank 0 hosts it) has no stale keys.
    os.environ["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    return LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=config.launcher.num_workers,
        run_id=f"orchestrator-{uuid.uuid4().hex[:12]}",
        rdzv_backend="c10d",
        rdzv_endpoint="127.0.0.1:0",
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
    return run_worker(config, run_dir)


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
