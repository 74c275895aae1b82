"""trainer.storage against a real S3 API (moto's server on loopback): a run mirrored to a bucket survives
the loss of its run dir, resuming from the bucket with the losses of an uninterrupted run; a bucket that
stops answering mid-run costs warnings, not the run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from orchestrator.checkpoints import manifest
from tests.e2e.test_resume import kill_group, last_step, start, wait_for
from tests.helpers import MAX_STEPS, cli_in_process, resume_job, run_cli, tiny_job, train_losses

BUCKET = "runs"


@pytest.fixture(scope="module")
def moto(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.Popen, dict[str, str]]:
    """An S3 endpoint on loopback with one bucket: its server process, and the environment that points AWS
    clients at it."""
    import pyarrow.fs as pafs

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = open(tmp_path_factory.mktemp("moto") / "server.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT
    )
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_REGION": "us-east-1",
    }
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert time.monotonic() < deadline and server.poll() is None, "the S3 server did not start"
            time.sleep(0.1)
    pafs.S3FileSystem(
        endpoint_override=env["AWS_ENDPOINT_URL"],
        access_key="test",
        secret_key="test",
        region="us-east-1",
        allow_bucket_creation=True,
    ).create_dir(BUCKET)
    yield server, env
    server.terminate()
    server.wait()


@pytest.fixture(scope="module")
def s3(moto: tuple[subprocess.Popen, dict[str, str]]) -> dict[str, str]:
    """The environment that points AWS clients at the loopback S3 endpoint."""
    return moto[1]


def _bucket(env: dict[str, str]):
    import pyarrow.fs as pafs

    return pafs.S3FileSystem(
        endpoint_override=env["AWS_ENDPOINT_URL"], access_key="test", secret_key="test", region="us-east-1"
    )


def _read(env: dict[str, str], path: str) -> str:
    with _bucket(env).open_input_stream(f"{BUCKET}/{path}") as stream:
        return stream.read().decode()


def test_a_run_resumes_from_its_bucket_after_its_run_dir_is_lost(
    tmp_path: Path,
    cache_dir: Path,
    s3: dict[str, str],
    uninterrupted: dict[int, float],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for key, value in s3.items():
        monkeypatch.setenv(key, value)
    run_dir = tmp_path / "run"
    args = resume_job(cache_dir, run_dir, f"trainer.storage=s3://{BUCKET}/exp/run1")
    process = start(args, tmp_path)
    # Checkpoints reach the bucket in the background: wait for one there, not only in the run dir.
    wait_for(
        process,
        lambda: last_step(run_dir) >= 15 and _bucket_checkpoints(s3, "exp/run1") != [],
        what="step 15 and a checkpoint in the bucket",
    )
    kill_group(process)
    saved = _bucket_checkpoints(s3, "exp/run1")[0]
    assert manifest.step_of(Path(saved)) < MAX_STEPS
    shutil.rmtree(run_dir)  # the machine is gone: only the bucket has the run

    result = cli_in_process(*args, cwd=tmp_path, check=True)
    assert f"fetched {saved} from s3://{BUCKET}/exp/run1" in result.stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["resumed_from_step"] == manifest.step_of(Path(saved))
    # The records came back with the checkpoint: every step's loss, before the loss of the run dir and
    # after, equals the uninterrupted run's bit for bit.
    assert train_losses(run_dir) == uninterrupted
    # The bucket mirrors the run dir: the newest `keep` checkpoints, complete, and the records.
    assert _bucket_checkpoints(s3, "exp/run1") == [manifest.step_dir_name(s) for s in (MAX_STEPS, MAX_STEPS - 10)]
    stored = json.loads(_read(s3, f"exp/run1/checkpoints/{manifest.step_dir_name(MAX_STEPS)}/{manifest.MANIFEST}"))
    local = json.loads((run_dir / "checkpoints" / manifest.step_dir_name(MAX_STEPS) / manifest.MANIFEST).read_text())
    assert stored == local
    assert json.loads(_read(s3, "exp/run1/summary.json")) == summary
    assert _read(s3, "exp/run1/metrics.jsonl") == (run_dir / "metrics.jsonl").read_text()
    assert _read(s3, "exp/run1/config.yaml") == (run_dir / "config.yaml").read_text()

    # A new run must not train over the bucket's checkpoints unasked.
    again = cli_in_process(
        *resume_job(cache_dir, tmp_path / "other", f"trainer.storage=s3://{BUCKET}/exp/run1", "trainer.resume=never"),
        cwd=tmp_path,
    )
    assert again.returncode == 2 and "already holds checkpoints (newest step-00000040)" in again.stderr


def _bucket_checkpoints(env: dict[str, str], prefix: str) -> list[str]:
    from orchestrator.train.storage import RunStorage

    return RunStorage(f"s3://{BUCKET}/{prefix}").checkpoint_names()


def test_a_bucket_that_stops_answering_costs_warnings_not_the_run(
    tmp_path: Path, cache_dir: Path, moto: tuple[subprocess.Popen, dict[str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    server, env = moto
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    run_dir = tmp_path / "run"
    # 100 steps, a checkpoint every 10: the bucket stops (below) long before the run's last copies.
    process = start(
        [
            "train",
            *tiny_job(cache_dir),
            "trainer.max_steps=100",
            "trainer.eval_every=50",
            f"hydra.run.dir={run_dir}",
            f"trainer.storage=s3://{BUCKET}/hang",
            "trainer.storage_timeout_s=2",
        ],
        tmp_path,
    )
    # The driver's probe and the workers' look for checkpoints to fetch are done: the bucket now
    # accepts connections and never answers, as a store that hangs does.
    wait_for(process, lambda: last_step(run_dir) >= 1, what="the first step")
    os.kill(server.pid, signal.SIGSTOP)
    try:
        returncode = process.wait(timeout=600)
    finally:
        os.kill(server.pid, signal.SIGCONT)

    output = next(tmp_path.glob("log-*.txt")).read_text()
    assert returncode == 0, output
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 100
    # Rank 0 stopped its copies at the end of the run, the driver its own, each with one warning.
    assert (
        f"WARNING: trainer.storage=s3://{BUCKET}/hang: copies not done within trainer.storage_timeout_s=2 s "
        f"were stopped" in output
    ), output
    assert (
        f"warning: trainer.storage=s3://{BUCKET}/hang: copy failed (not done within trainer.storage_timeout_s=2 s"
        in output
    ), output
    assert not any(line.startswith("error:") for line in output.splitlines()), output


@pytest.mark.parametrize(
    ("storage", "expected"),
    [
        ("runs/exp", "trainer.storage must be a URI (s3://bucket/path, gs://..., file:///path), got 'runs/exp'"),
        ("s3://AKIAEXAMPLE:s3cr3t-value@runs/exp", "trainer.storage must not hold credentials (user:password@"),
        ("'s3://runs/exp?access_key=AKIAEXAMPLE&secret_key=s3cr3t-value'", "trainer.storage must not hold credentials"),
        ("nosuchfs://x/y", "trainer.storage=nosuchfs://x/y: Unrecognized filesystem type in URI: nosuchfs://x/y"),
        (f"s3://no-such-bucket-{BUCKET}/exp", f"trainer.storage=s3://no-such-bucket-{BUCKET}/exp: "),
    ],
)
def test_bad_storage_fails_in_the_driver(
    tmp_path: Path, cache_dir: Path, s3: dict[str, str], storage: str, expected: str
) -> None:
    result = run_cli(*resume_job(cache_dir, tmp_path / "run", f"trainer.storage={storage}"), cwd=tmp_path, env=s3)
    assert result.returncode == 2 and result.stderr.startswith(f"error: {expected}"), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "s3cr3t" not in result.stderr + result.stdout and "AKIAEXAMPLE" not in result.stderr + result.stdout
    assert not (tmp_path / "run").exists()
