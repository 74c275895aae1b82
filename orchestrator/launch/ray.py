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
from pathlib import Path
from typing import Any

from orchestrator.config.checks import uses_gpu
from orchestrator.config.schema import Config, RayLauncherConfig
from orchestrator.errors import LaunchError, UserError

# Ray Train's own console chatter (worker group started, results reported) and Ray's usage stats.
_QUIET = {"RAY_TRAIN_ENABLE_CONTROLLER_STRUCTURED_LOGGING": "0", "RAY_TRAIN_ENABLE_WORKER_STRUCTURED_LOGGING": "0",
          "RAY_USAGE_STATS_ENABLED": "0", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}


def launch_ray(config: Config, run_dir: Path) -> dict[str, Any]:
    """Runs the job's workers to completion through Ray Train; returns rank 0's summary.

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
    trainer = TorchTrainer(
        _train_worker,
        train_loop_config={"config": config, "run_dir": str(run_dir)},
        scaling_config=ScalingConfig(num_workers=launcher.num_workers, use_gpu=on_gpu,
                                     resources_per_worker=resources, placement_strategy=launcher.placement.value),
        torch_config=TorchConfig(backend="nccl" if on_gpu else "gloo"),
        run_config=RunConfig(name=run_dir.name, storage_path=str(run_dir.resolve().parent),
                             failure_config=FailureConfig(max_failures=config.trainer.max_restarts)),
    )
    try:
        result = trainer.fit()
    except TrainingFailedError as exc:  # worker errors past max_failures, or the controller's own
        raise LaunchError(f"the Ray workers failed after {config.trainer.max_restarts} restart(s) "
                          f"(trainer.max_restarts): {_first_line(exc)}") from None
    finally:
        if started_here:
            ray.shutdown()
    return result.return_value


def _connect(launcher: RayLauncherConfig) -> bool:
    """Connects to the cluster, or starts an embedded Ray; True when this process started it."""
    import ray

    os.environ.update({key: value for key, value in _QUIET.items() if key not in os.environ})
    if ray.is_initialized():
        return False
    env_vars = dict(_QUIET)
    if launcher.address is None:
        # The dashboard serves Ray's State API, which Ray Train's placement-group cleaner polls;
        # it listens on loopback only.
        ray.init(num_cpus=os.cpu_count(), include_dashboard=True, dashboard_host="127.0.0.1",
                 logging_level=logging.WARNING, log_to_driver=True, runtime_env={"env_vars": env_vars})
        return True
    try:
        ray.init(address=launcher.address, logging_level=logging.WARNING, runtime_env={"env_vars": env_vars})
    except (ConnectionError, RuntimeError) as exc:
        raise UserError(f"launcher.address={launcher.address}: cannot connect to a Ray cluster there "
                        f"({_first_line(exc)})") from None
    return False


def _train_worker(loop_config: dict[str, Any]) -> dict[str, Any]:
    """Runs in every Ray Train worker: the shared worker function, checkpoints registered with Ray."""
    import ray.train
    from ray.train import Checkpoint
    from ray.train.v2.api.report_config import CheckpointUploadMode

    from orchestrator.train.worker import run_worker

    rank = ray.train.get_context().get_world_rank()

    def register(directory: Path, step: int) -> None:
        # Every rank must report (it is a barrier); rank 0 names the checkpoint, already in place.
        checkpoint = Checkpoint.from_directory(str(directory)) if rank == 0 else None
        ray.train.report({"step": step}, checkpoint=checkpoint, checkpoint_upload_mode=CheckpointUploadMode.NO_UPLOAD)

    # Ray Train hands a restarted worker group the last registered checkpoint: a restart.
    restarted = ray.train.get_checkpoint() is not None
    return run_worker(loop_config["config"], loop_config["run_dir"], restarts=int(restarted), on_checkpoint=register)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
