"""``orchestrator cluster up | status | down``: a multi-node Ray cluster on this machine.

Each node is its own ``ray start --block`` process in its own process group (so one node can be
killed like a lost machine). ``down`` stops exactly this cluster's processes and no other Ray: each
node's pid and start time are recorded when it starts, and a process is signalled only while both
still match (a pid the system has given to another process since is left alone).
Token authentication is on: a fresh token is written with mode 0600 to the cluster's state dir and
every node reads it from there (``RAY_AUTH_TOKEN_PATH``); the dashboard and job API listen on
127.0.0.1 only. Nodes bind ``--host``: on loopback (the default) every server of every node listens
on 127.0.0.1 only; anything but loopback requires token auth.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

import psutil

from orchestrator.cluster.named import Cluster, default_token_file, state_dir, write_token
from orchestrator.errors import UserError
from orchestrator.fsutil import write_atomic
from orchestrator.launchers import ray_compat

STATE_FILE = "cluster.json"
START_TIMEOUT_S = 120.0
STOP_GRACE_S = 5.0  # after SIGTERM, before SIGKILL
KILL_WAIT_S = 10.0  # after SIGKILL, before giving up on a process that will not exit
# Two reads of one process's start time agree to far better than this; a reused pid starts later.
CREATE_TIME_TOLERANCE_S = 0.01


@dataclass(kw_only=True)
class Node:
    pid: int
    create_time: float  # the process's start time (psutil): with the pid, proves a process is this node
    role: str  # head | worker
    log: str
    marker: str = ""  # a custom resource only this node offers: how Ray's node list names it
    temp_dir: str = ""  # a worker node's own Ray temp dir (see _start_node)


@dataclass(kw_only=True)
class ClusterState:
    name: str
    gcs_address: str
    dashboard_url: str
    token_file: str
    cpus_per_node: int
    host: str
    storage: str | None = None
    nodes: list[Node] = field(default_factory=list)

    def save(self) -> None:
        write_atomic(state_dir(self.name) / STATE_FILE, json.dumps(asdict(self), indent=1) + "\n")

    def as_cluster(self) -> Cluster:
        return Cluster(
            name=self.name,
            address=self.dashboard_url,
            storage=self.storage,
            token_file=Path(self.token_file) if self.token_file else None,
        )


def load_state(name: str) -> ClusterState | None:
    path = state_dir(name) / STATE_FILE
    if not path.is_file():
        return None
    fields = json.loads(path.read_text())
    try:
        return ClusterState(**{**fields, "nodes": [Node(**node) for node in fields["nodes"]]})
    except TypeError:
        raise UserError(
            f"{path} was written by another version of orchestrator (its nodes have no start "
            f"times); stop its processes by hand and delete the file"
        ) from None


def up(
    *,
    name: str,
    nodes: int,
    cpus_per_node: int | None,
    host: str,
    port: int,
    dashboard_port: int,
    auth: bool,
    storage: str | None = None,
) -> ClusterState:
    """Starts a head and ``nodes - 1`` worker nodes and waits until all have joined.

    Raises:
        UserError: a cluster of that name is up, a port is taken, or a non-loopback bind without auth.
    """
    if nodes < 1:
        raise UserError(f"--nodes must be >= 1, got {nodes}")
    if _is_loopback(host):
        host = ray_compat.LOOPBACK_IP  # Ray keeps its servers on loopback for exactly this address
    elif not auth:
        raise UserError(
            f"--host {host} is not a loopback address: refusing to start a cluster others can reach "
            f"without token authentication (drop --no-auth)"
        )
    existing = load_state(name)
    if existing and any(_process(node) for node in existing.nodes):
        raise UserError(
            f"cluster {name!r} is already up ({existing.dashboard_url}); "
            f"`orchestrator cluster down --name {name}` first"
        )
    for key, number in (("--port", port), ("--dashboard-port", dashboard_port)):
        if not _port_free(host if key == "--port" else "127.0.0.1", number):
            raise UserError(f"{key} {number} is in use on this machine; pick another with {key}")
    cpus = cpus_per_node or max(1, (os.cpu_count() or 1) // nodes)
    directory = state_dir(name)
    (directory / "logs").mkdir(parents=True, exist_ok=True)
    token_file = default_token_file(name)
    if auth:
        write_token(token_file, secrets.token_hex(32))
    state = ClusterState(
        name=name,
        gcs_address=f"{host}:{port}",
        dashboard_url=f"http://127.0.0.1:{dashboard_port}",
        token_file=str(token_file) if auth else "",
        cpus_per_node=cpus,
        host=host,
        storage=str(Path(storage).resolve()) if storage else None,
    )
    try:
        for count in range(1, nodes + 1):  # one at a time: a node joining a busy head can time out
            node = _start_node(state, head=count == 1, port=port, dashboard_port=dashboard_port)
            state.nodes.append(node)
            state.save()
            _wait_for_node(state, node)
    except BaseException:
        down(name)
        raise
    return state


def add_node(name: str) -> Node:
    """Starts one more worker node in cluster ``name`` (capacity coming back after a node was lost)."""
    state = _require_state(name)
    node = _start_node(state, head=False)
    state.nodes.append(node)
    state.save()
    _wait_for_node(state, node)
    return node


def down(name: str) -> int:
    """Stops cluster ``name`` and returns once every process of it has exited; returns how many nodes ran.

    Every process of each node still running (see ``_node_processes``) gets SIGTERM, and SIGKILL
    after ``STOP_GRACE_S``.

    Raises:
        UserError: a process outlived SIGKILL by ``KILL_WAIT_S``.
    """
    state = load_state(name)
    if state is None:
        return 0
    running = [node for node in state.nodes if _process(node)]
    processes = {process for node in running for process in _node_processes(node)}
    _stop(processes, signal.SIGTERM)
    left = _wait_exited(processes, STOP_GRACE_S)
    left |= _descendants(left)  # started since (a worker the raylet started meanwhile)
    _stop(left, signal.SIGKILL)
    left = _wait_exited(left, KILL_WAIT_S)
    if left:
        raise UserError(
            f"cluster {name!r}: {len(left)} process(es) still running {KILL_WAIT_S:g} s after SIGKILL "
            f"(pids {', '.join(str(process.pid) for process in left)}); run "
            f"`orchestrator cluster down --name {name}` again once they exit"
        )
    for node in state.nodes:
        if node.temp_dir:
            shutil.rmtree(node.temp_dir, ignore_errors=True)
    (state_dir(name) / STATE_FILE).unlink(missing_ok=True)
    default_token_file(name).unlink(missing_ok=True)
    return len(running)


def status(name: str) -> dict[str, Any]:
    """The cluster's nodes as its processes and Ray's State API see them."""
    state = _require_state(name)
    processes = {node.pid: _process(node) is not None for node in state.nodes}
    nodes = _list_nodes(state)
    return {
        "name": name,
        "dashboard": state.dashboard_url,
        "gcs_address": state.gcs_address,
        "token_file": state.token_file or None,
        "processes_alive": sum(processes.values()),
        "processes": len(processes),
        "nodes_alive": sum(node["state"] == "ALIVE" for node in nodes),
        "cpus": sum(node.get("resources_total", {}).get("CPU", 0) for node in nodes if node["state"] == "ALIVE"),
        "gpus": sum(node.get("resources_total", {}).get("GPU", 0) for node in nodes if node["state"] == "ALIVE"),
    }


def node_pids(name: str) -> list[int]:
    """Pids of all the cluster's node processes still alive (each leads its node's process group)."""
    return [node.pid for node in _require_state(name).nodes if _process(node)]


def worker_pids(name: str) -> list[int]:
    """Pids of the cluster's worker-node processes still alive (each leads its own process group)."""
    return [node.pid for node in _require_state(name).nodes if node.role == "worker" and _process(node)]


def kill_node(name: str, pid: int) -> None:
    """SIGKILLs every process of cluster ``name``'s node ``pid``: what losing that machine looks like to Ray."""
    node = next((node for node in _require_state(name).nodes if node.pid == pid), None)
    if node is None:
        raise UserError(f"cluster {name!r} has no node process {pid}")
    _stop(_node_processes(node), signal.SIGKILL)


def _require_state(name: str) -> ClusterState:
    state = load_state(name)
    if state is None:
        raise UserError(
            f"no cluster named {name!r} was started on this machine; `orchestrator cluster up --name {name}` starts one"
        )
    return state


def _start_node(state: ClusterState, *, head: bool, port: int = 0, dashboard_port: int = 0) -> Node:
    # Ray's per-node agents listen on fixed default ports: several nodes on one machine need their own.
    agent_listen, agent_grpc, metrics, client_server = _free_ports(4)
    args = [
        *_ray_start(state.host),
        "--block",
        f"--num-cpus={state.cpus_per_node}",
        f"--node-ip-address={state.host}",
        f"--dashboard-agent-listen-port={agent_listen}",
        f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--metrics-export-port={metrics}",
        "--disable-usage-stats",
    ]
    if head:
        args += [
            "--head",
            f"--port={port}",
            f"--dashboard-host={ray_compat.LOOPBACK_IP}",
            f"--dashboard-port={dashboard_port}",
            f"--ray-client-server-port={client_server}",
        ]
    index = len(state.nodes)
    temp_dir = ""
    if not head:
        # Its own temp dir, as a machine of its own has: in the head's, a node that joins mid-job unpacks
        # the job's working_dir again over the copy other nodes' processes run in (Ray replaces it).
        temp_dir = tempfile.mkdtemp(prefix=f"orchestrator-{state.name}-{index}-")  # short: Ray's socket paths
        args += [f"--address={state.gcs_address}", f"--temp-dir={temp_dir}"]
    marker = f"orchestrator_node_{index}"
    args.append(f"--resources={json.dumps({marker: 1})}")
    log = state_dir(state.name) / "logs" / f"node-{index}.log"
    with open(log, "w") as out:
        process = subprocess.Popen(
            args,
            env=_node_env(state),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    return Node(
        pid=process.pid,
        create_time=psutil.Process(process.pid).create_time(),
        role="head" if head else "worker",
        log=str(log),
        marker=marker,
        temp_dir=temp_dir,
    )


def _ray_start(host: str) -> list[str]:
    """``ray start``; on loopback through ``ray_compat``, without which Ray swaps 127.0.0.1 for this
    machine's routable IP and binds its servers to every interface."""
    if host == ray_compat.LOOPBACK_IP:
        return [sys.executable, "-m", ray_compat.__name__]
    return [str(Path(sys.executable).with_name("ray")), "start"]


def _node_env(state: ClusterState) -> dict[str, str]:
    """Nodes run this Python (jobs' ``python`` is this environment's) with the cluster's token."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("RAY_ADDRESS", "RAY_AUTH"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    if state.token_file:
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=state.token_file)
    else:
        env["RAY_AUTH_MODE"] = "disabled"
    return env


def _wait_for_node(state: ClusterState, starting: Node) -> None:
    """Waits until Ray lists the node ``starting`` alive (by its marker resource); fails if it exits first.

    A count of live nodes would not do: a node killed a moment ago stays ALIVE in Ray's list until
    its health checks fail, and a node started while another is still joining can time out.
    """
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if _process(starting) is None:
            raise UserError(
                f"cluster {state.name!r}: a {starting.role} node exited while starting; "
                f"its log: {starting.log}\n{_tail(Path(starting.log))}"
            )
        try:
            if any(
                node["state"] == "ALIVE" and starting.marker in node.get("resources_total", {})
                for node in _list_nodes(state)
            ):
                return
        except (OSError, urllib.error.URLError, ValueError):
            pass  # the dashboard is still starting
        time.sleep(0.5)
    raise UserError(
        f"cluster {state.name!r}: a {starting.role} node did not join within {START_TIMEOUT_S:g} s; "
        f"its log: {starting.log}"
    )


def _list_nodes(state: ClusterState) -> list[dict[str, Any]]:
    """Ray's State API (``/api/v0/nodes``) through the dashboard, with the token."""
    request = urllib.request.Request(f"{state.dashboard_url}/api/v0/nodes?limit=1000", headers=_auth(state))
    with urllib.request.urlopen(request, timeout=5) as response:
        return json.load(response)["data"]["result"]["result"]


def _auth(state: ClusterState) -> dict[str, str]:
    return {"Authorization": f"Bearer {Path(state.token_file).read_text().strip()}"} if state.token_file else {}


def _tail(path: Path, lines: int = 5) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
    except (OSError, ValueError):
        return False


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def _free_ports(count: int) -> list[int]:
    """Ports free on this machine now (held open together, so they differ from each other)."""
    probes = [socket.socket() for _ in range(count)]
    try:
        for probe in probes:
            probe.bind(("", 0))
        return [probe.getsockname()[1] for probe in probes]
    finally:
        for probe in probes:
            probe.close()


def _process(node: Node) -> psutil.Process | None:
    """The node's process while it runs: the recorded pid, started at the recorded time (else another's)."""
    try:
        process = psutil.Process(node.pid)
        if abs(process.create_time() - node.create_time) > CREATE_TIME_TOLERANCE_S:
            return None
        return None if process.status() == psutil.STATUS_ZOMBIE else process
    except psutil.Error:
        return None


def _node_processes(node: Node) -> set[psutil.Process]:
    """Every process of a running node: its ``ray start`` process, the members of its process group and
    all their descendants (Ray's workers lead groups of their own). While that process runs its pid
    cannot be reused, nor can its group's id, so each process found is the node's."""
    leader = _process(node)
    if leader is None:
        return set()
    roots = [leader]
    for process in psutil.process_iter():
        with contextlib.suppress(OSError, psutil.Error):
            if process.pid != leader.pid and os.getpgid(process.pid) == leader.pid:
                roots.append(process)
    return set(roots) | _descendants(roots)


def _descendants(processes: Iterable[psutil.Process]) -> set[psutil.Process]:
    found = set()
    for process in processes:
        with contextlib.suppress(psutil.Error):
            found.update(process.children(recursive=True))
    return found


def _stop(processes: set[psutil.Process], sig: signal.Signals) -> None:
    for process in processes:
        _signal(process, sig)


def _signal(process: psutil.Process, sig: signal.Signals) -> None:
    """Signals ``process`` through a pidfd, after checking that the pid still names the process found
    (same start time): a pid reused in between is never signalled."""
    try:
        pidfd = os.pidfd_open(process.pid)
    except ProcessLookupError:
        return
    try:
        if abs(psutil.Process(process.pid).create_time() - process.create_time()) <= CREATE_TIME_TOLERANCE_S:
            signal.pidfd_send_signal(pidfd, sig)
    except (ProcessLookupError, psutil.Error):
        pass  # exited meanwhile
    finally:
        os.close(pidfd)


def _wait_exited(processes: set[psutil.Process], timeout_s: float) -> set[psutil.Process]:
    """Waits up to ``timeout_s`` for ``processes`` to exit; returns those still running (a zombie has exited)."""
    deadline = time.monotonic() + timeout_s
    while True:
        running = {process for process in processes if _running(process)}
        if not running or time.monotonic() >= deadline:
            return running
        time.sleep(0.1)


def _running(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False
