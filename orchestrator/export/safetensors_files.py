"""Safetensors files written one tensor at a time, split into shards the way transformers splits them.

A safetensors file is an 8-byte little-endian header length, a JSON header (every tensor's dtype, shape and
byte range; ``__metadata__``) and the tensors' bytes back to back. The header needs only shapes and dtypes, so
it is written first and each tensor is then read, written and dropped: memory stays near the largest tensor,
however large the shard. ``safetensors.torch.save_file`` would need the whole shard in memory.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from orchestrator.models.pretrained import SINGLE_FILE

# safetensors' names for torch dtypes.
_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
_HEADER_ALIGN = 8  # the safetensors writer pads its header so that the data starts 8-byte aligned


@dataclass(frozen=True, kw_only=True)
class OutTensor:
    """A tensor to write: its name, shape and dtype now, its values when ``read()`` is called."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    read: Callable[[], torch.Tensor]

    @property
    def num_bytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def plan_shards(tensors: list[OutTensor], *, max_shard_bytes: int) -> dict[str, list[OutTensor]]:
    """File name -> its tensors, in order: a new shard whenever the next tensor would pass ``max_shard_bytes``
    (a tensor larger than that gets a shard of its own), as transformers' ``save_pretrained`` shards."""
    shards: list[list[OutTensor]] = [[]]
    size = 0
    for tensor in tensors:
        if shards[-1] and size + tensor.num_bytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(tensor)
        size += tensor.num_bytes
    if len(shards) == 1:
        return {SINGLE_FILE: shards[0]}
    return {f"model-{i:05d}-of-{len(shards):05d}.safetensors": shard for i, shard in enumerate(shards, start=1)}


def write_safetensors(path: Path, tensors: list[OutTensor]) -> None:
    """Writes ``tensors`` to a new safetensors file at ``path``, reading each only as it is written, then fsyncs."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}  # transformers refuses a file without it
    offset = 0
    for tensor in tensors:
        if tensor.dtype not in _DTYPES:
            raise ValueError(f"{tensor.name}: safetensors has no dtype {tensor.dtype}")
        header[tensor.name] = {
            "dtype": _DTYPES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + tensor.num_bytes],
        }
        offset += tensor.num_bytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % _HEADER_ALIGN)
    with open(path, "xb") as stream:
        stream.write(struct.pack("<Q", len(encoded)))
        stream.write(encoded)
        for tensor in tensors:
            values = tensor.read()
            if tuple(values.shape) != tensor.shape or values.dtype != tensor.dtype:
                raise ValueError(
                    f"{tensor.name}: read {values.dtype} {list(values.shape)}, "
                    f"planned {tensor.dtype} {list(tensor.shape)}"
                )
            # The raw bytes, in place (little-endian, as on every machine torch supports).
            stream.write(values.contiguous().reshape(-1).view(torch.uint8).numpy().data)
            del values
        stream.flush()
        os.fsync(stream.fileno())


def index_json(shards: dict[str, list[OutTensor]]) -> str:
    """``model.safetensors.index.json``: the total size and which file holds each tensor."""
    weight_map = {tensor.name: name for name, tensors in shards.items() for tensor in tensors}
    total_bytes = sum(tensor.num_bytes for tensors in shards.values() for tensor in tensors)
    return json.dumps({"metadata": {"total_size": total_bytes}, "weight_map": weight_map}, indent=2) + "\n"
