"""Checkpoint directories on disk: naming, the manifest, verification, and choosing one to resume from.

A checkpoint is ``checkpoints/step-XXXXXXXX/`` holding whatever the strategy wrote plus ``manifest.json``
(every file's size and sha256, the step, the world size, the strategy). It is written under a
``.tmp`` name and renamed only after every rank has written and fsynced its files and rank 0 has
written the manifest, so a directory with a valid manifest is complete by construction, and anything
else (a ``.tmp`` leftover, a missing or mismatching file) is never loaded.

This module uses the standard library only: the CLI verifies a resume path before importing torch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from orchestrator.errors import UserError
from orchestrator.fsutil import write_atomic

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
LATEST = "latest"
FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"^step-(\d{8})$")


class CheckpointError(Exception):
    """A checkpoint directory that must not be loaded, with the reason."""


@dataclass(frozen=True, kw_only=True)
class Manifest:
    step: int
    world_size: int
    strategy: str
    files: dict[str, dict]


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def step_of(directory: Path) -> int | None:
    match = _STEP_DIR.match(directory.name)
    return int(match.group(1)) if match else None


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def data_files(directory: Path) -> list[Path]:
    """Every regular file under ``directory`` except the manifest, sorted."""
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(directory: Path, *, step: int, world_size: int, strategy: str) -> None:
    files = {
        str(path.relative_to(directory)): {"size": path.stat().st_size, "sha256": sha256_of(path)}
        for path in data_files(directory)
    }
    manifest = {
        "format_version": FORMAT_VERSION,
        "step": step,
        "world_size": world_size,
        "strategy": strategy,
        "files": files,
    }
    write_atomic(directory / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True) + "\n")


def verify(directory: Path) -> Manifest:
    """The manifest of a complete, intact checkpoint; ``CheckpointError`` saying what is wrong otherwise."""
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"{directory}: no {MANIFEST} (incomplete checkpoint)")
    try:
        raw = json.loads(manifest_path.read_text())
        manifest = Manifest(step=int(raw["step"]), world_size=int(raw["world_size"]),
                            strategy=str(raw["strategy"]), files=dict(raw["files"]))
        version = raw["format_version"]
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{manifest_path}: unreadable manifest ({exc})") from None
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{manifest_path}: format version {version}, this orchestrator reads {FORMAT_VERSION}")
    for name, entry in manifest.files.items():
        path = directory / name
        if not path.is_file():
            raise CheckpointError(f"{directory}: {name} is missing")
        if path.stat().st_size != entry["size"]:
            raise CheckpointError(f"{directory}: {name} has {path.stat().st_size} bytes, manifest says {entry['size']}")
        if sha256_of(path) != entry["sha256"]:
            raise CheckpointError(f"{directory}: {name} does not match its sha256 (corrupt)")
    return manifest


def checkpoint_dirs(root: Path) -> list[Path]:
    """Finished checkpoint directories under ``root``, newest step first (no verification)."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and step_of(p) is not None]
    return sorted(found, key=lambda p: step_of(p), reverse=True)


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


def resolve_checkpoint(path: str | Path, *, key: str) -> Path:
    """An explicit checkpoint path (a ``step-N`` dir, a ``checkpoints/`` dir, or a run dir) to a verified dir.

    Raises ``UserError`` naming ``key`` when the path is missing, holds no checkpoint, or the one it names
    is damaged: a user who asked to resume from something must never silently start fresh.
    """
    directory = Path(path).expanduser()
    if not directory.exists():
        raise UserError(f"{key}={path}: no such file or directory")
    if (directory / MANIFEST).exists() or step_of(directory) is not None:
        try:
            verify(directory)
        except CheckpointError as exc:
            raise UserError(f"{key}={path}: damaged checkpoint: {exc}") from None
        return directory
    root = directory / "checkpoints" if (directory / "checkpoints").is_dir() else directory
    found, skipped = latest_valid(root)
    if found is None:
        reason = f" ({'; '.join(skipped)})" if skipped else ""
        raise UserError(f"{key}={path}: no valid checkpoint there{reason}")
    for reason in skipped:
        log.warning("skipping a damaged checkpoint: %s", reason)
    return found
