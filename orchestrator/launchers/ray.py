"""``launcher=ray``: Ray Train's ``TorchTrainer`` on an embedded Ray sized to this machine, or on a running
cluster (``launcher.address``)."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Optional

from orchestrator.config.schema import Config, LauncherConfig, positive
from orchestrator.errors import UserError
from orchestrator.launchers import ray_compat
from orchestrator.launchers.spec import LauncherSpec, check_this_machine


class Placement(str, Enum):
    """How Ray places the workers' bundles on nodes (a placement group strategy)."""

    PACK = "PACK"
    SPREAD = "SPREAD"
    STRICT_PACK = "STRICT_PACK"
    STRICT_SPREAD = "STRICT_SPREAD"


@dataclass(kw_only=True)
class RayLauncherConfig(LauncherConfig):
    """Ray Train's ``TorchTrainer`` running the same worker function as ``launcher=local``.

    ``address`` null starts an embedded Ray sized to this machine for the run; ``auto`` or
    ``host:port`` joins a running cluster. Each worker asks Ray for ``cpus_per_worker`` CPUs (and one
    GPU when the job trains on CUDA), placed by ``placement``. When the cluster cannot place the
    workers (at the start, or after a node is lost) the run waits ``capacity_timeout_s`` for capacity
    to come back, then fails naming what is missing.
    """

    name: str = "ray"
    num_workers: int = 2
    address: Optional[str] = None
    cpus_per_worker: float = 1.0
    placement: Placement = Placement.PACK
    capacity_timeout_s: float = 120.0

    def __post_init__(self) -> None:
        super().__post_init__()
        positive("launcher", cpus_per_worker=self.cpus_per_worker, capacity_timeout_s=self.capacity_timeout_s)


# Where `ray start` records the running cluster's address on this machine.
RAY_CURRENT_CLUSTER = Path("/tmp/ray/ray_current_cluster")
PROBE_TIMEOUT_S = 5.0


class RayLauncher(LauncherSpec):
    name = "ray"
    config = RayLauncherConfig
    trains = "orchestrator.launch.ray:launch_ray"
    runs_scripts = "orchestrator.launch.script:run_ray"

    def check(self, config: Config) -> None:
        launcher = config.launcher
        assert isinstance(launcher, RayLauncherConfig)
        if launcher.address is not None:
            check_ray_address(launcher.address)
            return
        # An embedded Ray sized to this machine.
        check_this_machine(config)
        workers, cores = launcher.num_workers, os.cpu_count() or 1
        if workers * launcher.cpus_per_worker > cores:
            # Ray would wait forever for CPUs an embedded cluster on this machine never has.
            raise UserError(
                f"launcher.num_workers={workers} x launcher.cpus_per_worker={launcher.cpus_per_worker:g} "
                f"needs {workers * launcher.cpus_per_worker:g} CPUs; this machine has {cores}"
            )


def check_ray_address(address: str) -> None:
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
    error = ray_compat.gcs_error(f"{host}:{port}")
    if error:
        raise UserError(f"{key}: no Ray cluster answers there ({error})")


SPECS = (RayLauncher(),)
