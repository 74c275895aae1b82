"""``orchestrator submit`` / ``jobs`` against a stand-in job API on 127.0.0.1: what the working_dir carries,
how the entrypoint is quoted, and a head that accepts connections but never answers."""

from __future__ import annotations

import io
import json
import shlex
import socket
import subprocess
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable

import pytest
import ray

from orchestrator.cluster import jobs
from orchestrator.cluster.named import Cluster
from orchestrator.errors import UserError

HANG_GUARD_S = 120  # far beyond the deadlines these tests set: only a hang reaches it


class FakeJobAPI:
    """Ray's job API as the Python client sees it: records uploads and submissions; after ``answer``
    requests, holds every further one open without answering until closed."""

    def __init__(self, *, answer: int | None = None) -> None:
        self.uploads: list[bytes] = []
        self.submissions: list[dict[str, Any]] = []
        self._answer = answer
        self._count = 0
        self._lock = threading.Lock()
        self._release = threading.Event()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def close(self) -> None:
        self._release.set()
        self._server.shutdown()
        self._server.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _reply(self, status: int, body: Any = None) -> None:
                data = json.dumps(body).encode() if body is not None else b""
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _held(self) -> bool:
                with api._lock:
                    api._count += 1
                    held = api._answer is not None and api._count > api._answer
                if held:
                    api._release.wait()
                return held

            def do_GET(self) -> None:
                if self._held():
                    return
                if self.path == "/api/version":
                    self._reply(200, {"version": "4", "ray_version": ray.__version__, "ray_commit": "test"})
                elif self.path.startswith("/api/jobs/") and self.path.count("/") == 3:
                    self._reply(
                        200,
                        {
                            "type": "SUBMISSION",
                            "status": "RUNNING",
                            "entrypoint": "python",
                            "submission_id": self.path.rsplit("/", 1)[1],
                        },
                    )
                else:
                    self._reply(404)

            def do_PUT(self) -> None:
                if self._held():
                    return
                api.uploads.append(self.rfile.read(int(self.headers["Content-Length"])))
                self._reply(200)

            def do_POST(self) -> None:
                if self._held():
                    return
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                api.submissions.append(body)
                self._reply(200, {"job_id": body["submission_id"], "submission_id": body["submission_id"]})

        return Handler


@pytest.fixture
def api():
    server = FakeJobAPI()
    yield server
    server.close()


@pytest.fixture
def silent_head():
    """A TCP server on 127.0.0.1 that accepts every connection and never answers."""
    listener = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                held.append(listener.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    listener.close()
    for connection in held:
        connection.close()


def _within_guard(call: Callable[[], Any]) -> Any:
    """``call()`` in a thread; fails the test instead of hanging it when the call never returns."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = call()
        except BaseException as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(HANG_GUARD_S)
    assert not thread.is_alive(), "hung: no deadline"
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")


def _carried(upload: bytes) -> set[str]:
    with zipfile.ZipFile(io.BytesIO(upload)) as archive:
        return {name for name in archive.namelist() if not name.endswith("/")}


SECRETS = [
    ".env",
    ".env.production",
    "sub/.env.local",
    ".netrc",
    "server.pem",
    "certs/tls.key",
    "id_rsa",
    ".aws/credentials",
    ".ssh/id_ed25519",
    ".config/orchestrator/clusters/local/token",
    "auth_token",
    "hf_token.txt",
    "sub/github-token",
    "credentials.json",
    "client_secret.json",
]
PROJECT = [
    "train.py",
    "orchestrator/data/tokens.py",
    "conf/data/synthetic_tokens.yaml",
    "tokenizer.json",
    ".gitignore",
    "sub/notes.md",
]


def test_submit_never_carries_secrets_whatever_gitignore_says(
    api: FakeJobAPI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    project = tmp_path / "project"
    for name in SECRETS + PROJECT:
        (project / name).parent.mkdir(parents=True, exist_ok=True)
        (project / name).write_text("sentinel-secret" if name in SECRETS else "code")
    # A .gitignore that tries to bring secrets back.
    (project / ".gitignore").write_text("!.env\n!*.pem\n!.ssh/\n!auth_token\n")
    monkeypatch.setattr(jobs, "PROJECT_DIR", project)
    cluster = Cluster(name="fake", address=api.url, token_file=None, storage=str(tmp_path / "runs"))

    jobs.submit(cluster, [["job=gpt_tiny_cpu"]], group=None)

    assert len(api.uploads) == 1
    assert _carried(api.uploads[0]) == set(PROJECT)


def test_submit_carries_every_file_of_the_project_a_job_runs(api: FakeJobAPI, tmp_path: Path) -> None:
    cluster = Cluster(name="fake", address=api.url, token_file=None, storage=str(tmp_path / "runs"))
    jobs.submit(cluster, [["job=gpt_tiny_cpu"]], group=None)

    carried = _carried(api.uploads[0])
    needed = {
        str(path.relative_to(jobs.PROJECT_DIR))
        for pattern in ("orchestrator/**/*.py", "conf/**/*.yaml", "jobs/**/*.py", "pyproject.toml")
        for path in jobs.PROJECT_DIR.glob(pattern)
        if "__pycache__" not in path.parts
    }
    assert "orchestrator/data/tokens.py" in needed and needed <= carried, sorted(needed - carried)


def test_the_entrypoint_quotes_every_argument(api: FakeJobAPI, tmp_path: Path) -> None:
    pwned = tmp_path / "pwned"
    storage = f"{tmp_path}/my runs; touch {pwned} #"
    cluster = Cluster(name="fake", address=api.url, token_file=None, storage=storage)

    [submission] = jobs.submit(cluster, [["job=gpt_tiny_cpu"]], group=None)
    jobs.submit_experiment(
        cluster, "scale", ["job=gpt_tiny_cpu", f"logger.group=a b; touch {pwned} #"], job="gpt_tiny_cpu", metadata={}
    )

    submitted, experiment = (body["entrypoint"] for body in api.submissions)
    assert submission.run_dir.startswith(storage)
    assert shlex.split(submitted) == [
        "python",
        "-m",
        "orchestrator",
        "run-submitted",
        "--run-dir",
        submission.run_dir,
        "--job",
        "gpt_tiny_cpu",
    ]
    assert shlex.split(experiment) == [
        "python",
        "-m",
        "orchestrator",
        "scale",
        "job=gpt_tiny_cpu",
        f"logger.group=a b; touch {pwned} #",
        "launcher.address=auto",
    ]
    for entrypoint in (submitted, experiment):  # as Ray runs it: in a shell
        subprocess.run(["sh", "-c", entrypoint.replace("python", "true", 1)], check=True, cwd=tmp_path)
    assert not pwned.exists()


def test_a_search_is_checked_here_and_submitted_as_one_job(api: FakeJobAPI, tmp_path: Path) -> None:
    from orchestrator.search.command import submit_search

    cluster = Cluster(name="fake", address=api.url, token_file=None, storage=str(tmp_path / "shared"))
    search = [
        "job=gpt_tiny_cpu",
        "launcher.num_workers=1",
        "search.num_samples=8",
        "optim.lr=tag(log,interval(1e-4,1e-2))",
    ]
    with pytest.raises(UserError, match="model.n_layer=range"):  # refused before anything is sent
        submit_search(cluster, [*search, "model.n_layer=range(3,3)"])
    assert not api.submissions

    job_id, search_dir = submit_search(cluster, search)
    [body] = api.submissions
    assert body["submission_id"] == job_id and search_dir == f"{tmp_path}/shared/search/gpt_tiny_cpu"
    assert shlex.split(body["entrypoint"]) == [
        "python",
        "-m",
        "orchestrator",
        "search",
        *search,
        f"search.output_dir={search_dir}",
        "launcher.address=auto",
    ]


@pytest.mark.parametrize(
    "call",
    [
        jobs.client,
        jobs.list_jobs,
        lambda cluster: jobs.job_info(cluster, "some-job"),
        lambda cluster: jobs.job_logs(cluster, "some-job", follow=True),
    ],
    ids=["client", "list", "status", "logs-follow"],
)
def test_a_head_that_never_answers_is_an_error_not_a_hang(
    silent_head: str, call: Callable[[Cluster], Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(jobs, "RESPONSE_TIMEOUT_S", 1.0)
    cluster = Cluster(name="silent", address=silent_head, token_file=None)
    with pytest.raises(UserError) as error:
        _within_guard(lambda: call(cluster))
    assert str(error.value) == (
        f"cluster=silent: {silent_head} accepted the connection but did not answer within "
        f"1 s; is it a Ray dashboard, and is the head overloaded?"
    )


def test_following_logs_ends_with_an_error_when_the_head_stops_answering(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(jobs, "RESPONSE_TIMEOUT_S", 1.0)
    monkeypatch.setattr(jobs, "LOG_CHECK_S", 0.2)
    # Answers the version check, the job's info and the second client's version check; then neither
    # the log stream nor the status checks get an answer.
    api = FakeJobAPI(answer=3)
    try:
        cluster = Cluster(name="fading", address=api.url, token_file=None)
        with pytest.raises(UserError, match=r"^cluster=fading: .* did not answer within 1 s"):
            _within_guard(lambda: jobs.job_logs(cluster, "some-job", follow=True))
    finally:
        api.close()
