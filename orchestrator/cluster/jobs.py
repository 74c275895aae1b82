"""``orchestrator submit`` and ``orchestrator jobs``: training jobs on a Ray cluster's Job Submission API.

A submission carries the project as its ``working_dir`` (what .gitignore names, outputs, caches and
``.venv`` left out, and secrets whatever .gitignore says: see ``SECRET_EXCLUDES``) and the job's
resolved config (in the runtime_env, as ``ORCHESTRATOR_JOB_CONFIG``). On the cluster the entrypoint
``python -m orchestrator run-submitted`` checks that config, prepares the data and trains it with
``launcher.address=auto``, in a run dir under the cluster's storage. The token goes in the
``Authorization`` header and nowhere else; no environment variable of the submitting machine is
forwarded, so a W&B key never reaches the job's metadata or runtime_env. Every request to the job
API has a deadline: a head that accepts connections and never answers is an error, not a hang.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shlex
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any, Callable, TypeVar
from urllib.parse import urlparse

from orchestrator.cluster.local import load_state
from orchestrator.cluster.named import DEFAULT_CLUSTER, Cluster, load_cluster, read_token
from orchestrator.config.compose import CONF_DIR, compose, override_value, to_config
from orchestrator.errors import UserError, first_line
from orchestrator.launch import run_job
from orchestrator.launch.prepared import prepare_resolved
from orchestrator.logs import configure_logging

PROJECT_DIR = CONF_DIR.parent
CONFIG_ENV = "ORCHESTRATOR_JOB_CONFIG"
# Never uploaded, whatever .gitignore says: Ray leaves out what any of its patterns or .gitignore's
# match, so a negation in .gitignore cannot bring one of these back. A pattern without a slash matches
# a file or directory of that name at any depth.
BUILD_EXCLUDES = [
    ".venv",
    ".git",
    "outputs",
    "multirun",
    "wandb",
    ".cache",
    "**/__pycache__",
    ".pytest_cache",
    ".ruff_cache",
    "*.egg-info",
    ".whl",
]
# Credentials: env files, netrc, keys and certificates, cloud and ssh config, token files (Ray's
# auth_token, a cluster's token, hf_token.txt; not tokens.py or synthetic_tokens.yaml, which jobs need).
SECRET_EXCLUDES = [
    ".env*",
    ".netrc",
    "_netrc",
    "*.pem",
    "*.key",
    "*.p12",
    "*.pfx",
    "id_rsa*",
    "id_ecdsa*",
    "id_ed25519*",
    ".aws",
    ".ssh",
    ".gnupg",
    ".config",
    ".kube",
    ".docker",
    ".git-credentials",
    ".pypirc",
    "*credentials*",
    "*secret*",
    "*token",
    "*token.*",
    "*token_*",
    "*token-*",
    "*TOKEN*",
]
EXCLUDES = BUILD_EXCLUDES + SECRET_EXCLUDES
META_PREFIX = "orchestrator."
CONNECT_TIMEOUT_S = 5.0
RESPONSE_TIMEOUT_S = 30.0  # one request to the job API
SUBMIT_TIMEOUT_S = 300.0  # a submission, which uploads the working_dir first
LOG_CHECK_S = 10.0  # while a log is followed: how often the head must answer a status request
END_STATES = ("SUCCEEDED", "FAILED", "STOPPED")

T = TypeVar("T")


@dataclass(frozen=True)
class Submission:
    job_id: str
    run_dir: str
    overrides: list[str]


def resolve_cluster(name: str) -> Cluster:
    """A cluster started on this machine by ``cluster up --name NAME`` as started, else conf/cluster/NAME.yaml."""
    state = load_state(name)
    return state.as_cluster() if state is not None else load_cluster(name)


def client(cluster: Cluster) -> Any:
    """A JobSubmissionClient for ``cluster``, authenticated with its token.

    Raises:
        UserError: nothing answers at the address, or the cluster refuses the token.
    """
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    headers = {"Authorization": f"Bearer {read_token(cluster)}"} if cluster.token_file else {}
    _probe(cluster)
    # Ray's client narrates each file it packages, warns of its own default excludes and each closed
    # log stream: keep its errors only.
    for name in ("ray", "ray.dashboard.modules.dashboard_sdk", "ray.dashboard.modules.job.sdk"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        return _answer(
            cluster, lambda: JobSubmissionClient(cluster.address, headers=headers), timeout_s=RESPONSE_TIMEOUT_S
        )
    except AuthenticationError as exc:
        raise UserError(_refused(cluster, exc)) from None
    except (ConnectionError, RuntimeError) as exc:
        raise UserError(f"cluster={cluster.name}: no Ray job API at {cluster.address} ({first_line(exc)})") from None


def _probe(cluster: Cluster) -> None:
    """Fails within seconds where requests (which has no timeout here) would hang."""
    url = urlparse(cluster.address)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        local = url.hostname in ("127.0.0.1", "localhost")
        hint = f"; is it up? `orchestrator cluster up --name {cluster.name}`" if local else ""
        raise UserError(
            f"cluster={cluster.name}: nothing answers at {cluster.address} ({exc.strerror or exc}){hint}"
        ) from None


def _answer(cluster: Cluster, request: Callable[[], T], *, timeout_s: float) -> T:
    """``request()``, one call of Ray's job client, with a deadline: the client sets none, so a head that
    accepts the connection and never answers would hang the command. A request past its deadline is
    left to finish or fail in a daemon thread, which does not keep the process alive.

    Raises:
        UserError: no answer within ``timeout_s``.
    """
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = request()
        except BaseException as exc:  # handed to the caller's thread
            outcome["error"] = exc

    thread = threading.Thread(target=run, name="ray-job-api", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise UserError(
            f"cluster={cluster.name}: {cluster.address} accepted the connection but did not answer "
            f"within {timeout_s:g} s; is it a Ray dashboard, and is the head overloaded?"
        )
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def _refused(cluster: Cluster, exc: BaseException) -> str:
    return (
        f"cluster={cluster.name}: {cluster.address} refused the request ({first_line(exc)}; "
        f"token file {cluster.token_file})"
    )


def submit(cluster: Cluster, points: list[list[str]], *, group: str | None) -> list[Submission]:
    """Submits one Ray job per point (each a list of overrides); all are checked before the first is sent.

    Raises:
        UserError: a point's config is invalid, or the cluster cannot take jobs.
    """
    from omegaconf import OmegaConf

    storage = _storage(cluster)
    # A URI: each run dir is the job's own (in its working dir on the cluster), mirrored to the URI.
    remote = "://" in storage
    stamp = datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    prepared = []
    for index, overrides in enumerate(points):
        job = override_value(overrides, "job") or "default"
        suffix = uuid.uuid4().hex[:6]
        job_id = f"orchestrator-{job}-{stamp}-{suffix}".replace("_", "-")
        name = f"{job}/{stamp}" + (f"/{index}" if len(points) > 1 else f"-{suffix}")
        run_dir = f"outputs/{name}" if remote else f"{storage}/{name}"
        point = [
            *overrides,
            *_cluster_overrides(overrides, group),
            *([f"trainer.storage={storage}/{name}"] if remote else []),
        ]
        cfg = compose(point)
        config = to_config(cfg)
        prepared.append((job_id, run_dir, point, job, OmegaConf.to_yaml(cfg, resolve=True), config))
    jobs = client(cluster)
    submitted = []
    for job_id, run_dir, point, job, resolved, config in prepared:
        metadata = {
            f"{META_PREFIX}job": job,
            f"{META_PREFIX}run_dir": config.trainer.storage or run_dir,
            f"{META_PREFIX}strategy": config.strategy.name,
            f"{META_PREFIX}workers": str(config.launcher.num_workers),
        }
        if group:
            metadata[f"{META_PREFIX}group"] = group
        # Ray runs the entrypoint in a shell: each argument quoted (a storage path may hold a space or a `;`).
        entrypoint = shlex.join(["python", "-m", "orchestrator", "run-submitted", "--run-dir", run_dir, "--job", job])
        runtime_env = {"working_dir": str(PROJECT_DIR), "excludes": EXCLUDES, "env_vars": {CONFIG_ENV: resolved}}
        try:
            _answer(
                cluster,
                partial(
                    jobs.submit_job,
                    entrypoint=entrypoint,
                    submission_id=job_id,
                    runtime_env=runtime_env,
                    metadata=metadata,
                ),
                timeout_s=SUBMIT_TIMEOUT_S,
            )
        except RuntimeError as exc:
            raise UserError(f"cluster={cluster.name}: the job API refused the submission ({first_line(exc)})") from None
        submitted.append(Submission(job_id=job_id, run_dir=config.trainer.storage or run_dir, overrides=point))
    return submitted


def submit_experiment(
    cluster: Cluster, command: str, overrides: list[str], *, job: str, metadata: dict[str, str]
) -> str:
    """Submits ``orchestrator COMMAND OVERRIDES`` as one Ray job: its driver runs on the cluster, and
    each run it makes joins the cluster (``launcher.address=auto``) as a Ray Train run. Returns the job id.

    Raises:
        UserError: the cluster cannot take jobs.
    """
    stamp = datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    job_id = f"orchestrator-{command}-{job}-{stamp}-{uuid.uuid4().hex[:6]}".replace("_", "-")
    arguments = [*overrides, *_cluster_overrides(overrides, None)]
    entrypoint = shlex.join(["python", "-m", "orchestrator", command, *arguments])
    runtime_env = {"working_dir": str(PROJECT_DIR), "excludes": EXCLUDES}
    jobs = client(cluster)
    try:
        _answer(
            cluster,
            lambda: jobs.submit_job(
                entrypoint=entrypoint,
                submission_id=job_id,
                runtime_env=runtime_env,
                metadata={
                    f"{META_PREFIX}job": job,
                    f"{META_PREFIX}command": command,
                    **{f"{META_PREFIX}{key}": value for key, value in metadata.items()},
                },
            ),
            timeout_s=SUBMIT_TIMEOUT_S,
        )
    except RuntimeError as exc:
        raise UserError(f"cluster={cluster.name}: the job API refused the submission ({first_line(exc)})") from None
    return job_id


def shared_storage(cluster: Cluster, *, purpose: str) -> str:
    """The cluster's storage as a path every node and this machine share (not a URI)."""
    storage = _storage(cluster)
    if "://" in storage:
        raise UserError(
            f"cluster={cluster.name}: {purpose} needs a storage path every node shares; storage is {storage}"
        )
    return storage


def follow_or_hint(cluster: Cluster, job_id: str, *, follow_it: bool) -> int:
    """Follows a submitted job to its end (exit status 0 when it succeeded), or prints how to."""
    if not follow_it:
        print(f"follow: orchestrator jobs logs {job_id} --follow --cluster {cluster.name}")
        return 0
    status = follow(cluster, job_id)
    print(f"{job_id}: {status}", flush=True)
    return 0 if status == "SUCCEEDED" else 1


def follow(cluster: Cluster, job_id: str) -> str:
    """Prints the job's output until it ends; returns its final status."""
    job_logs(cluster, job_id, follow=True)
    return wait(cluster, job_id)


def _cluster_overrides(overrides: list[str], group: str | None) -> list[str]:
    """On a cluster the Ray launcher joins it (``auto``); a sweep's points share ``logger.group`` (W&B's group,
    with ``job_type`` sweep)."""
    extra = []
    joins = override_value(overrides, "launcher") in (None, "ray")
    if joins and not any(o.startswith("launcher.address=") for o in overrides):
        extra.append("launcher.address=auto")
    if group and not any(o.startswith("logger.group=") for o in overrides):
        extra.append(f"logger.group={group}")
    if group and not any(o.startswith("logger.job_type=") for o in overrides):
        extra.append("logger.job_type=sweep")
    return extra


def _storage(cluster: Cluster) -> str:
    """Where the cluster's runs go: the cluster's ``storage`` (a shared path or a URI), or this checkout's
    outputs/ for a cluster started here."""
    if cluster.storage:
        return cluster.storage.rstrip("/")
    if load_state(cluster.name) is not None:
        return str((PROJECT_DIR / "outputs").resolve())
    raise UserError(
        f"cluster={cluster.name}: set storage (a path every node shares, or a URI) in "
        f"conf/cluster/{cluster.name}.yaml; runs on a remote cluster cannot write to this machine"
    )


def run_submitted(args: list[str]) -> int:
    """The entrypoint of a submitted job, on the cluster: the resolved config from the runtime_env, trained."""
    import argparse

    parser = argparse.ArgumentParser(prog="orchestrator run-submitted")
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--job", default=None)
    parsed = parser.parse_args(args)
    resolved = os.environ.get(CONFIG_ENV)
    if not resolved:
        raise UserError(f"run-submitted runs jobs sent by `orchestrator submit`: {CONFIG_ENV} is not set")
    configure_logging()
    job = prepare_resolved(resolved, job_name=parsed.job)
    summary = run_job(job, run_dir=Path(parsed.run_dir).resolve())
    return 0 if summary.completed else 1


# ---------------------------------------------------------------------------------------------- jobs


def list_jobs(cluster: Cluster) -> list[dict[str, Any]]:
    jobs = client(cluster)
    rows = []
    for info in _answer(cluster, jobs.list_jobs, timeout_s=RESPONSE_TIMEOUT_S):
        metadata = info.metadata or {}
        rows.append(
            {
                "id": info.submission_id or info.job_id,
                "status": str(info.status.value if hasattr(info.status, "value") else info.status),
                "job": metadata.get(f"{META_PREFIX}job", "-"),
                "started": format_time(info.start_time),
                "run_dir": metadata.get(f"{META_PREFIX}run_dir", "-"),
                "start_time": info.start_time or 0,
            }
        )
    return sorted(rows, key=lambda row: row["start_time"])


def job_info(cluster: Cluster, job_id: str) -> Any:
    """Raises UserError for an id the cluster does not know."""
    jobs = client(cluster)
    try:
        return _answer(cluster, lambda: jobs.get_job_info(job_id), timeout_s=RESPONSE_TIMEOUT_S)
    except RuntimeError as exc:
        if "404" in str(exc) or "does not exist" in str(exc):
            raise UserError(
                f"no job {job_id!r} on cluster={cluster.name}; `orchestrator jobs list` shows its jobs"
            ) from None
        raise UserError(f"cluster={cluster.name}: {first_line(exc)}") from None


def job_logs(cluster: Cluster, job_id: str, *, follow: bool) -> None:
    """Prints the job's driver output; with ``follow``, until the job ends.

    Raises:
        UserError: the head stopped answering, or the log stream broke.
    """
    job_info(cluster, job_id)
    jobs = client(cluster)
    if not follow:
        sys.stdout.write(_answer(cluster, lambda: jobs.get_job_logs(job_id), timeout_s=RESPONSE_TIMEOUT_S))
        sys.stdout.flush()
        return
    _tail(cluster, jobs, job_id)


def _tail(cluster: Cluster, jobs: Any, job_id: str) -> None:
    """Streams the job's output until the stream ends (Ray ends it with the job).

    The stream has no deadline (a job may print nothing for an hour), so it runs in a daemon thread
    while this one asks the head for the job's status every ``LOG_CHECK_S``: a head that stops
    answering ends the tail with an error.
    """
    broken: list[BaseException] = []

    def stream() -> None:
        async def tail() -> None:
            async for lines in jobs.tail_job_logs(job_id):
                sys.stdout.write(lines)
                sys.stdout.flush()

        try:
            asyncio.run(tail())
        except Exception as exc:  # handed to the caller's thread
            broken.append(exc)

    thread = threading.Thread(target=stream, name="ray-job-logs", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(LOG_CHECK_S)
        if thread.is_alive() and _status(cluster, jobs, job_id) in END_STATES:
            thread.join(LOG_CHECK_S)  # the stream's last lines
            break
    if broken:
        raise UserError(f"cluster={cluster.name}: the log stream of {job_id} broke ({first_line(broken[0])})")


def _status(cluster: Cluster, jobs: Any, job_id: str) -> str:
    return str(_answer(cluster, lambda: jobs.get_job_status(job_id), timeout_s=RESPONSE_TIMEOUT_S).value)


def stop_job(cluster: Cluster, job_id: str) -> bool:
    job_info(cluster, job_id)
    jobs = client(cluster)
    return _answer(cluster, lambda: jobs.stop_job(job_id), timeout_s=RESPONSE_TIMEOUT_S)


def wait(cluster: Cluster, job_id: str, *, timeout_s: float | None = None) -> str:
    """Waits for the job to end; returns its final status (SUCCEEDED, FAILED, STOPPED).

    Raises:
        UserError: the head stopped answering.
    """
    jobs = client(cluster)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        status = _status(cluster, jobs, job_id)
        if status in END_STATES:
            return status
        if deadline is not None and time.monotonic() > deadline:
            return status
        time.sleep(1.0)


def format_time(ms: int | None) -> str:
    return datetime.fromtimestamp(ms / 1000).strftime("%Y-%m-%d %H:%M:%S") if ms else "-"


def default_cluster() -> str:
    return os.environ.get("ORCHESTRATOR_CLUSTER", DEFAULT_CLUSTER)
