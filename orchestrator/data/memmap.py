"""data=memmap: token files a user made, nanoGPT style (``train.bin``, ``val.bin``, ``meta.json``)."""

from __future__ import annotations

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

# Checking every id against vocab_size would read the whole file (tens of GB for real corpora);
# the head and tail catch a wrong dtype or a meta.json from another tokenizer.
_CHECKED_TOKENS = 1 << 20


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
        tokens = np.memmap(path, dtype=TOKEN_DTYPE, mode="r")
        largest = max(int(tokens[:_CHECKED_TOKENS].max()), int(tokens[-_CHECKED_TOKENS:].max()))
        if largest >= vocab_size:
            raise UserError(
                f"data.path: {path} holds token id {largest}, not below vocab_size={vocab_size} from meta.json"
            )
    return DataSpec(kind=SampleKind.tokens, vocab_size=vocab_size, seq_len=cfg.seq_len)


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
