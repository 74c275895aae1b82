"""Durable file writes: what checkpoints and data caches rely on to never show a half-written file."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from orchestrator.errors import UserError, first_line


def fsync_path(path: Path) -> None:
    """fsync a file, or a directory (which makes new names and renames in it survive a crash)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: str | bytes | memoryview) -> None:
    """Writes ``data`` to ``path`` so that readers see the old file or the whole new one, never a prefix.

    The temporary name carries the pid, so concurrent writers of the same path do not collide.
    """
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w" if isinstance(data, str) else "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_path(path.parent)


def read_json_object(path: Path, *, key: str) -> dict[str, Any]:
    """The JSON object in ``path``; UserError naming ``key`` and the file when it is unreadable or not an object."""
    try:
        content = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{key}: {path} is not readable JSON ({first_line(exc)})") from None
    if not isinstance(content, dict):
        raise UserError(f"{key}: {path} is not a JSON object")
    return content
