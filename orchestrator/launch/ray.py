"""Launcher ``ray``: Ray Train's ``TorchTrainer`` runs the same worker function as ``launcher=local``.

With no ``launcher.address`` an embedded Ray is started for the run, sized to this machine, and shut
down after it; with ``auto`` or ``host:port`` the run joins that cluster. Ray Train starts the
workers, sets the torchrun variables and joins them in a process group (gloo on CPU, nccl on GPUs);
the worker then trains exactly as under ``launcher=local``.

The run dir is Ray Train's experiment directory (``storage_path`` = its parent, ``name`` = its
name), so the checkpoints our atomic protocol writes are already in Ray's storage: each one is
registered with Ray Train as it completes, without a copy. When a worker dies, Ray Train restarts
the worker group (``FailureConfig(max_failures=trainer.max_restarts)``), and the restarted workers
resume from the run's newest valid checkpoint.
"""

from __future__ import annotations

import logging
import os
import socket
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from orchestrator.config.schema import Config
from orchestrator.errors import LaunchError, UserError, first_line
from orchestrator.fsutil import write_atomic
from orchestrator.launch.trial_channel import eval_reporter
from orchestrator.launchers.ray import RayLauncherConfig
from orchestrator.launchers.ray_compat import (
    LOOPBACK_IP,
    init_on_loopback,
    is_capacity_timeout,
    keep_loopback,
    quiet_token_setup_warning,
)
from orchestrator.launchers.spec import uses_gpu

# Ray Train reads it in its controller: how long a worker group may wait to be placed.
WORKER_GROUP_START_TIMEOUT_S_ENV_VAR = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
# Tries a worker group gets to start (after the first, each one counts as a controller failure).
START_ATTEMPTS = 4
# Where Ray's State API clients (in actors too) find the dashboard.
API_SERVER_ENV_VAR = "RAY_API_SERVER_ADDRESS"
# Ray Train's record of the checkpoints a run registered, in its experiment directory (the run dir).
RAY_TRAIN_SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"

# Ray Train's own console chatter (worker group started, results reported) and Ray's usage stats.
_QUIET = {
    "RAY_TRAIN_ENABLE_CONTROLLER_STRUCTURED_LOGGING": "0",
    "RAY_TRAIN_ENABLE_WORKER_STRUCTURED_LOGGING": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
}


def launch_ray(config: Config, run_dir: Path) -> dict[str, Any]:
    """Trains the job on Ray Train workers; returns rank 0's summary (see ``run_on_ray``)."""
    return run_on_ray(
        config,
        run_dir,
        worker=_train_worker,
        loop_config={"config": config, "run_dir": str(run_dir), "launch": uuid.uuid4().hex},
    )


def run_on_ray(
    config: Config, run_dir: Path, *, worker: Callable[[dict[str, Any]], Any], loop_config: dict[str, Any]
) -> Any:
    """Runs ``worker(loop_config)`` in each of the job's Ray Train workers; returns rank 0's return value.

    Args:
        config: the job: its launcher settings, device and ``trainer.max_restarts``.
        run_dir: the run directory, also Ray Train's experiment directory.
        worker: the function every worker runs, inside the process group Ray Train has set up.
        loop_config: its argument (pickled to the workers).

    Raises:
        LaunchError: the workers failed more often than ``trainer.max_restarts`` allows.
        UserError: the cluster cannot be reached.
    """
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig, TrainingFailedError
    from ray.train.torch import TorchConfig, TorchTrainer

    launcher = config.launcher
    assert isinstance(launcher, RayLauncherConfig)
    on_gpu = uses_gpu(config)
    started_here = _connect(launcher)
    resources = {"CPU": launcher.cpus_per_worker, **({"GPU": 1} if on_gpu else {})}
    # Ray Train retries a worker group that fails to start forever by default. Here it gets
    # START_ATTEMPTS tries of capacity_timeout_s / START_ATTEMPTS each: a start that fails at once (a
    # node died while the group was placed) is retried, and no capacity fails the run in capacity_timeout_s.
    failure_config = FailureConfig(
        max_failures=config.trainer.max_restarts, controller_failure_limit=START_ATTEMPTS - 1
    )
    # Ray Train starts from the run dir's list of the checkpoints registered before, and refuses to start
    # when one of them is gone: a run continued after its driver died, whose older checkpoints were pruned
    # (trainer.checkpoint.keep). The loop finds the checkpoint to continue from itself; Ray's list starts anew.
    (run_dir / RAY_TRAIN_SNAPSHOT_FILE).unlink(missing_ok=True)
    trainer = TorchTrainer(
        worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=launcher.num_workers,
            use_gpu=on_gpu,
            resources_per_worker=resources,
            placement_strategy=launcher.placement.value,
        ),
        torch_config=TorchConfig(backend="nccl" if on_gpu else "gloo"),
        run_config=RunConfig(
            name=run_dir.name, storage_path=str(run_dir.resolve().parent), failure_config=failure_config
        ),
    )
    try:
        result = trainer.fit()
    except TrainingFailedError as exc:  # worker errors past max_failures, or the controller's own
        if is_capacity_timeout(exc):
            raise LaunchError(
                f"the Ray cluster had no room for {launcher.num_workers} worker(s) x "
                f"{_format_resources(resources)} within launcher.capacity_timeout_s="
                f"{launcher.capacity_timeout_s:g}; {_capacity_report(resources)}"
            ) from None
        raise LaunchError(
            f"the Ray workers failed after {config.trainer.max_restarts} restart(s) "
            f"(trainer.max_restarts): {_describe_failure(exc)}"
        ) from None
    finally:
        if started_here:
            ray.shutdown()
    return result.return_value


def _format_resources(resources: dict[str, float]) -> str:
    return "{" + ", ".join(f"{name}: {amount:g}" for name, amount in resources.items()) + "}"


def _capacity_report(resources: dict[str, float]) -> str:
    """What the cluster has now, for each resource a worker asks for."""
    import ray

    alive = [node for node in ray.nodes() if node["Alive"]]
    free = ray.available_resources()
    total = ray.cluster_resources()
    have = ", ".join(f"{name}: {free.get(name, 0):g} free of {total.get(name, 0):g}" for name in resources)
    return f"the cluster has {len(alive)} node(s), {have}"


@contextmanager
def ray_session(launcher: RayLauncherConfig) -> Iterator[None]:
    """One connection (or one embedded Ray) for several runs in this process, as ``orchestrator scale``
    makes: each run's ``launch_ray`` finds Ray initialized and leaves it up, and it stops here at the end."""
    import ray

    started_here = _connect(launcher)
    try:
        yield
    finally:
        if started_here:
            ray.shutdown()


def _connect(launcher: RayLauncherConfig) -> bool:
    """Connects to the cluster, or starts an embedded Ray; True when this process started it."""
    import ray

    os.environ.update({key: value for key, value in _QUIET.items() if key not in os.environ})
    # Ray Train passes it from the driver's environment to its controller.
    os.environ[WORKER_GROUP_START_TIMEOUT_S_ENV_VAR] = str(launcher.capacity_timeout_s / START_ATTEMPTS)
    if ray.is_initialized():
        return False
    env_vars = dict(_QUIET)
    if launcher.address is None:
        # A new Ray even where `ray start` left a cluster running, every server of it on 127.0.0.1. The
        # dashboard serves Ray's State API, which Ray Train's placement-group cleaner polls; the cleaner
        # is told where it is (it would otherwise ask whatever cluster /tmp/ray/ray_current_cluster
        # names, and take a training run's actors for dead there).
        dashboard_port = _free_port()
        env_vars[API_SERVER_ENV_VAR] = f"http://{LOOPBACK_IP}:{dashboard_port}"
        quiet_token_setup_warning()
        # Nothing preempts this machine's own Ray: no watcher (Ray Train passes the driver's setting on).
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        init_on_loopback(
            num_cpus=os.cpu_count(),
            include_dashboard=True,
            dashboard_host=LOOPBACK_IP,
            dashboard_port=dashboard_port,
            logging_level=logging.WARNING,
            log_to_driver=True,
            runtime_env={"env_vars": env_vars},
        )
        return True
    keep_loopback()  # 127.0.0.1:PORT (a `cluster up` cluster, which listens on loopback only) stays itself
    try:
        ray.init(address=launcher.address, logging_level=logging.WARNING, runtime_env={"env_vars": env_vars})
    except (ConnectionError, RuntimeError) as exc:
        raise UserError(
            f"launcher.address={launcher.address}: cannot connect to a Ray cluster there ({first_line(exc)})"
        ) from None
    return False


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind((LOOPBACK_IP, 0))
        return probe.getsockname()[1]


def _train_worker(loop_config: dict[str, Any]) -> dict[str, Any]:
    """Runs in every Ray Train worker: the shared worker function, checkpoints registered with Ray."""
    import ray.train
    from ray.train import Checkpoint
    from ray.train.collective import broadcast_from_rank_zero
    from ray.train.v2.api.report_config import CheckpointUploadMode

    from orchestrator.train.worker import run_worker  # lazy: imports torch; runs in the Ray worker

    rank = ray.train.get_context().get_world_rank()

    def register(directory: Path, step: int) -> None:
        # Every rank must report (it is a barrier); rank 0 names the checkpoint, already in place.
        checkpoint = Checkpoint.from_directory(str(directory)) if rank == 0 else None
        ray.train.report({"step": step}, checkpoint=checkpoint, checkpoint_upload_mode=CheckpointUploadMode.NO_UPLOAD)

    restarts = broadcast_from_rank_zero(
        _count_start(Path(loop_config["run_dir"]), loop_config["launch"]) if rank == 0 else None
    )
    return run_worker(
        loop_config["config"],
        loop_config["run_dir"],
        restarts=restarts,
        on_checkpoint=register,
        on_eval=eval_reporter(loop_config["run_dir"]),
    )


def _count_start(run_dir: Path, launch: str) -> int:
    """How often this launch's worker group started before (its restarts), counted in the run dir.

    Ray Train's ``get_checkpoint()`` cannot tell: its controller learns of a reported checkpoint
    only when it next polls the workers, so a group restarted right after a save starts without it.
    """
    counter = run_dir / ".ray-starts" / launch
    counter.parent.mkdir(parents=True, exist_ok=True)
    before = int(counter.read_text()) if counter.exists() else 0
    write_atomic(counter, str(before + 1))
    return before


def _describe_failure(exc: BaseException) -> str:
    """The lowest failed rank's error: Ray's own message starts with a header line that names nothing."""
    from ray.train import WorkerGroupError

    if isinstance(exc, WorkerGroupError) and exc.worker_failures:
        rank = min(exc.worker_failures)
        return f"worker rank {rank}: {first_line(exc.worker_failures[rank])}"
    return first_line(exc)
