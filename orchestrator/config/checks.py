"""Checks that need the machine, run by the CLI after the schema's own checks and before any worker.

Nothing here imports torch: a bad path or an impossible worker count is reported within a second.
"""

from __future__ import annotations

import importlib.util
import os
import socket
from pathlib import Path

from orchestrator.checkpoints.manifest import candidates
from orchestrator.config.paths import check_data_paths
from orchestrator.config.schema import Config, Device, JobConfig, JobKind, RayLauncherConfig
from orchestrator.errors import UserError


def check_environment(config: Config) -> None:
    """Raises UserError for input this machine cannot serve: paths, checkpoints, workers, extras."""
    if config.job.kind is JobKind.script:
        _check_script(config.job)
    else:
        _check_training_inputs(config)
    launcher = config.launcher
    if isinstance(launcher, RayLauncherConfig) and launcher.address is not None:
        _check_ray_address(launcher.address)
    else:  # workers on this machine: torch elastic, or an embedded Ray sized to it
        _check_local_capacity(config)


def _check_script(job: JobConfig) -> None:
    assert job.script is not None  # the schema requires it for script jobs
    path = Path(job.script).expanduser()
    if not path.is_file():
        reason = "a directory, not a file" if path.is_dir() else "no such file"
        where = "" if path.is_absolute() else f" (relative to the current directory, {Path.cwd()})"
        raise UserError(f"job.script={job.script}: {reason}{where}")


def _check_training_inputs(config: Config) -> None:
    check_data_paths(config.data)
    # Existence only: verifying (hashing) a checkpoint and matching it to the model is the preflight's job.
    if (resume := config.trainer.resume_from.path) is not None:
        candidates(resume, key="trainer.resume")
    if config.trainer.init_from:
        if getattr(config.model, "pretrained", None):
            raise UserError("trainer.init_from and model.pretrained both name the initial weights; set one")
        candidates(config.trainer.init_from, key="trainer.init_from")
    if config.model.name == "hf" and importlib.util.find_spec("transformers") is None:
        raise UserError("model=hf needs transformers: pip install 'orchestrator[hf]'")


def visible_gpu_count() -> int:
    """CUDA GPUs this process may use, from NVML and CUDA_VISIBLE_DEVICES (no CUDA context created)."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            count = pynvml.nvmlDeviceGetCount()
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no driver, no library: no GPUs
        return 0
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        count = min(count, len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"]))
    return count


def uses_gpu(config: Config) -> bool:
    """Whether the job's workers will run on CUDA devices."""
    return config.trainer.device is Device.cuda or (config.trainer.device is Device.auto and visible_gpu_count() > 0)


def _check_local_capacity(config: Config) -> None:
    workers = config.launcher.num_workers
    device = config.trainer.device
    gpus = visible_gpu_count() if device is not Device.cpu else 0
    if device is Device.cuda and gpus == 0:
        raise UserError("trainer.device=cuda but this machine has no visible CUDA GPU; use trainer.device=cpu")
    if gpus > 0:
        if workers > gpus:
            raise UserError(
                f"launcher.num_workers={workers} needs {workers} GPUs; this machine has {gpus} (one worker per GPU)"
            )
        return
    cores = os.cpu_count() or 1
    if workers > cores:
        raise UserError(
            f"launcher.num_workers={workers} exceeds this machine's {cores} CPU cores "
            f"(one worker per core at least); use launcher.num_workers<={cores}"
        )
    launcher = config.launcher
    if isinstance(launcher, RayLauncherConfig) and workers * launcher.cpus_per_worker > cores:
        # Ray would wait forever for CPUs an embedded cluster on this machine never has.
        raise UserError(
            f"launcher.num_workers={workers} x launcher.cpus_per_worker={launcher.cpus_per_worker:g} "
            f"needs {workers * launcher.cpus_per_worker:g} CPUs; this machine has {cores}"
        )


# Where `ray start` records the running cluster's address on this machine.
RAY_CURRENT_CLUSTER = Path("/tmp/ray/ray_current_cluster")
PROBE_TIMEOUT_S = 5.0


def _check_ray_address(address: str) -> None:
    """A cluster must answer at ``address`` (host:port of its GCS, or ``auto``) within seconds."""
    key = f"launcher.address={address}"
    if address == "auto":
        found = os.environ.get("RAY_ADDRESS") or (
            RAY_CURRENT_CLUSTER.read_text().strip() if RAY_CURRENT_CLUSTER.exists() else ""
        )
        if not found:
            raise UserError(
                f"{key}: no Ray cluster is running on this machine (no RAY_ADDRESS, no "
                f"{RAY_CURRENT_CLUSTER}); start one with `ray start --head` or give host:port"
            )
        address = found
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"{key}: expected host:port of a Ray cluster's head (GCS), or auto")
    try:
        socket.create_connection((host, int(port)), timeout=PROBE_TIMEOUT_S).close()
    except OSError as exc:
        raise UserError(f"{key}: no Ray cluster answers there ({exc.strerror or exc})") from None
    # Something listens; a Ray GCS answers its cluster id at once, anything else fails the same call
    # (ray.init itself would retry for a minute).
    error = _gcs_error(f"{host}:{port}")
    if error:
        raise UserError(f"{key}: no Ray cluster answers there ({error})")


def _gcs_error(address: str) -> str | None:
    """Why the Ray GCS at ``address`` does not answer, or None when it does. Ray's C++ log line is muted."""
    import ray._raylet

    stderr = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        ray._raylet.GcsClient(address=address)
    except Exception as exc:  # RpcError, AuthenticationError: whatever it is, it is not a usable GCS
        return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    finally:
        os.dup2(stderr, 2)
        os.close(stderr)
        os.close(devnull)
    return None
