"""Fast checks that the configured data paths exist and can be read.

The CLI calls ``check_data_paths`` before anything else, so a typo in a path fails in milliseconds
instead of after Ray and the workers have started. This module must stay light: no torch, numpy,
tokenizers or scikit-learn imports, and no reading of whole files.
"""

from __future__ import annotations

import os
from pathlib import Path

from orchestrator.config.schema import (
    DataConfig,
    MemmapDataConfig,
    NpzDataConfig,
    TextDataConfig,
)
from orchestrator.errors import UserError

TOKEN_FILES = ("train.bin", "val.bin", "meta.json")


def expand_path(path: str) -> Path:
    """The configured ``path`` with ``~`` expanded (relative paths stay relative to the working dir)."""
    return Path(os.path.expanduser(path))


def check_readable(path: Path, *, key: str, what: str = "path") -> None:
    """Raise UserError naming ``key`` unless ``path`` exists and can be read.

    Args:
        path: The expanded path.
        key: The config key it came from, e.g. ``data.path``.
        what: ``path``, ``file`` or ``dir``: what the key must name.
    """
    if not path.exists():
        raise UserError(f"{key}: {path} does not exist")
    if what == "file" and not path.is_file():
        raise UserError(f"{key}: {path} is not a file")
    if what == "dir" and not path.is_dir():
        raise UserError(f"{key}: {path} is not a directory")
    # Opening a FIFO blocks until a writer appears, and a socket or device is not data.
    if not (path.is_file() or path.is_dir()):
        raise UserError(f"{key}: {path} is not a regular file or a directory (a FIFO, socket or device is not data)")
    # A directory needs execute permission too, or walking it fails later with a confusing error.
    mode = os.R_OK | (os.X_OK if path.is_dir() else 0)
    if not os.access(path, mode):
        raise UserError(f"{key}: {path} is not readable by this user")


def check_data_paths(cfg: DataConfig) -> None:
    """Raise UserError if a path the data config names does not exist or cannot be read.

    Only checks existence and permissions: whether a corpus folder holds matching files, or a file
    holds what it should, is checked by ``prepare_data``.

    Args:
        cfg: The data config. Configs without paths (digits, synthetic) pass.
    """
    if isinstance(cfg, TextDataConfig):
        for entry in cfg.paths:
            check_readable(expand_path(entry), key=f"data.paths entry {entry!r}")
    elif isinstance(cfg, MemmapDataConfig):
        directory = expand_path(cfg.path)
        check_readable(directory, key="data.path", what="dir")
        for name in TOKEN_FILES:
            check_readable(directory / name, key="data.path", what="file")
    elif isinstance(cfg, NpzDataConfig):
        check_readable(expand_path(cfg.path), key="data.path", what="file")
