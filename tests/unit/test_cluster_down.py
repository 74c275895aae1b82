"""``orchestrator cluster down`` signals only processes it can prove are the cluster's, and returns once
every one of them has exited. The "nodes" here are plain processes recorded as a cluster's state."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from orchestrator.cluster import local

HANG_GUARD_S = 60  # far beyond what these processes need to start: only a hang reaches it


@pytest.fixture(autouse=True)
def config_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("ORCHESTRATOR_CONFIG_DIR", str(tmp_path / "config"))
    return tmp_path / "config"


def _record(name: str, pid: int, create_time: float) -> None:
    local.state_dir(name).mkdir(parents=True)
    local.ClusterState(
        name=name,
        gcs_address="127.0.0.1:1",
        dashboard_url="http://127.0.0.1:1",
        token_file="",
        cpus_per_node=1,
        host="127.0.0.1",
        nodes=[local.Node(pid=pid, create_time=create_time, role="head", log="")],
    ).save()


def _exited(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_down_leaves_alone_a_process_that_got_a_recorded_pid() -> None:
    # The recorded node started 100 s before the process that holds its pid now: the pid was reused.
    other = subprocess.Popen(["sleep", "300"], start_new_session=True)
    try:
        _record("reused", other.pid, psutil.Process(other.pid).create_time() - 100)
        assert local.down("reused") == 0
        assert local.load_state("reused") is None
        assert other.poll() is None
    finally:
        other.kill()
        other.wait()


def test_down_stops_every_process_of_a_node_and_returns_once_all_exited(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(local, "STOP_GRACE_S", 0.5)
    # A node whose processes ignore SIGTERM (so only SIGKILL stops them), one of them in a session of its
    # own as Ray's workers are (outside the node's process group).
    node = subprocess.Popen(["sh", "-c", "trap '' TERM; setsid sleep 300 & sleep 300 & wait"], start_new_session=True)
    deadline = time.monotonic() + HANG_GUARD_S

    def started() -> bool:  # both children exist, and one has called setsid (a group of its own)
        children = psutil.Process(node.pid).children()
        return len(children) >= 2 and any(os.getpgid(child.pid) == child.pid for child in children)

    while not started():
        assert time.monotonic() < deadline, "the node's processes did not start"
        time.sleep(0.05)
    children = psutil.Process(node.pid).children()
    _record("tree", node.pid, psutil.Process(node.pid).create_time())

    assert local.down("tree") == 1

    assert all(_exited(pid) for pid in [node.pid, *(child.pid for child in children)])
    node.wait()
