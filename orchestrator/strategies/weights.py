"""A checkpoint's model weights as a ``WeightSource``: read a tensor at a time, whichever strategy wrote it.

``read_model_weights`` returns the whole state dict at once; an exporter of a model larger than the host's
free memory needs names, shapes and dtypes first and each tensor only when it writes it:
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

import contextlib
import io
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from orchestrator.models.recipe import WeightSource
from orchestrator.strategies.formats import checkpoint_format

if TYPE_CHECKING:
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata


@dataclass(frozen=True, kw_only=True)
class _Stored:
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
        format_ = checkpoint_format(written_by)
        if format_ is None:
            raise ValueError(f"{directory}: no reader for checkpoints written by strategy={written_by}")
        self.key = key
        if format_ == "replicated":
            self._tensors = _replicated(directory)
        elif format_ == "dcp":
            self._tensors = _dcp(directory)
        else:
            self._tensors = _zero(directory)

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


def _replicated(directory: Path) -> dict[str, _Stored]:
    from orchestrator.strategies.ddp import MODEL_FILE  # lazy: imports torch

    state = torch.load(directory / MODEL_FILE, map_location="cpu", mmap=True, weights_only=True)
    return {
        name: _Stored(shape=tuple(tensor.shape), dtype=tensor.dtype, read=partial(_itself, tensor))
        for name, tensor in state.items()
    }


def _dcp(directory: Path) -> dict[str, _Stored]:
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from orchestrator.strategies.fsdp import (  # lazy: imports torch.distributed's FSDP and DCP
        DCP_DIR,
        read_dcp_metadata,
    )

    prefix = "model."
    metadata = read_dcp_metadata(directory / DCP_DIR)
    return {
        key[len(prefix) :]: _Stored(
            shape=tuple(entry.size),
            dtype=entry.properties.dtype,
            read=partial(_read_dcp_tensor, directory / DCP_DIR, key, entry),
        )
        for key, entry in metadata.state_dict_metadata.items()
        if key.startswith(prefix) and isinstance(entry, TensorStorageMetadata)
    }


def _read_dcp_tensor(dcp_dir: Path, key: str, entry: TensorStorageMetadata) -> torch.Tensor:
    import torch.distributed.checkpoint as dcp

    from orchestrator.strategies.fsdp import SafePlanner, SafeReader  # lazy: imports torch.distributed's FSDP and DCP

    tensor = torch.empty(entry.size, dtype=entry.properties.dtype)
    with warnings.catch_warnings():  # "no process group: loading in one process", which is the intent
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load({key: tensor}, storage_reader=SafeReader(dcp_dir), planner=SafePlanner(), no_dist=True)
    return tensor


def _zero(directory: Path) -> dict[str, _Stored]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from orchestrator.strategies.deepspeed import TAG, check_zero  # lazy: imports deepspeed

    check_zero(directory)
    # zero_to_fp32 prints its progress and draws progress bars: not the command's output.
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        state = get_fp32_state_dict_from_zero_checkpoint(str(directory), tag=TAG, lazy_mode=True)
    # A gathered tensor's contiguous() assembles it from the ranks' partitions; a buffer is a tensor already.
    return {
        name: _Stored(shape=tuple(tensor.shape), dtype=tensor.dtype, read=tensor.contiguous)
        for name, tensor in state.items()
    }


def _itself(tensor: torch.Tensor) -> torch.Tensor:
    return tensor
