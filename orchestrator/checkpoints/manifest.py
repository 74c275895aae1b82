"""Checkpoint directories on disk: naming, the manifest, verification, and choosing one to resume from.

A checkpoint is ``checkpoints/step-XXXXXXXX/`` holding whatever the strategy wrote plus ``manifest.json``
(every file's size and sha256, the step, the world size, the strategy, the model's state-dict shapes).
It is written under a ``.tmp`` name and renamed only after every rank has written, fsynced and hashed
its files and rank 0 has written the manifest, so a directory with a manifest that verifies is complete
by construction, and anything else (a ``.tmp`` leftover, a missing or mismatching file) is never loaded.

The manifest is a full inventory: a checkpoint verifies only when its regular files are exactly the
ones listed (no more, no fewer, none outside the directory) and it holds no symbolic link or other
special file, so nothing can ride along unhashed.

This module uses the standard library only: the CLI checks a resume path before importing torch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from orchestrator.errors import UserError
from orchestrator.fsutil import write_atomic

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
LATEST = "latest"
REPLACED_SUFFIX = ".replaced"  # a checkpoint moved aside while the same step is saved again
FORMAT_VERSION = 1
# Above this, the driver checks sizes only and leaves hashing to the workers, who share it out.
DRIVER_HASH_LIMIT_BYTES = 2 << 30
_STEP_DIR = re.compile(r"^step-(\d{8,})$")  # 8 digits at least: steps have no upper limit


class CheckpointError(Exception):
    """A checkpoint directory that must not be loaded, with the reason."""


@dataclass(frozen=True, kw_only=True)
class Manifest:
    step: int
    world_size: int
    strategy: str
    files: dict[str, dict]
    model_shapes: dict[str, list[int]] | None

    @property
    def total_bytes(self) -> int:
        return sum(entry["size"] for entry in self.files.values())


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def step_of(directory: Path) -> int | None:
    match = _STEP_DIR.match(directory.name)
    return int(match.group(1)) if match else None


def checkpoint_step(directory: Path) -> int:
    """The step of ``directory``, a ``step-N`` checkpoint directory (as ``checkpoint_dirs`` lists them)."""
    step = step_of(directory)
    if step is None:
        raise ValueError(f"{directory} is not a checkpoint directory (step-N)")
    return step


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_entry(path: Path) -> dict:
    """What the manifest records of one file."""
    return {"size": path.stat().st_size, "sha256": sha256_of(path)}


def write_manifest(
    directory: Path,
    *,
    files: dict[str, dict],
    step: int,
    world_size: int,
    strategy: str,
    model_shapes: dict[str, list[int]],
) -> None:
    """Writes ``manifest.json`` for the files (relative path -> ``file_entry``) every rank wrote."""
    manifest = {
        "format_version": FORMAT_VERSION,
        "step": step,
        "world_size": world_size,
        "strategy": strategy,
        "files": dict(sorted(files.items())),
        "model": {"shapes": model_shapes},
    }
    write_atomic(directory / MANIFEST, json.dumps(manifest, indent=1) + "\n")


def read_manifest(directory: Path) -> Manifest:
    """The manifest of ``directory``, unverified; CheckpointError if there is none or it is unreadable."""
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"{directory}: no {MANIFEST} (incomplete checkpoint)")
    try:
        raw = json.loads(manifest_path.read_text())
        version = raw["format_version"]
        manifest = Manifest(
            step=int(raw["step"]),
            world_size=int(raw["world_size"]),
            strategy=str(raw["strategy"]),
            files=dict(raw["files"]),
            model_shapes=raw.get("model", {}).get("shapes"),
        )
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{manifest_path}: unreadable manifest ({exc})") from None
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{manifest_path}: format version {version}, this orchestrator reads {FORMAT_VERSION}")
    return manifest


def verify(directory: Path, *, hash_share: tuple[int, int] | None = (0, 1)) -> Manifest:
    """The manifest of a complete, intact checkpoint; ``CheckpointError`` saying what is wrong otherwise.

    Args:
        directory: the checkpoint.
        hash_share: ``(index, count)``: hash every ``count``-th file from ``index`` (ranks share the work);
            None checks sizes only.
    """
    manifest = read_manifest(directory)
    _check_inventory(directory, manifest.files)
    for position, (name, entry) in enumerate(sorted(manifest.files.items())):
        path = directory / name
        if not path.is_file():
            raise CheckpointError(f"{directory}: {name} is missing")
        if path.stat().st_size != entry["size"]:
            raise CheckpointError(f"{directory}: {name} has {path.stat().st_size} bytes, manifest says {entry['size']}")
        if hash_share is not None and position % hash_share[1] == hash_share[0]:
            if sha256_of(path) != entry["sha256"]:
                raise CheckpointError(f"{directory}: {name} does not match its sha256 (corrupt)")
    return manifest


def _check_inventory(directory: Path, files: dict[str, dict]) -> None:
    """The directory's files are exactly the manifest's: regular files, listed, inside the directory."""
    if not files:
        raise CheckpointError(f"{directory}: the manifest lists no files")
    for name in files:
        parts = PurePosixPath(name).parts
        if not parts or PurePosixPath(name).is_absolute() or ".." in parts or "\\" in name:
            raise CheckpointError(f"{directory}: the manifest lists {name!r}, a path outside the checkpoint")
    found = set()
    for parent, dirnames, filenames in os.walk(directory):
        for name in dirnames + filenames:
            path = Path(parent) / name
            mode = path.lstat().st_mode
            relative = path.relative_to(directory).as_posix()
            if stat.S_ISLNK(mode):
                raise CheckpointError(
                    f"{directory}: {relative} is a symbolic link (a checkpoint holds regular files only)"
                )
            if stat.S_ISREG(mode):
                found.add(relative)
            elif not stat.S_ISDIR(mode):
                raise CheckpointError(f"{directory}: {relative} is not a regular file")
    unlisted = sorted(found - set(files) - {MANIFEST})
    if unlisted:
        raise CheckpointError(
            f"{directory}: {unlisted[0]} is not in the manifest"
            f"{f' (and {len(unlisted) - 1} more)' if len(unlisted) > 1 else ''}"
        )


def checkpoint_dirs(root: Path) -> list[Path]:
    """Finished checkpoint directories under ``root``, newest step first (no verification)."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and step_of(p) is not None]
    return sorted(found, key=checkpoint_step, reverse=True)


def recover_replaced(root: Path) -> None:
    """Finishes or undoes a re-save that a dead process left half done: a checkpoint moved aside
    (``step-N.replaced``) goes back when ``step-N`` is gone, and is deleted when ``step-N`` is there."""
    if not root.is_dir():
        return
    for aside in root.glob(f"step-*{REPLACED_SUFFIX}"):
        final = aside.with_name(aside.name[: -len(REPLACED_SUFFIX)])
        if step_of(final) is None:
            continue
        if final.exists():
            shutil.rmtree(aside)
        else:
            log.warning("restoring %s: its re-save did not finish", final)
            aside.rename(final)


def latest_valid(root: Path) -> tuple[Path | None, list[str]]:
    """The newest checkpoint under ``root`` that verifies, and the reasons the newer ones did not."""
    skipped: list[str] = []
    for directory in checkpoint_dirs(root):
        try:
            verify(directory)
        except CheckpointError as exc:
            skipped.append(str(exc))
            continue
        return directory, skipped
    return None, skipped


def candidates(path: str | Path, *, key: str) -> list[Path]:
    """The checkpoints an explicit path offers, newest first: itself, or those of a run or ``checkpoints/`` dir.

    Raises ``UserError`` naming ``key`` when the path is missing or holds no checkpoint at all.
    """
    directory = Path(path).expanduser()
    if not directory.exists():
        raise UserError(f"{key}={path}: no such file or directory")
    if (directory / MANIFEST).exists() or step_of(directory) is not None:
        return [directory]
    found = checkpoint_dirs(directory / "checkpoints" if (directory / "checkpoints").is_dir() else directory)
    if not found:
        raise UserError(f"{key}={path}: holds no checkpoint (expected step-XXXXXXXX/ with {MANIFEST})")
    return found


def verify_in_driver(directory: Path) -> Manifest:
    """``verify`` as the driver does it: every file hashed up to DRIVER_HASH_LIMIT_BYTES in all, sizes only
    above (the workers share the hashing out)."""
    size = read_manifest(directory).total_bytes
    return verify(directory, hash_share=(0, 1) if size <= DRIVER_HASH_LIMIT_BYTES else None)


def resolve_checkpoint(path: str | Path, *, key: str) -> Path:
    """An explicit checkpoint path resolved to a verified checkpoint directory, in one process.

    A checkpoint named directly must verify; of a run dir's checkpoints the newest that verifies is
    taken, with a warning for each newer one that does not. Large checkpoints get sizes checked only
    here (hashing is left to the workers). ``UserError`` naming ``key`` otherwise: a user who asked to
    resume from something must never silently start fresh.
    """
    found = candidates(path, key=key)
    problems = []
    for directory in found:
        try:
            verify_in_driver(directory)
        except CheckpointError as exc:
            problems.append(str(exc))
            continue
        for problem in problems:
            log.warning("skipping a damaged checkpoint: %s", problem)
        return directory
    if len(found) == 1:
        raise UserError(f"{key}={path}: damaged checkpoint: {problems[0]}")
    raise UserError(f"{key}={path}: no valid checkpoint there ({'; '.join(problems)})")
