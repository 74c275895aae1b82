"""Launcher ``local``: N worker processes on this machine through torch's elastic launch API.

The same rendezvous torchrun's ``--standalone`` uses (a c10d store on a free loopback port), and the
same restart policy: when a worker dies, all are restarted, up to ``trainer.max_restarts`` times, and
each restart resumes from the run's newest valid checkpoint.
"""

from __future__ import annotations

import logging
import uuid
from pathlib import Path
from typing import Any

from orchestrator.config.schema import Config
from orchestrator.errors import TrainingError
from orchestrator.train.worker import run_worker


def launch_local(config: Config, run_dir: Path) -> dict[str, Any]:
    """Runs the job's workers to completion; returns rank 0's summary.

    Raises:
        TrainingError: the workers crashed more often than ``trainer.max_restarts`` allows.
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    logging.getLogger("torch.distributed.elastic").setLevel(logging.ERROR)
    launch_config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=config.launcher.num_workers,
        run_id=f"orchestrator-{uuid.uuid4().hex[:12]}",
        rdzv_backend="c10d",
        rdzv_endpoint="127.0.0.1:0",
        max_restarts=config.trainer.max_restarts,
        monitor_interval=0.1,
        start_method="spawn",
    )
    try:
        results = elastic_launch(launch_config, run_worker)(config, str(run_dir))
    except ChildFailedError as exc:
        raise TrainingError(_first_failure(exc, config.trainer.max_restarts)) from None
    return results[0]


def _first_failure(exc: Any, max_restarts: int) -> str:
    rank, failure = exc.get_first_failure()
    message = failure.message
    if isinstance(message, dict):  # an error file written by the worker: {"message": ..., "extraInfo": ...}
        message = message.get("message", message)
    if not message or "Signal" in str(message) or failure.signal_name() not in ("", "<N/A>"):
        message = f"exit code {failure.exitcode}" + (f" ({failure.signal_name()})" if failure.exitcode < 0 else "")
    return (f"worker rank {rank} failed after {max_restarts} restart(s): "
            f"{str(message).strip().splitlines()[-1] if str(message).strip() else message}")
