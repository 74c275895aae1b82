"""Every server of the embedded Ray of ``launcher=ray`` listens on loopback (a ``cluster up`` cluster's are
checked on the cluster the tests in ``test_cluster.py`` share)."""

from __future__ import annotations

import psutil
import pytest
import ray

from orchestrator.launch.ray import ray_session
from orchestrator.launchers.ray import RayLauncherConfig
from tests.helpers import is_loopback, listening

pytestmark = pytest.mark.slow


def test_embedded_ray_listens_on_loopback_only() -> None:
    with ray_session(RayLauncherConfig()):

        @ray.remote
        def node_ip() -> str:
            return ray.util.get_node_ip_address()

        assert ray.get(node_ip.remote()) == "127.0.0.1"  # a worker has started and listens too
        servers = listening({psutil.Process(), *psutil.Process().children(recursive=True)})
        assert {"gcs_server", "raylet"} <= {name for name, _, _ in servers}, servers
        assert [entry for entry in servers if not is_loopback(entry[1])] == []
