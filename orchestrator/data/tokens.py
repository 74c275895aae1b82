"""The token-file format and the dataset over it.

nanoGPT's layout: ``train.bin`` and ``val.bin`` hold uint16 token ids back to back, ``meta.json``
beside them holds at least ``vocab_size``. data=text writes these files into its cache, data=memmap
reads files a user made (with ``write_token_files`` or nanoGPT's prepare scripts).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from orchestrator.errors import UserError
from orchestrator.fsutil import write_atomic

TOKEN_DTYPE = np.uint16
MAX_VOCAB_SIZE = int(np.iinfo(TOKEN_DTYPE).max) + 1


def write_token_files(directory: str | Path, *, train: np.ndarray, val: np.ndarray, vocab_size: int,
                      **meta: Any) -> None:
    """Write ``train.bin``, ``val.bin`` (uint16) and ``meta.json`` into ``directory``, each atomically.

    Args:
        directory: Created if missing.
        train: 1-D integer token ids of the train split.
        val: 1-D integer token ids of the val split.
        vocab_size: Every id must be below it; at most 65,536 so ids fit uint16.
        **meta: Extra JSON-serializable entries for ``meta.json`` (tokenizer kind, corpus description, ...).

    Raises:
        ValueError: ``vocab_size`` does not fit uint16, or an array is not 1-D or holds an id out of range.
    """
    if not 0 < vocab_size <= MAX_VOCAB_SIZE:
        raise ValueError(f"vocab_size must be in [1, {MAX_VOCAB_SIZE}] to store ids as uint16, got {vocab_size}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    counts = {}
    for split, tokens in (("train", train), ("val", val)):
        tokens = np.asarray(tokens)
        if tokens.ndim != 1:
            raise ValueError(f"{split} tokens must be a 1-D array, got shape {tokens.shape}")
        if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab_size):
            raise ValueError(f"{split} tokens must be in [0, {vocab_size}), got [{tokens.min()}, {tokens.max()}]")
        write_atomic(directory / f"{split}.bin", memoryview(np.ascontiguousarray(tokens, dtype=TOKEN_DTYPE)))
        counts[f"{split}_tokens"] = int(tokens.size)
    content = {"vocab_size": vocab_size, "dtype": "uint16", **counts, **meta}
    write_atomic(directory / "meta.json", json.dumps(content, indent=2).encode())


def count_tokens(path: Path) -> int:
    """Number of uint16 tokens in a token file (its size in bytes over two)."""
    return path.stat().st_size // np.dtype(TOKEN_DTYPE).itemsize


def require_windows(num_tokens: int, *, seq_len: int, where: str) -> None:
    """Raise UserError unless ``num_tokens`` give at least one sample of ``seq_len + 1`` tokens.

    Args:
        num_tokens: Tokens in the split.
        seq_len: ``data.seq_len``.
        where: The split and where it came from, for the message (``"val.bin in /data/x"``).
    """
    if num_tokens < seq_len + 1:
        raise UserError(
            f"data.seq_len={seq_len} needs at least {seq_len + 1} tokens per split, but {where} holds {num_tokens}"
        )


class TokenDataset:
    """Fixed-length windows over a uint16 token file, read through a memmap.

    Sample ``i`` is ``tokens[i*T : i*T + T + 1]`` for ``T = seq_len``: the inputs are its first ``T``
    tokens, the targets its last ``T`` (the inputs shifted by one). Windows do not overlap except
    for that one shared token, so an epoch sees every token once, and ``len = (N - 1) // T``.

    Args:
        path: The ``.bin`` file. Opened read-only; the OS page cache shares it between workers.
        seq_len: ``T``.
    """

    def __init__(self, path: str | Path, *, seq_len: int) -> None:
        self.tokens = np.memmap(path, dtype=TOKEN_DTYPE, mode="r")
        self.seq_len = seq_len
        self._offsets = np.arange(seq_len + 1)

    def __len__(self) -> int:
        return (len(self.tokens) - 1) // self.seq_len

    def get_batch(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets, both ``(len(indices), seq_len)`` int64, for the given sample ids."""
        starts = np.asarray(indices, dtype=np.int64) * self.seq_len
        windows = torch.from_numpy(np.asarray(self.tokens[starts[:, None] + self._offsets], dtype=np.int64))
        # Contiguous copies: losses call targets.view(-1), which a strided slice refuses.
        return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()
