"""Exact resume: SIGKILL a run at any step, or during a checkpoint save, or one worker; run again."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import psutil

from orchestrator.checkpoints import manifest
from tests.helpers import CLI, MAX_STEPS, cli_in_process, committed_step, train_losses
from tests.helpers import resume_job as job


def start(args: list[str], cwd: Path) -> subprocess.Popen:
    log = open(cwd / f"log-{time.monotonic_ns()}.txt", "w")
    return subprocess.Popen([str(CLI), *args], cwd=cwd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def wait_for(process: subprocess.Popen, predicate, *, what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if process.poll() is not None:
            raise AssertionError(f"the run exited ({process.returncode}) before {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


def last_step(run_dir: Path) -> int:
    losses = train_losses(run_dir) if (run_dir / "metrics.jsonl").exists() else {}
    return max(losses, default=0)


def workers_of(process: subprocess.Popen) -> list[psutil.Process]:
    """The run's worker processes (the launcher names them ``orch-rank<N>``), not the launcher."""
    return [p for p in psutil.Process(process.pid).children(recursive=True) if p.name().startswith("orch-rank")]


def kill_one_worker(process: subprocess.Popen) -> None:
    """SIGKILLs one of the run's worker processes."""
    workers_of(process)[0].kill()


def kill_group(process: subprocess.Popen) -> None:
    """SIGKILLs the run's process group and waits until every member is gone, not only the launcher: a
    worker still exiting holds the run dir, and a run started at once would find it in use."""
    members = psutil.Process(process.pid).children(recursive=True)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    psutil.wait_procs(members, timeout=60)


def test_sigkill_mid_run_then_resume_gives_bitwise_identical_losses(
    tmp_path: Path, cache_dir: Path, uninterrupted: dict[int, float]
) -> None:
    run_dir = tmp_path / "run"
    process = start(job(cache_dir, run_dir), tmp_path)
    wait_for(process, lambda: last_step(run_dir) >= 15 and committed_step(run_dir) >= 10, what="step 15")
    kill_group(process)
    killed_at, committed = last_step(run_dir), committed_step(run_dir)
    assert 15 <= killed_at < MAX_STEPS and committed in range(10, killed_at + 1, 10)

    result = cli_in_process(*job(cache_dir, run_dir), cwd=tmp_path, check=True)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == MAX_STEPS
    assert summary["resumed_from_step"] == committed and "resumed from" in result.stdout
    # Every step's loss, before and after the kill, equals the uninterrupted run's bit for bit,
    # and metrics.jsonl holds each step once.
    assert train_losses(run_dir) == uninterrupted
    steps = [
        json.loads(line)["step"]
        for line in (run_dir / "metrics.jsonl").read_text().splitlines()
        if "loss" in json.loads(line)
    ]
    assert steps == sorted(set(steps))


def test_sigkill_during_a_checkpoint_save_never_leaves_a_loadable_partial(tmp_path: Path, cache_dir: Path) -> None:
    # A model big enough (~25M parameters, ~300 MB of checkpoint) that saving takes a while; a small
    # batch, so that its steps do not.
    big = [
        "model.n_layer=4",
        "model.n_embd=512",
        "model.n_head=8",
        "trainer.global_batch_size=4",
        "trainer.micro_batch_size=2",
        "trainer.max_steps=5",
        "trainer.checkpoint.every=2",
        "trainer.eval_every=0",
    ]
    run_dir = tmp_path / "run"
    process = start(job(cache_dir, run_dir, *big), tmp_path)
    partial = run_dir / "checkpoints" / (manifest.step_dir_name(4) + ".tmp")
    wait_for(process, partial.exists, what="the step-4 save to start")
    kill_group(process)

    # Whatever the kill interrupted, every finished-looking checkpoint verifies, and resume picks one.
    for directory in manifest.checkpoint_dirs(run_dir / "checkpoints"):
        manifest.verify(directory)
    result = cli_in_process(*job(cache_dir, run_dir, *big), cwd=tmp_path, check=True)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 5
    assert summary["resumed_from_step"] in (2, 4)
    assert not any(p.name.endswith(".tmp") for p in (run_dir / "checkpoints").iterdir())
    if summary["resumed_from_step"] == 2:
        assert "removing an unfinished checkpoint save" in result.stderr


def test_damaged_newest_checkpoint_is_skipped_on_auto_resume_and_refused_when_named(
    tmp_path: Path, cache_dir: Path
) -> None:
    run_dir = tmp_path / "run"
    cli_in_process(*job(cache_dir, run_dir, "trainer.max_steps=20"), cwd=tmp_path, check=True)
    newest = run_dir / "checkpoints" / "step-00000020"
    with open(newest / "model.pt", "r+b") as f:
        f.seek(100)
        f.write(b"\x00\x01\x02\x03")

    named = cli_in_process(*job(cache_dir, tmp_path / "other", f"trainer.resume={newest}"), cwd=tmp_path)
    assert named.returncode == 2
    assert named.stderr.strip().startswith("error: trainer.resume=") and "sha256" in named.stderr
    assert len(named.stderr.strip().splitlines()) == 1 and not (tmp_path / "other").exists()

    resumed = cli_in_process(*job(cache_dir, run_dir, "trainer.max_steps=30"), cwd=tmp_path, check=True)
    assert "skipping a damaged checkpoint" in resumed.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["resumed_from_step"] == 10 and summary["steps"] == 30


def test_a_killed_worker_is_restarted_and_the_run_matches_an_uninterrupted_one(
    tmp_path: Path, cache_dir: Path, uninterrupted: dict[int, float]
) -> None:
    run_dir = tmp_path / "run"
    process = start(job(cache_dir, run_dir, "trainer.max_restarts=1"), tmp_path)
    wait_for(process, lambda: last_step(run_dir) >= 15, what="step 15")
    workers = workers_of(process)
    assert len(workers) == 2
    workers[-1].kill()
    assert process.wait(timeout=180) == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["restarts"] == 1 and summary["steps"] == MAX_STEPS
    assert train_losses(run_dir) == uninterrupted


def test_too_many_failures_fail_the_run_with_the_reason(tmp_path: Path, cache_dir: Path) -> None:
    run_dir = tmp_path / "run"
    process = start(job(cache_dir, run_dir), tmp_path)  # max_restarts=0
    wait_for(process, lambda: last_step(run_dir) >= 5, what="step 5")
    kill_one_worker(process)
    assert process.wait(timeout=120) == 1
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and "SIGKILL" in summary["error"]


def test_a_finished_run_run_again_has_nothing_to_do(tmp_path: Path, cache_dir: Path, uninterrupted_run: Path) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(uninterrupted_run, run_dir)
    before = (run_dir / "summary.json").read_text()
    metrics_before = (run_dir / "metrics.jsonl").read_text()
    again = cli_in_process(*job(cache_dir, run_dir), cwd=tmp_path, check=True)
    assert f"already complete at step {MAX_STEPS}" in again.stdout
    assert (run_dir / "summary.json").read_text() == before
    assert (run_dir / "metrics.jsonl").read_text() == metrics_before


def test_run_dir_checkpoints_are_never_overwritten_or_misused(tmp_path: Path, cache_dir: Path) -> None:
    run_dir = tmp_path / "run"
    cli_in_process(*job(cache_dir, run_dir, "trainer.max_steps=10"), cwd=tmp_path, check=True)

    fresh = cli_in_process(*job(cache_dir, run_dir, "trainer.resume=never"), cwd=tmp_path)
    assert fresh.returncode == 2
    assert fresh.stderr.strip() == (
        f"error: trainer.resume=never but hydra.run.dir={run_dir} already holds "
        f"checkpoints (newest step-00000010); continue it with trainer.resume=auto "
        f"or use another hydra.run.dir"
    )

    other_model = cli_in_process(*job(cache_dir, run_dir, "model.n_embd=96"), cwd=tmp_path)
    assert other_model.returncode == 2
    assert "cannot use checkpoint step-00000010: it was written for another model" in other_model.stderr

    tuned = cli_in_process(
        *job(cache_dir, tmp_path / "tuned", f"trainer.init_from={run_dir}", "model.n_layer=3"), cwd=tmp_path
    )
    assert tuned.returncode == 2 and not (tmp_path / "tuned").exists()
    assert tuned.stderr.strip().startswith(f"error: trainer.init_from={run_dir}: cannot use checkpoint step-00000010")


def test_a_restart_before_the_first_save_resumes_from_the_named_checkpoint_again(
    tmp_path: Path, cache_dir: Path
) -> None:
    source = tmp_path / "source"
    cli_in_process(*job(cache_dir, source, "trainer.max_steps=20"), cwd=tmp_path, check=True)
    run_dir = tmp_path / "run"
    process = start(
        job(cache_dir, run_dir, f"trainer.resume={source}", "trainer.max_restarts=1", "trainer.checkpoint.every=1000"),
        tmp_path,
    )
    wait_for(process, lambda: last_step(run_dir) >= 25, what="step 25")
    kill_one_worker(process)
    assert process.wait(timeout=180) == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["restarts"] == 1 and summary["resumed_from_step"] == 20 and summary["steps"] == MAX_STEPS
