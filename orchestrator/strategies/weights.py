"""A checkpoint's model weights as a ``WeightSource``: read a tensor at a time, whichever strategy wrote it.

``read_model_weights`` returns the whole state dict at once; an exporter of a model larger than the host's
free memory needs names, shapes and dtypes first and each tensor only when it writes it. Each strategy's
engine says how (its ``stored_weights``):
- replicated (none, ddp): ``model.pt`` memory-mapped (``torch.load(mmap=True, weights_only=True)``); a
  tensor's pages are read from disk when it is used and stay in the page cache, which the kernel can drop;
- dcp (fsdp2): the ``.metadata`` index lists every tensor; each is loaded alone, ``dcp.load`` on a one-key
  state dict, through the same allow-listed ``SafeReader``/``SafePlanner`` as every other DCP read;
- deepspeed-zero3: DeepSpeed's ``zero_to_fp32`` in its lazy mode: the ranks' fp32 partitions are
  memory-mapped and a tensor is gathered from them when it is read;
- deepspeed-zero0/1/2: the same, but DeepSpeed concatenates each parameter group's partitions into one
  fp32 vector when the source is opened: the whole fp32 model (4 bytes per parameter) is in memory at once.

The checkpoint must have been verified (``manifest``) and checked (``check_checkpoint``) first.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from orchestrator.models.recipe import WeightSource
from orchestrator.strategies import engine_for


@dataclass(frozen=True, kw_only=True)
class StoredTensor:
    """One tensor of a checkpoint: its shape and dtype, and how to read it."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    read: Callable[[], torch.Tensor]


class CheckpointWeights(WeightSource):
    """The model state dict of a checkpoint, each tensor read when it is asked for.

    Args:
        directory: a verified, checked checkpoint.
        written_by: the strategy its manifest names.
        key: the setting or argument that named it, for errors.
    """

    def __init__(self, directory: Path, *, written_by: str, key: str) -> None:
        self.key = key
        self._tensors: dict[str, StoredTensor] = engine_for(directory, written_by=written_by).stored_weights(directory)

    def shapes(self) -> dict[str, list[int]]:
        return {name: list(stored.shape) for name, stored in self._tensors.items()}

    def dtypes(self) -> dict[str, torch.dtype]:
        """Every tensor's dtype, by name, without reading any tensor."""
        return {name: stored.dtype for name, stored in self._tensors.items()}

    def read(self, name: str, *, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """The tensor ``name``; with ``rows``, its rows ``[start, stop)`` (a memory-mapped ``model.pt`` reads
        just those; DCP and ZeRO read the whole tensor first)."""
        tensor = self._tensors[name].read()
        return tensor if rows is None else tensor[rows[0] : rows[1]]


def itself(tensor: torch.Tensor) -> torch.Tensor:
    """A ``StoredTensor.read`` for a tensor already at hand (memory-mapped, or a buffer)."""
    return tensor
