"""Ray's private APIs, in one place (tested with Ray 2.60).

Loopback. On Linux Ray replaces a loopback address it is given (``ray start --node-ip-address=127.0.0.1``,
``--address=127.0.0.1:6379``, ``ray.init(_node_ip_address=...)``, ``RAY_ADDRESS``) with this machine's
routable IP, and a node whose IP is not exactly 127.0.0.1 binds its GCS, raylet, object manager, agents,
metrics and workers to every interface. :func:`keep_loopback` makes Ray keep the address it was
given; a node started with 127.0.0.1 then binds every server to 127.0.0.1.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

TESTED_VERSIONS = ("2.60",)  # Ray major.minor this module is tested against (pinned in pyproject.toml)
LOOPBACK_IP = "127.0.0.1"
# Ray's own switch (meant for macOS and Windows): processes that see "0" take loopback as this
# machine's address. Set for a loopback node's processes, so a job's driver there (a plain
# `ray.init()` reading RAY_ADDRESS=127.0.0.1:PORT) connects instead of trying the routable IP.
LOCAL_ONLY_ENV_VAR = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def keep_loopback() -> None:
    """Makes Ray, in this process, keep a loopback address as given instead of swapping in the routable IP."""
    from ray._private import services

    # Ray returns every other address unchanged already.
    services.resolve_ip_for_localhost = _unchanged


def _unchanged(host: str) -> str:
    if not host:
        raise ValueError(f"Malformed host: {host!r}")
    return host


def init_on_loopback(**kwargs: Any) -> None:
    """``ray.init(address="local", **kwargs)``: a new Ray whose every server listens on 127.0.0.1."""
    import ray

    keep_loopback()
    ray.init(address="local", _node_ip_address=LOOPBACK_IP, **kwargs)


def quiet_token_setup_warning() -> None:
    """An embedded Ray turns token auth on for its dashboard and says so each time: a warning for Ray's users."""
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)


def is_capacity_timeout(error: BaseException) -> bool:
    """Ray Train gave up placing the worker group (no room within its start timeout)."""
    from ray.train.v2._internal.exceptions import WorkerGroupStartupTimeoutError
    from ray.train.v2.api.exceptions import ControllerError

    return isinstance(error, ControllerError) and isinstance(error.controller_failure, WorkerGroupStartupTimeoutError)


def gcs_error(address: str) -> str | None:
    """Why the Ray GCS at ``address`` does not answer, or None when it does; Ray's C++ log line is muted.

    A GCS answers its cluster id at once; anything else fails the same call, where ``ray.init`` would
    retry for a minute."""
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


def ray_start(args: list[str]) -> None:
    """``ray start ARGS`` for a node on loopback: Ray keeps 127.0.0.1, and so do the processes it starts."""
    from ray.scripts.scripts import cli

    keep_loopback()
    # Only now, after Ray read it at import: seen by this `ray start`, "0" refuses to start a worker node.
    os.environ[LOCAL_ONLY_ENV_VAR] = "0"
    cli.main(args=["start", *args], prog_name="ray")


if (
    __name__ == "__main__"
):  # `python -m orchestrator.launchers.ray_compat ARGS`: how `cluster up` starts a loopback node
    ray_start(sys.argv[1:])
