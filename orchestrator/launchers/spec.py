"""What the driver knows of a launcher without importing torch or Ray: its ``LauncherSpec``.

A launcher runs a job's workers: on this machine (``launcher=local``) or on a Ray cluster
(``launcher=ray``). Its spec owns its config class and the checks that the machine or cluster can hold
the job, run before any worker starts; the code that starts the workers sits in the driver layer
(``orchestrator/launch/``) and is named here by module and function, imported on first use:

- ``trains``: ``(config, run_dir) -> dict``, runs a training job's workers to their end and returns rank
  0's summary (``launch.run_job`` writes it);
- ``runs_scripts``: ``(config, run_dir, command) -> None``, runs a script job's workers
  (``launch/script.py``), raising ``LaunchError`` when one fails.
"""

from __future__ import annotations

import importlib
import os
from typing import Any, Callable, ClassVar

from orchestrator.config.schema import Config, Device, LauncherConfig
from orchestrator.errors import UserError


class LauncherSpec:
    """One launcher as the driver sees it; a subclass per launcher, in its module's ``SPECS``."""

    name: ClassVar[str]
    config: ClassVar[type[LauncherConfig]]
    trains: ClassVar[str]  # "module:function"
    runs_scripts: ClassVar[str]  # "module:function"

    def check(self, config: Config) -> None:
        """Raises UserError when the machine or cluster cannot hold the job's workers (no torch, seconds)."""

    def train(self, config: Config, run_dir: Any) -> dict[str, Any]:
        return _function(self.trains)(config, run_dir)

    def run_script(self, config: Config, run_dir: Any, command: Any) -> None:
        _function(self.runs_scripts)(config, run_dir, command)


def _function(path: str) -> Callable[..., Any]:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


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


def check_this_machine(config: Config) -> None:
    """The job's workers fit on this machine: one GPU each when it trains on CUDA, else one core each."""
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
