"""data=memmap: token files a user made, nanoGPT style (``train.bin``, ``val.bin``, ``meta.json``), uint16 or
uint32 ids as ``meta.json``'s ``dtype`` says."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from orchestrator.config.paths import check_data_paths, expand_path
from orchestrator.config.schema import MemmapDataConfig, SampleKind
from orchestrator.data.base import DataBundle
from orchestrator.data.spec import DataSpec
from orchestrator.data.tokens import (
    DEFAULT_DTYPE,
    MAX_VOCAB_SIZE,
    TOKEN_DTYPES,
    TokenDataset,
    count_tokens,
    recorded_dtype,
    require_windows,
    token_dtype,
)
from orchestrator.errors import UserError
from orchestrator.fsutil import read_json_object

# Every id is checked against vocab_size in the driver, a chunk of this many tokens (128 MiB of uint16,
# 256 MiB of uint32) at a time: an id out of range would otherwise fail a worker's embedding lookup
# mid-run (a device-side assert on GPUs). numpy's max runs at memory speed, so the check costs about
# what reading the file does.
_CHUNK_TOKENS = 1 << 26


def read_meta(directory: Path) -> tuple[int, np.dtype]:
    """``vocab_size`` and the ids' dtype from ``directory/meta.json``, checked.

    The dtype is ``meta.json``'s ``dtype`` (uint16 or uint32), uint16 when it has none, as nanoGPT's
    files do; a vocabulary past 65,536 ids must name its dtype, since uint16 cannot hold its ids.

    Args:
        directory: The expanded ``data.path``.
    """
    meta_path = directory / "meta.json"
    meta = read_json_object(meta_path, key="data.path")
    vocab_size = meta.get("vocab_size")
    if not isinstance(vocab_size, int) or not 0 < vocab_size <= MAX_VOCAB_SIZE:
        raise UserError(
            f"data.path: {meta_path} must hold an integer vocab_size in [1, {MAX_VOCAB_SIZE}], got {vocab_size!r}"
        )
    try:
        dtype = recorded_dtype(meta)
    except ValueError:
        raise UserError(
            f"data.path: {meta_path} has dtype {meta['dtype']!r}; allowed: {', '.join(TOKEN_DTYPES)} "
            f"(none means {DEFAULT_DTYPE})"
        ) from None
    if "dtype" not in meta and token_dtype(vocab_size) != dtype:
        raise UserError(
            f"data.path: {meta_path} has vocab_size={vocab_size} and no dtype, which means "
            f'{DEFAULT_DTYPE}, too narrow for ids past 65535: add "dtype": "uint32" if '
            f"train.bin and val.bin hold uint32 ids"
        )
    return vocab_size, dtype


def prepare(cfg: MemmapDataConfig) -> DataSpec:
    """Validate the token files in ``data.path`` and return their spec.

    Args:
        cfg: The memmap data config.
    """
    check_data_paths(cfg)
    directory = expand_path(cfg.path)
    vocab_size, dtype = read_meta(directory)
    for name in ("train.bin", "val.bin"):
        path = directory / name
        stat = path.stat()
        if stat.st_size % dtype.itemsize:
            raise UserError(
                f"data.path: {path} has {stat.st_size} bytes, not a whole number of {dtype.name} "
                f"tokens (the dtype in meta.json)"
            )
        require_windows(count_tokens(path, dtype=dtype), seq_len=cfg.seq_len, where=str(path))
        bad = _first_id_out_of_range(
            str(path), dtype=dtype.name, vocab_size=vocab_size, size_bytes=stat.st_size, mtime_ns=stat.st_mtime_ns
        )
        if bad is not None:
            token_id, position = bad
            raise UserError(
                f"data.path: {path} holds token id {token_id} at position {position} (counting tokens "
                f"from 0), not below vocab_size={vocab_size} from meta.json"
            )
    return DataSpec(kind=SampleKind.tokens, vocab_size=vocab_size, seq_len=cfg.seq_len)


@functools.lru_cache(maxsize=16)
def _first_id_out_of_range(
    path: str, *, dtype: str, vocab_size: int, size_bytes: int, mtime_ns: int
) -> tuple[int, int] | None:
    """The first id ``>= vocab_size`` in a token file of ``dtype`` ids and its position, or None;
    remembered for an unchanged file (size and mtime), as a sweep's points each prepare the same data."""
    del size_bytes, mtime_ns  # only part of the cache key
    tokens: np.memmap = np.memmap(path, dtype=dtype, mode="r")
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
    vocab_size, dtype = read_meta(directory)
    return DataBundle(
        spec=DataSpec(kind=SampleKind.tokens, vocab_size=vocab_size, seq_len=cfg.seq_len),
        train=TokenDataset(directory / "train.bin", seq_len=cfg.seq_len, dtype=dtype),
        val=TokenDataset(directory / "val.bin", seq_len=cfg.seq_len, dtype=dtype),
    )
