"""Checkpoint manifests: what verifies, what is skipped, what is an error."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from orchestrator.checkpoints import manifest
from orchestrator.errors import UserError


def make_checkpoint(
    root: Path, step: int, payload: bytes = b"weights", *, strategy: str = "ddp", world_size: int = 2
) -> Path:
    directory = root / manifest.step_dir_name(step)
    (directory / "rng").mkdir(parents=True)
    (directory / "model.pt").write_bytes(payload)
    (directory / "rng" / "rank-00000.pt").write_bytes(b"rng")
    files = {name: manifest.file_entry(directory / name) for name in ("model.pt", "rng/rank-00000.pt")}
    manifest.write_manifest(
        directory, files=files, step=step, world_size=world_size, strategy=strategy, model_shapes={"weight": [2, 2]}
    )
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


def _relist(directory: Path, files: dict[str, dict]) -> None:
    """Rewrites the manifest with ``files`` (what someone handing over a checkpoint controls)."""
    manifest.write_manifest(
        directory, files=files, step=10, world_size=2, strategy="ddp", model_shapes={"weight": [2, 2]}
    )


def _listed(directory: Path) -> dict[str, dict]:
    return dict(manifest.read_manifest(directory).files)


@pytest.mark.parametrize(
    ("tamper", "reason"),
    [
        (lambda d, outside: (d / "extra.pt").write_bytes(b"unhashed"), "extra.pt is not in the manifest"),
        (lambda d, outside: _relist(d, {}), "the manifest lists no files"),
        (
            lambda d, outside: _relist(d, {**_listed(d), "../secret": {"size": 1, "sha256": "0"}}),
            "'../secret', a path outside the checkpoint",
        ),
        (
            lambda d, outside: _relist(d, {**_listed(d), str(outside): {"size": 1, "sha256": "0"}}),
            "a path outside the checkpoint",
        ),
        (
            lambda d, outside: ((d / "model.pt").unlink(), (d / "model.pt").symlink_to(outside)),
            "model.pt is a symbolic link",
        ),
        (
            lambda d, outside: (
                (d / "rng").rename(outside.with_name("rng")),
                (d / "rng").symlink_to(outside.with_name("rng")),
            ),
            "rng is a symbolic link",
        ),
        (lambda d, outside: os.mkfifo(d / "pipe"), "pipe is not a regular file"),
    ],
    ids=["unlisted file", "empty list", "dot-dot", "absolute path", "symlinked file", "symlinked dir", "fifo"],
)
def test_the_manifest_is_a_full_inventory(tmp_path: Path, tamper, reason: str) -> None:
    directory = make_checkpoint(tmp_path / "checkpoints", 10)
    outside = tmp_path / "outside.pt"
    outside.write_bytes(b"weights")  # the same bytes as model.pt: only the inventory can tell
    tamper(directory, outside)
    with pytest.raises(manifest.CheckpointError, match=re.escape(reason)):
        manifest.verify(directory)


def test_steps_have_no_upper_limit(tmp_path: Path) -> None:
    for step in (99_999_999, 100_000_000, 1_234_567_890):
        make_checkpoint(tmp_path, step)
    found = manifest.checkpoint_dirs(tmp_path)
    assert [manifest.step_of(d) for d in found] == [1_234_567_890, 100_000_000, 99_999_999]
    assert manifest.latest_valid(tmp_path)[0].name == "step-1234567890"


def test_a_resave_of_a_step_always_leaves_a_complete_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from orchestrator.train.checkpoint import _replace_dir

    root = tmp_path / "checkpoints"
    final = make_checkpoint(root, 10, b"old weights")
    staged = make_checkpoint(tmp_path / "staging", 10, b"new weights").rename(root / "step-00000010.tmp")
    real_rename = Path.rename
    renames: list[Path] = []

    def dies_on_the_second_rename(self: Path, target: Path) -> Path:
        if renames:
            raise KeyboardInterrupt("killed between the two renames")
        renames.append(self)
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", dies_on_the_second_rename)
    with pytest.raises(KeyboardInterrupt):
        _replace_dir(staged, final)
    monkeypatch.undo()
    assert not final.exists()  # the moment between the renames: the old copy is aside, whole
    manifest.recover_replaced(root)  # what the next start does first
    assert manifest.verify(final).step == 10 and (final / "model.pt").read_bytes() == b"old weights"

    _replace_dir(staged, final)  # uninterrupted: the new copy, nothing left aside
    assert (final / "model.pt").read_bytes() == b"new weights"
    assert sorted(p.name for p in root.iterdir()) == ["step-00000010"]
