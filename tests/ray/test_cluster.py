"""A 2-node token-authenticated Ray cluster on this machine (``orchestrator cluster up``: a head and a
worker node, one CPU each), shared by every test here: jobs submitted to it (``orchestrator submit``),
training that survives a killed worker and a lost node, every server of it on loopback, and ``cluster
down`` leaving none of its processes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Collection

import psutil
import pytest

from orchestrator.cluster import jobs, local
from orchestrator.cluster.named import Cluster
from orchestrator.errors import UserError
from tests.helpers import (
    MAX_STEPS,
    alive,
    committed_step,
    is_loopback,
    listening,
    process_group_tree,
    resume_job,
    run_cli,
    train_losses,
)

pytestmark = pytest.mark.slow
NAME = "test"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("cluster")
    env = {"ORCHESTRATOR_CONFIG_DIR": str(root / "config")}
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)  # this process's clients find the cluster's state and token there too
    port, dashboard = _free_port(), _free_port()
    up = run_cli(
        "cluster",
        "up",
        "--name",
        NAME,
        "--nodes",
        "2",
        "--cpus-per-node",
        "1",
        "--port",
        str(port),
        "--dashboard-port",
        str(dashboard),
        "--storage",
        str(root / "runs"),
        cwd=root,
        timeout=240,
    )
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        yield {"root": root, "env": env, "dashboard": f"http://127.0.0.1:{dashboard}", "storage": root / "runs"}
    finally:
        processes = _cluster_processes()
        down = run_cli("cluster", "down", "--name", NAME, cwd=root, timeout=60)
        for key, value in saved.items():
            os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)
        assert down.returncode == 0 and "node(s) stopped" in down.stdout, down.stdout + down.stderr
        assert [process for process in processes if alive(process)] == []  # `down` leaves none of them


def _cluster_processes() -> set[psutil.Process]:
    """Every process of every node of the cluster (each node leads its own process group)."""
    return {process for pid in local.node_pids(NAME) for process in process_group_tree(pid)}


def _submit(cluster: dict, *overrides: str, env: dict | None = None) -> tuple[str, Path]:
    result = run_cli(
        "submit",
        f"cluster={NAME}",
        *overrides,
        cwd=cluster["root"],
        env={**cluster["env"], **(env or {})},
        timeout=120,
        check=True,
    )
    line = next(line for line in result.stdout.splitlines() if line.startswith("submitted "))
    _, job_id, _, _, run_dir = line.split()
    return job_id, Path(run_dir)


def _on_cluster(cache_dir: Path, *extra: str) -> list[str]:
    """The resume tests' job (checkpoint every 10 steps), as overrides for `submit` on Ray."""
    args = resume_job(cache_dir, Path("unused"), *extra)[1:]
    return [arg.replace("launcher=local", "launcher=ray") for arg in args if not arg.startswith("hydra.run.dir=")]


def _train_workers() -> list[psutil.Process]:
    """Ray Train's worker processes on this cluster's nodes (their parent, a raylet, is in a node's group)."""
    groups = set(local.node_pids(NAME))
    found = []
    for process in psutil.process_iter(["cmdline", "ppid"]):
        try:
            if (
                " ".join(process.info["cmdline"] or []).startswith("ray::RayTrainWorker")
                and os.getpgid(process.info["ppid"]) in groups
            ):
                found.append(process)
        except (ProcessLookupError, psutil.Error):
            continue
    return found


def _freeze_at_step(
    run_dir: Path, step: int, workers: int = 2, exclude: Collection[psutil.Process] = (), committed: int = 0
) -> list[psutil.Process]:
    """SIGSTOPs the run's train workers (not those in ``exclude``, an earlier group's) once ``step`` is
    logged (a tiny job's steps take milliseconds) and the checkpoint of step ``committed`` or a later one
    is committed (saves are asynchronous: on a loaded machine a commit can come several steps late)."""
    deadline = time.monotonic() + 180
    while len(found := [p for p in _train_workers() if p not in exclude]) < workers:
        assert time.monotonic() < deadline, "the train workers did not start"
        time.sleep(0.2)
    while (
        not (run_dir / "metrics.jsonl").exists()
        or max(train_losses(run_dir), default=0) < step
        or committed_step(run_dir) < committed
    ):
        assert time.monotonic() < deadline, f"no step {step} (and checkpoint {committed}) in {run_dir}"
        time.sleep(0.002)
    for process in found:
        process.suspend()
    assert max(train_losses(run_dir)) < MAX_STEPS
    return found


def _status(job_id: str) -> str:
    return jobs.wait(jobs.resolve_cluster(NAME), job_id, timeout_s=240)


def _get(url: str, token: str | None) -> int:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_the_job_api_refuses_requests_without_the_token(cluster: dict, tmp_path: Path) -> None:
    token_file = cluster["root"] / "config" / "clusters" / NAME / "token"
    assert token_file.stat().st_mode & 0o777 == 0o600
    url = f"{cluster['dashboard']}/api/jobs/"
    assert _get(url, None) == 401
    assert _get(url, "not-the-token") == 403
    assert _get(url, token_file.read_text().strip()) == 200

    wrong = tmp_path / "wrong"
    wrong.write_text("not-the-token")
    wrong.chmod(0o600)
    with pytest.raises(UserError, match=r"refused the request \(.*Invalid authentication token"):
        jobs.client(Cluster(name=NAME, address=cluster["dashboard"], token_file=wrong))
    with pytest.raises(UserError, match="no token at"):
        jobs.client(Cluster(name=NAME, address=cluster["dashboard"], token_file=tmp_path / "missing"))


def test_a_submitted_job_survives_a_killed_worker_then_waits_for_a_lost_node(
    cluster: dict, cache_dir: Path, uninterrupted: dict
) -> None:
    """One job through both recoveries: a killed worker (restarted at once), then the worker node lost
    (the run waits until capacity returns). Every step's loss equals the uninterrupted run's."""
    sentinel = "wandb-sentinel-0123456789abcdef"
    job_id, run_dir = _submit(
        cluster,
        *_on_cluster(cache_dir, "trainer.max_restarts=2", "launcher.capacity_timeout_s=120"),
        env={"WANDB_API_KEY": sentinel},
    )
    assert run_dir.is_relative_to(cluster["storage"])
    first = _freeze_at_step(run_dir, 12)
    killed, *others = first
    killed.kill()
    for process in others:
        process.resume()

    # The restarted group resumed from a checkpoint; past step 22, with the step-20 checkpoint committed,
    # the worker node (and the train worker on it) goes: the head's one CPU cannot hold two workers, so
    # the run waits ...
    _freeze_at_step(run_dir, 22, exclude=first, committed=20)
    for pid in local.worker_pids(NAME):
        local.kill_node(NAME, pid)
    for process in _train_workers():
        process.resume()
    time.sleep(5)
    assert jobs.wait(jobs.resolve_cluster(NAME), job_id, timeout_s=0) == "RUNNING"
    # ... until capacity returns.
    local.add_node(NAME)

    assert _status(job_id) == "SUCCEEDED", run_cli(
        "jobs", "logs", job_id, "--cluster", NAME, cwd=cluster["root"]
    ).stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == MAX_STEPS and summary["restarts"] == 2
    # The last resume was from the step-20 or step-30 checkpoint (at most one interval recomputed), and
    # every step's loss equals the uninterrupted run's: metrics.jsonl keeps each step once.
    assert summary["resumed_from_step"] in (20, 30)
    assert train_losses(run_dir) == uninterrupted

    # Ray's own CLI sees the job (with the token); the W&B key of the submitting shell went nowhere.
    ray = Path(os.sys.executable).with_name("ray")
    token_file = cluster["root"] / "config" / "clusters" / NAME / "token"
    listed = subprocess.run(
        [str(ray), "job", "list", "--address", cluster["dashboard"]],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_file)},
    )
    assert job_id in listed.stdout, listed.stderr
    status = run_cli("jobs", "status", job_id, "--cluster", NAME, "--json", cwd=cluster["root"], check=True).stdout
    assert json.loads(status)["status"] == "SUCCEEDED"
    info = jobs.job_info(jobs.resolve_cluster(NAME), job_id)
    assert sentinel not in json.dumps(info.runtime_env) + json.dumps(info.metadata) + info.entrypoint
    assert not any(sentinel in path.read_text(errors="ignore") for path in run_dir.rglob("*") if path.is_file())


def test_every_server_of_the_cluster_listens_on_loopback_and_a_driver_joins_it_there(cluster: dict) -> None:
    # After the test above, the worker node is the one added when capacity came back.
    servers = listening(_cluster_processes())
    assert sum(name == "raylet" for name, _, _ in servers) >= 2 * 2, servers  # each node's raylet listens
    assert "gcs_server" in {name for name, _, _ in servers}, servers
    assert [entry for entry in servers if not is_loopback(entry[1])] == []
    # A driver here joins it at launcher.address=127.0.0.1:PORT, though Ray would try the routable IP.
    state = local.load_state(NAME)
    joined = subprocess.run(
        [os.sys.executable, "-c", JOIN, state.gcs_address],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": state.token_file},
    )
    assert joined.returncode == 0 and joined.stdout.split() == ["2.0"], joined.stdout + joined.stderr[-2000:]


JOIN = """
import sys, ray
from orchestrator.launch.ray import ray_session
from orchestrator.launchers.ray import RayLauncherConfig
with ray_session(RayLauncherConfig(address=sys.argv[1])):
    print(ray.cluster_resources()["CPU"])
"""


def test_more_failures_than_allowed_fail_the_run_and_leave_nothing_behind(cluster: dict, cache_dir: Path) -> None:
    job_id, run_dir = _submit(cluster, *_on_cluster(cache_dir, "trainer.max_restarts=0"))
    killed, *others = _freeze_at_step(run_dir, 5)
    killed.kill()
    for process in others:
        process.resume()

    assert _status(job_id) == "FAILED"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and "trainer.max_restarts" in summary["error"]
    _assert_no_train_actors_or_placement_groups(cluster)


def test_more_workers_than_the_cluster_has_fail_after_the_timeout(cluster: dict, cache_dir: Path) -> None:
    job_id, run_dir = _submit(
        cluster, *_on_cluster(cache_dir, "launcher.cpus_per_worker=2", "launcher.capacity_timeout_s=5")
    )
    assert _status(job_id) == "FAILED"
    error = json.loads((run_dir / "summary.json").read_text())["error"]
    assert "no room for 2 worker(s) x {CPU: 2} within launcher.capacity_timeout_s=5" in error
    assert "CPU: " in error.split(";")[1]  # what the cluster has
    _assert_no_train_actors_or_placement_groups(cluster)


def test_a_sweep_is_one_job_per_point_in_one_group(cluster: dict, cache_dir: Path) -> None:
    tiny = [
        "job=gpt_tiny_cpu",
        "strategy=none",
        "launcher.num_workers=1",
        "trainer.max_steps=4",
        "trainer.global_batch_size=4",
        "trainer.micro_batch_size=4",
        "trainer.eval_every=0",
        "scheduler.warmup_steps=0",
        f"data.cache_dir={cache_dir}",
        "data.max_bytes=400000",
        "logger.progress=false",
    ]
    result = run_cli(
        "submit",
        f"cluster={NAME}",
        "-m",
        *tiny,
        "optim.lr=1e-3,3e-4",
        cwd=cluster["root"],
        env=cluster["env"],
        timeout=120,
        check=True,
    )
    submitted = [line.split() for line in result.stdout.splitlines() if line.startswith("submitted ")]
    assert len(submitted) == 2
    group = next(line.split()[1] for line in result.stdout.splitlines() if line.startswith("group "))
    for _, job_id, _, _, run_dir in submitted:
        status = _status(job_id)
        info = jobs.job_info(jobs.resolve_cluster(NAME), job_id)
        assert status == "SUCCEEDED", (
            info.message,
            jobs.client(jobs.resolve_cluster(NAME)).get_job_logs(job_id)[-3000:],
        )
        assert info.metadata["orchestrator.group"] == group
        assert f"group: {group}" in (Path(run_dir) / "config.yaml").read_text()
    lrs = {float(_config_value(Path(run_dir), "lr")) for *_, run_dir in submitted}
    assert lrs == {1e-3, 3e-4}


def test_scale_on_the_cluster_is_one_job_whose_points_are_ray_train_runs(cluster: dict, cache_dir: Path) -> None:
    result = run_cli(
        "scale",
        f"cluster={NAME}",
        "--follow",
        "job=gpt_tiny_cpu",
        "logger=jsonl",
        f"data.cache_dir={cache_dir}",
        "data.max_bytes=400000",
        "data.seq_len=32",
        "trainer.global_batch_size=4",
        "trainer.micro_batch_size=2",
        "scale.workers=[1,2]",
        "scale.strategies=[ddp]",
        "scale.steps=2",
        "scale.warmup_steps=1",
        cwd=cluster["root"],
        env=cluster["env"],
        timeout=300,
    )
    out_dir = cluster["storage"] / "scale" / "gpt_tiny_cpu-weak"
    job_id = result.stdout.split()[1]
    assert result.returncode == 0 and f"submitted {job_id}  experiment dir {out_dir}" in result.stdout, result.stdout
    assert jobs.job_info(jobs.resolve_cluster(NAME), job_id).metadata["orchestrator.command"] == "scale"
    rows = json.loads((out_dir / "scale.json").read_text())["points"]
    assert [(row["workers"], row["status"]) for row in rows] == [(1, "completed"), (2, "completed")]
    for row in rows:  # 1 CPU per node: the 2-worker point ran on both nodes
        summary = json.loads((out_dir / row["run_dir"] / "summary.json").read_text())
        assert summary["launcher"] == "ray" and summary["world_size"] == row["workers"]
        assert "address: auto" in (out_dir / row["run_dir"] / "config.yaml").read_text()


def _config_value(run_dir: Path, key: str) -> str:
    line = next(
        line for line in (run_dir / "config.yaml").read_text().splitlines() if line.strip().startswith(f"{key}:")
    )
    return line.split(":", 1)[1].strip()


def test_a_cluster_that_does_not_answer_fails_in_one_line() -> None:
    with pytest.raises(UserError, match=r"cluster=gone: nothing answers at http://127.0.0.1:1 \(Connection refused\)"):
        jobs.client(Cluster(name="gone", address="http://127.0.0.1:1", token_file=None))


def test_unknown_job_id(cluster: dict) -> None:
    result = run_cli("jobs", "status", "no-such-job", "--cluster", NAME, cwd=cluster["root"], env=cluster["env"])
    assert result.returncode == 2
    assert (
        result.stderr.strip()
        == f"error: no job 'no-such-job' on cluster={NAME}; `orchestrator jobs list` shows its jobs"
    )


def _assert_no_train_actors_or_placement_groups(cluster: dict) -> None:
    """Ray's State API (with the token): no live Ray Train actor and no placement group remains."""
    token = (cluster["root"] / "config" / "clusters" / NAME / "token").read_text().strip()

    def listed(kind: str) -> list[dict]:
        request = urllib.request.Request(
            f"{cluster['dashboard']}/api/v0/{kind}?limit=1000", headers={"Authorization": f"Bearer {token}"}
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.load(response)["data"]["result"]["result"]

    deadline = time.monotonic() + 30
    while True:
        actors = [a for a in listed("actors") if a["state"] != "DEAD" and "Train" in a["class_name"]]
        groups = [g for g in listed("placement_groups") if g["state"] != "REMOVED"]
        if not actors and not groups:
            return
        assert time.monotonic() < deadline, f"left behind: {actors} {groups}"
        time.sleep(1)
