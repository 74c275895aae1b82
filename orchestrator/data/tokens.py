"""The token-file format and the dataset over it.

nanoGPT's layout: ``train.bin`` and ``val.bin`` hold token ids back to back, ``meta.json`` beside them
holds at least ``vocab_size``. Ids are uint16 while the vocabulary fits (at most 65,536 ids), uint32
above (Llama 3's 128,256); ``meta.json``'s ``dtype`` says which, and files without it are uint16.
data=text writes these files into its cache, data=memmap reads files a user made (with
``write_token_files`` or nanoGPT's prepare scripts).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from orchestrator.errors import UserError
from orchestrator.fsutil import write_atomic

TOKEN_DTYPES = ("uint16", "uint32")
# What a meta.json without a dtype means: nanoGPT's files, and every file written before the field.
DEFAULT_DTYPE = "uint16"
MAX_VOCAB_SIZE = int(np.iinfo(np.uint32).max) + 1


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest dtype that holds every id below ``vocab_size``: uint16 up to 65,536 ids, else uint32."""
    return np.dtype(np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32)


def recorded_dtype(meta: dict) -> np.dtype:
    """The token dtype a ``meta.json`` records, uint16 when it records none.

    Raises:
        ValueError: It names anything but uint16 or uint32.
    """
    name = meta.get("dtype", DEFAULT_DTYPE)
    if name not in TOKEN_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(TOKEN_DTYPES)}, got {name!r}")
    return np.dtype(name)


def write_token_files(
    directory: str | Path, *, train: np.ndarray, val: np.ndarray, vocab_size: int, **meta: Any
) -> None:
    """Write ``train.bin``, ``val.bin`` and ``meta.json`` into ``directory``, each atomically.

    The ids are stored as ``token_dtype(vocab_size)`` (uint16, or uint32 past 65,536 ids), named in
    ``meta.json``'s ``dtype``.

    Args:
        directory: Created if missing.
        train: 1-D integer token ids of the train split.
        val: 1-D integer token ids of the val split.
        vocab_size: Every id must be below it; at most 2**32 so ids fit uint32.
        **meta: Extra JSON-serializable entries for ``meta.json`` (tokenizer kind, corpus description, ...).

    Raises:
        ValueError: ``vocab_size`` does not fit uint32, or an array is not 1-D or holds an id out of range.
    """
    if not 0 < vocab_size <= MAX_VOCAB_SIZE:
        raise ValueError(f"vocab_size must be in [1, {MAX_VOCAB_SIZE}] to store ids as uint32, got {vocab_size}")
    dtype = token_dtype(vocab_size)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    counts = {}
    for split, tokens in (("train", train), ("val", val)):
        tokens = np.asarray(tokens)
        if tokens.ndim != 1:
            raise ValueError(f"{split} tokens must be a 1-D array, got shape {tokens.shape}")
        if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab_size):
            raise ValueError(f"{split} tokens must be in [0, {vocab_size}), got [{tokens.min()}, {tokens.max()}]")
        write_atomic(directory / f"{split}.bin", memoryview(np.ascontiguousarray(tokens, dtype=dtype)))
        counts[f"{split}_tokens"] = int(tokens.size)
    content = {"vocab_size": vocab_size, "dtype": dtype.name, **counts, **meta}
    write_atomic(directory / "meta.json", json.dumps(content, indent=2).encode())


def count_tokens(path: Path, *, dtype: np.dtype) -> int:
    """Number of tokens in a token file of ``dtype`` ids (its size in bytes over the id's)."""
    return path.stat().st_size // dtype.itemsize


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
    """Fixed-length windows over a token file, read through a memmap.

    Sample ``i`` is ``tokens[i*T : i*T + T + 1]`` for ``T = seq_len``: the inputs are its first ``T``
    tokens, the targets its last ``T`` (the inputs shifted by one). Windows do not overlap except
    for that one shared token, so an epoch sees every token once, and ``len = (N - 1) // T``.

    Args:
        path: The ``.bin`` file. Opened read-only; the OS page cache shares it between workers.
        seq_len: ``T``.
        dtype: The ids' dtype, from ``meta.json`` (``recorded_dtype``).
    """

    def __init__(self, path: str | Path, *, seq_len: int, dtype: np.dtype) -> None:
        self.tokens: np.memmap = np.memmap(path, dtype=dtype, mode="r")
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
