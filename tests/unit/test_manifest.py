"""Checkpoint manifests: what verifies, what is skipped, what is an error."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.errors import UserError
from orchestrator.train import manifest


def make_checkpoint(root: Path, step: int, payload: bytes = b"weights", *, strategy: str = "ddp",
                    world_size: int = 2) -> Path:
    directory = root / manifest.step_dir_name(step)
    (directory / "rng").mkdir(parents=True)
    (directory / "model.pt").write_bytes(payload)
    (directory / "rng" / "rank-00000.pt").write_bytes(b"rng")
    files = {name: manifest.file_entry(directory / name) for name in ("model.pt", "rng/rank-00000.pt")}
    manifest.write_manifest(directory, files=files, step=step, world_size=world_size, strategy=strategy,
                            model_shapes={"weight": [2, 2]})
    return directory


def test_written_checkpoint_verifies(tmp_path: Path) -> None:
    directory = make_checkpoint(tmp_path, 10)
    saved = manifest.verify(directory)
    assert saved.step == 10 and saved.world_size == 2 and set(saved.files) == {"model.pt", "rng/rank-00000.pt"}
    assert saved.model_shapes == {"weight": [2, 2]}


def test_ranks_share_the_hashing(tmp_path: Path) -> None:
    directory = make_checkpoint(tmp_path, 10)
    (directory / "model.pt").write_bytes(b"weightz")  # same size, other content: only a hash tells
    # Files in sorted order: model.pt (0), rng/rank-00000.pt (1). Rank 1 of 2 hashes only the second.
    manifest.verify(directory, hash_share=(1, 2))
    with pytest.raises(manifest.CheckpointError, match="sha256"):
        manifest.verify(directory, hash_share=(0, 2))
    manifest.verify(directory, hash_share=None)  # sizes only


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda d: (d / "model.pt").write_bytes(b"weightz"), "sha256"),
        (lambda d: (d / "model.pt").write_bytes(b"weig"), "bytes"),
        (lambda d: (d / "model.pt").unlink(), "missing"),
        (lambda d: (d / manifest.MANIFEST).unlink(), "no manifest.json"),
        (lambda d: (d / manifest.MANIFEST).write_text("{"), "unreadable manifest"),
    ],
)
def test_damaged_checkpoint_fails_verification(tmp_path: Path, damage, reason: str) -> None:
    directory = make_checkpoint(tmp_path, 10)
    damage(directory)
    with pytest.raises(manifest.CheckpointError, match=reason):
        manifest.verify(directory)


def test_latest_valid_skips_damaged_and_unfinished(tmp_path: Path) -> None:
    make_checkpoint(tmp_path, 10)
    newest = make_checkpoint(tmp_path, 20)
    (newest / "model.pt").write_bytes(b"torn")
    unfinished = tmp_path / (manifest.step_dir_name(30) + ".tmp")
    unfinished.mkdir()
    found, skipped = manifest.latest_valid(tmp_path)
    assert found == tmp_path / manifest.step_dir_name(10)
    assert len(skipped) == 1 and "step-00000020" in skipped[0]


def test_explicit_resume_path_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="trainer.resume=.*no such file"):
        manifest.resolve_checkpoint(tmp_path / "nope", key="trainer.resume")
    broken = make_checkpoint(tmp_path / "run" / "checkpoints", 5)
    (broken / "model.pt").write_bytes(b"x")
    with pytest.raises(UserError, match="damaged checkpoint"):
        manifest.resolve_checkpoint(broken, key="trainer.resume")
    also_broken = make_checkpoint(tmp_path / "run" / "checkpoints", 6)
    (also_broken / "model.pt").unlink()
    with pytest.raises(UserError, match="no valid checkpoint there .*missing"):
        manifest.resolve_checkpoint(tmp_path / "run", key="trainer.resume")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no checkpoint"):
        manifest.resolve_checkpoint(tmp_path / "empty", key="trainer.resume")


def test_run_dir_resolves_to_its_newest_valid_checkpoint(tmp_path: Path) -> None:
    make_checkpoint(tmp_path / "run" / "checkpoints", 5)
    newest = make_checkpoint(tmp_path / "run" / "checkpoints", 15)
    assert manifest.resolve_checkpoint(tmp_path / "run", key="trainer.init_from") == newest
