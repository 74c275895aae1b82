"""trainer.storage's background copies (train/storage.py ``Uploads``) against a ``file://`` store."""

from __future__ import annotations

import os
from pathlib import Path

from orchestrator.checkpoints import manifest
from orchestrator.train.storage import RunStorage, Uploads


def _checkpoint(run_dir: Path, step: int) -> Path:
    directory = run_dir / "checkpoints" / manifest.step_dir_name(step)
    directory.mkdir(parents=True)
    (directory / "model.pt").write_bytes(os.urandom(1024))
    (directory / manifest.MANIFEST).write_text("{}")
    return directory


def test_queued_checkpoints_end_with_the_newest_and_the_records_in_the_store(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    steps = (10, 20, 30)
    directories = [_checkpoint(run_dir, step) for step in steps]
    (run_dir / "metrics.jsonl").write_text('{"step": 30, "loss": 1.0}\n')
    uri = f"file://{tmp_path}/store"
    RunStorage(uri).check()  # the driver's probe, which also makes the store's directory
    uploads = Uploads(uri, run_dir)
    for directory in directories:  # faster than they are copied: a waiting one is superseded by the next
        uploads.submit(directory, keep=[directory.name])
    assert uploads.close(timeout_s=120)
    # The storage keeps what the last one's `keep` names, complete, and the records.
    assert RunStorage(uri).checkpoint_names() == [manifest.step_dir_name(30)]
    stored = tmp_path / "store" / "checkpoints" / manifest.step_dir_name(30) / "model.pt"
    assert stored.read_bytes() == (directories[-1] / "model.pt").read_bytes()
    assert (tmp_path / "store" / "metrics.jsonl").read_text() == (run_dir / "metrics.jsonl").read_text()


def test_a_copy_that_never_finishes_is_stopped_at_close(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    os.mkfifo(run_dir / "metrics.jsonl")  # no writer: reading it blocks, as a store that never answers does
    uploads = Uploads(f"file://{tmp_path}/store", run_dir)
    uploads.submit()
    uploads.submit(_checkpoint(run_dir, 10), keep=[manifest.step_dir_name(10)])  # returns: the child is stuck
    assert not uploads.close(timeout_s=1)
    assert not (tmp_path / "store" / "checkpoints").exists()
