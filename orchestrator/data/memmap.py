"""data=memmap: token files a user made, nanoGPT style (``train.bin``, ``val.bin``, ``meta.json``)."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np

from orchestrator.config.schema import MemmapDataConfig, SampleKind
from orchestrator.data.base import DataBundle
from orchestrator.data.paths import check_data_paths, expand_path
from orchestrator.data.spec import DataSpec
from orchestrator.data.tokens import (
    MAX_VOCAB_SIZE,
    TOKEN_DTYPE,
    TokenDataset,
    count_tokens,
    require_windows,
)
from orchestrator.errors import UserError

# Every id is checked against vocab_size in the driver, a chunk of this many tokens (128 MiB) at a
# time: an id out of range would otherwise fail a worker's embedding lookup mid-run (a device-side
# assert on GPUs). numpy's max runs at memory speed, so the check costs about what reading the file does.
_CHUNK_TOKENS = 1 << 26


def read_vocab_size(directory: Path) -> int:
    """``vocab_size`` from ``directory/meta.json``, checked to fit uint16 ids.

    Args:
        directory: The expanded ``data.path``.
    """
    meta_path = directory / "meta.json"
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"data.path: cannot read {meta_path} as JSON ({err})") from None
    vocab_size = meta.get("vocab_size") if isinstance(meta, dict) else None
    if not isinstance(vocab_size, int) or not 0 < vocab_size <= MAX_VOCAB_SIZE:
        raise UserError(
            f"data.path: {meta_path} must hold an integer vocab_size in [1, {MAX_VOCAB_SIZE}] (uint16 ids), "
            f"got {vocab_size!r}"
        )
    return vocab_size


def prepare(cfg: MemmapDataConfig) -> DataSpec:
    """Validate the token files in ``data.path`` and return their spec.

    Args:
        cfg: The memmap data config.
    """
    check_data_paths(cfg)
    directory = expand_path(cfg.path)
    vocab_size = read_vocab_size(directory)
    for name in ("train.bin", "val.bin"):
        path = directory / name
        size_bytes = path.stat().st_size
        if size_bytes % np.dtype(TOKEN_DTYPE).itemsize:
            raise UserError(f"data.path: {path} has {size_bytes} bytes, not a whole number of uint16 tokens")
        require_windows(count_tokens(path), seq_len=cfg.seq_len, where=str(path))
        stat = path.stat()
        bad = _first_id_out_of_range(str(path), vocab_size=vocab_size, size_bytes=stat.st_size,
                                     mtime_ns=stat.st_mtime_ns)
        if bad is not None:
            token_id, position = bad
            raise UserError(f"data.path: {path} holds token id {token_id} at position {position} (counting tokens "
                            f"from 0), not below vocab_size={vocab_size} from meta.json")
    return DataSpec(kind=SampleKind.tokens, vocab_size=vocab_size, seq_len=cfg.seq_len)


@functools.lru_cache(maxsize=16)
def _first_id_out_of_range(path: str, *, vocab_size: int, size_bytes: int, mtime_ns: int) -> tuple[int, int] | None:
    """The first id ``>= vocab_size`` in a token file and its position, or None; remembered for an
    unchanged file (size and mtime), as a sweep's points each prepare the same data."""
    del size_bytes, mtime_ns  # only part of the cache key
    tokens = np.memmap(path, dtype=TOKEN_DTYPE, mode="r")
    for start in range(0, len(tokens), _CHUNK_TOKENS):
        chunk = tokens[start : start + _CHUNK_TOKENS]
        if chunk.max() >= vocab_size:
            offset = int(np.argmax(chunk >= vocab_size))
            return int(chunk[offset]), start + offset
    return None


def load(cfg: MemmapDataConfig) -> DataBundle:
    """Open the token files as memmaps (cheap: nothing is read until a batch asks for it).

    Args:
        cfg: The memmap data config, already checked by ``prepare``.
    """
    directory = expand_path(cfg.path)
    spec = DataSpec(kind=SampleKind.tokens, vocab_size=read_vocab_size(directory), seq_len=cfg.seq_len)
    return DataBundle(
        spec=spec,
        train=TokenDataset(directory / "train.bin", seq_len=cfg.seq_len),
        val=TokenDataset(directory / "val.bin", seq_len=cfg.seq_len),
    )
