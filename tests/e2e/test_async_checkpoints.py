"""Kill drills for checkpoints written in the background (``trainer.checkpoint.async_save``, on by default):
a run SIGKILLed while a save is still being written keeps its previous checkpoint, never loads the
partial one, and resumes bit for bit; a background write that fails fails the run with the reason.

The write window is made deterministic with the checkpoint writer's test hook
(``ORCHESTRATOR_TEST_HOLD_CHECKPOINT``): the writer of step 20 stops after its model and optimizer files,
and training goes on meanwhile.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Callable

import pytest

from orchestrator.checkpoints import manifest
from orchestrator.train.checkpoint import HOLD_ENV
from tests.helpers import CLI, MAX_STEPS, cli_in_process, train_losses
from tests.helpers import resume_job as job

HELD = manifest.step_dir_name(20)


def _start(args: list[str], cwd: Path, hold_dir: Path) -> subprocess.Popen:
    log = open(cwd / f"log-{time.monotonic_ns()}.txt", "w")
    return subprocess.Popen(
        [str(CLI), *args],
        cwd=cwd,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env={**os.environ, HOLD_ENV: str(hold_dir)},
    )


def _wait_for(process: subprocess.Popen, predicate: Callable[[], bool], *, what: str) -> None:
    deadline = time.monotonic() + 180
    while not predicate():
        if process.poll() is not None:
            raise AssertionError(f"the run exited ({process.returncode}) before {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def _last_step(run_dir: Path) -> int:
    return max(train_losses(run_dir), default=0) if (run_dir / "metrics.jsonl").exists() else 0


def _run_until_held(tmp_path: Path, run_dir: Path, args: list[str]) -> subprocess.Popen:
    """Starts the run with the step-20 save held; returns once both ranks hold it and training is 3 steps on."""
    hold_dir = tmp_path / "hold"
    hold_dir.mkdir()
    (hold_dir / HELD).touch()
    process = _start(args, tmp_path, hold_dir)
    _wait_for(
        process,
        lambda: all((hold_dir / f"{HELD}.rank-{rank}").exists() for rank in (0, 1)),
        what="both ranks writing step 20",
    )
    _wait_for(process, lambda: _last_step(run_dir) >= 23, what="step 23")  # the save does not block training
    return process


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2", "zero3"])
def test_sigkill_while_a_background_save_is_written_keeps_the_previous_one_and_resumes_exactly(
    strategy: str, tmp_path: Path, cache_dir: Path, request: pytest.FixtureRequest
) -> None:
    run_dir = tmp_path / "run"
    args = job(cache_dir, run_dir, f"strategy={strategy}")
    process = _run_until_held(tmp_path, run_dir, args)
    checkpoints = run_dir / "checkpoints"
    assert (checkpoints / manifest.LATEST).read_text().strip() == manifest.step_dir_name(10)
    partial = checkpoints / f"{HELD}.tmp"
    assert any(p.is_file() for p in partial.rglob("*")) and not (partial / manifest.MANIFEST).exists()
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()

    # The previous checkpoint is complete; the half-written one is not a checkpoint.
    assert [d.name for d in manifest.checkpoint_dirs(checkpoints)] == [manifest.step_dir_name(10)]
    manifest.verify(checkpoints / manifest.step_dir_name(10))
    before = train_losses(run_dir)
    assert len(before) >= 23

    result = cli_in_process(*args, cwd=tmp_path, check=True)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == MAX_STEPS and summary["resumed_from_step"] == 10
    assert "removing an unfinished checkpoint save" in result.stderr and not partial.exists()
    after = train_losses(run_dir)
    assert {step: after[step] for step in before} == before  # steps 11-23 again, bit for bit
    if strategy == "ddp":
        assert after == request.getfixturevalue("uninterrupted")
    assert [manifest.step_of(d) for d in manifest.checkpoint_dirs(checkpoints)] == [40, 30]


def test_a_background_write_that_fails_fails_the_run_with_the_reason(tmp_path: Path, cache_dir: Path) -> None:
    run_dir = tmp_path / "run"
    process = _run_until_held(tmp_path, run_dir, job(cache_dir, run_dir))
    shutil.rmtree(run_dir / "checkpoints" / f"{HELD}.tmp")  # the held writer's files are gone from under it
    (tmp_path / "hold" / HELD).unlink()
    assert process.wait(timeout=180) == 1
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed"
    assert summary["error"].startswith(f"checkpoint {HELD} could not be written in the background (rank ")
    assert "FileNotFoundError" in summary["error"] and summary["steps"] < MAX_STEPS
    assert (run_dir / "checkpoints" / manifest.LATEST).read_text().strip() == manifest.step_dir_name(10)
