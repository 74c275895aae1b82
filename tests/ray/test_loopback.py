"""Every server of the Ray the project starts listens on loopback: a ``cluster up`` cluster (head and worker
node) and the embedded Ray of ``launcher=ray``. ``cluster down`` leaves none of the cluster's processes."""

from __future__ import annotations

import ipaddress
import os
import socket
from pathlib import Path

import psutil
import pytest
import ray

from orchestrator.cluster import local
from orchestrator.launch.ray import ray_session
from orchestrator.launchers.ray import RayLauncherConfig

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _tree(pid: int) -> set[psutil.Process]:
    """A process, the members of its process group and all their descendants."""
    roots = [psutil.Process(pid)]
    for process in psutil.process_iter():
        try:
            if process.pid != pid and os.getpgid(process.pid) == pid:
                roots.append(process)
        except (OSError, psutil.Error):
            continue
    return {found for root in roots for found in [root, *root.children(recursive=True)]}


def _listening(processes: set[psutil.Process]) -> list[tuple[str, str, int]]:
    found = []
    for process in processes:
        try:
            found += [
                (process.name(), c.laddr.ip, c.laddr.port)
                for c in process.net_connections(kind="inet")
                if c.status == psutil.CONN_LISTEN
            ]
        except psutil.NoSuchProcess:
            continue
    return found


def _is_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip.split("%")[0])
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1, an IPv6 socket bound to 127.0.0.1
    return (mapped or address).is_loopback


def _exited(process: psutil.Process) -> bool:
    try:
        return not process.is_running() or process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_a_cluster_listens_on_loopback_only_and_down_leaves_no_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ORCHESTRATOR_CONFIG_DIR", str(tmp_path / "config"))
    state = local.up(
        name="loopback",
        nodes=2,
        cpus_per_node=1,
        host="127.0.0.1",
        port=_free_port(),
        dashboard_port=_free_port(),
        auth=False,
    )
    try:
        # A driver here joins it (launcher.address=127.0.0.1:PORT), though Ray would try the routable IP.
        with ray_session(RayLauncherConfig(address=state.gcs_address)):
            assert ray.cluster_resources()["CPU"] == 2
        ray.shutdown()
        processes = {process for node in state.nodes for process in _tree(node.pid)}
        listening = _listening(processes)
        assert sum(name == "raylet" for name, _, _ in listening) >= 2 * 2, listening  # each node's raylet listens
        assert "gcs_server" in {name for name, _, _ in listening}, listening
        assert [entry for entry in listening if not _is_loopback(entry[1])] == []
    finally:
        stopped = local.down("loopback")
    assert stopped == 2
    assert [process for process in processes if not _exited(process)] == []


def test_embedded_ray_listens_on_loopback_only() -> None:
    with ray_session(RayLauncherConfig()):

        @ray.remote
        def node_ip() -> str:
            return ray.util.get_node_ip_address()

        assert ray.get(node_ip.remote()) == "127.0.0.1"  # a worker has started and listens too
        listening = _listening({psutil.Process(), *psutil.Process().children(recursive=True)})
        assert {"gcs_server", "raylet"} <= {name for name, _, _ in listening}, listening
        assert [entry for entry in listening if not _is_loopback(entry[1])] == []
