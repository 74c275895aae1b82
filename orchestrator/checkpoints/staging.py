"""A copy of training state in host memory: what an asynchronous checkpoint waits for, and all it waits for.

``HostStaging.stage(state)`` copies every tensor in ``state`` (nested dicts, lists and tuples; a
DTensor by its local shard) into host memory and deep-copies every other value, so nothing training
does afterwards can change what a background thread then writes. Tensors that share a storage share
it in the copy, as ``torch.save`` would have written the originals (a tied weight is written once).

The host buffers are kept and reused by the next ``stage`` of the same layout. A copy into memory
already touched runs at memory bandwidth; a copy into fresh memory also pays a page fault per page,
which on the CPUs measured in ``bench/RESULTS.md`` made it five times slower. The price is one host
copy of the rank's checkpointed state, held between saves. GPU tensors go to pinned memory.
"""

from __future__ import annotations

import copy
import sys
from typing import Any

import torch

# Values that nothing can change in place: kept as they are.
_IMMUTABLE = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device, torch.Size)


class HostStaging:
    """Copies state into host buffers that it keeps for the next copy (one copy in use at a time)."""

    def __init__(self) -> None:
        self._buffers: list[torch.UntypedStorage] = []

    def stage(self, state: Any) -> Any:
        """A copy of ``state`` that shares no memory with it (the previous copy's buffers are reused)."""
        copier = _Copier(self._buffers)
        staged = copier.copy(state)
        del self._buffers[copier.used :]  # a layout that shrank: let the rest go
        if copier.on_gpu:
            torch.cuda.synchronize()  # the device-to-host copies were issued non-blocking
        return staged


class _Copier:
    """One ``stage``: a copy per source storage, taken from the kept buffers in the order storages are met."""

    def __init__(self, buffers: list[torch.UntypedStorage]) -> None:
        self.buffers = buffers
        self.used = 0
        self.on_gpu = False
        self.storages: dict[int, torch.UntypedStorage] = {}  # source storage (its C handle) -> its copy
        self.memo: dict[int, Any] = {}  # deepcopy's memo: objects met twice are copied once

    def copy(self, value: Any) -> Any:
        if _is_dtensor(value):
            local = self.tensor(value.to_local())
            return type(value).from_local(
                local, value.device_mesh, value.placements, run_check=False, shape=value.shape, stride=value.stride()
            )
        if isinstance(value, torch.Tensor):
            return self.tensor(value)
        if isinstance(value, _IMMUTABLE):
            return value
        if id(value) in self.memo:
            # A container met twice is one container in the copy too (optimizer param groups share their
            # betas tuple): pickle writes it once, so the copy serializes to the original's bytes.
            return self.memo[id(value)]
        staged: dict[Any, Any] | list[Any] | tuple[Any, ...]
        if isinstance(value, dict):
            staged = copy.copy(value)  # the same type, with its attributes (a state dict's _metadata)
            staged.clear()
            self.memo[id(value)] = staged
            staged.update((key, self.copy(item)) for key, item in value.items())
        elif type(value) is list:
            staged = []
            self.memo[id(value)] = staged
            staged.extend(self.copy(item) for item in value)
        elif type(value) is tuple:
            items = [self.copy(item) for item in value]
            staged = value if all(a is b for a, b in zip(items, value)) else tuple(items)  # immutable already
            self.memo[id(value)] = staged
        else:
            return copy.deepcopy(value, self.memo)  # an object (DeepSpeed's loss scaler, its config): as it is now
        self.memo.setdefault(id(self.memo), []).append(value)  # keeps value alive while its id is a memo key
        return staged

    def tensor(self, tensor: torch.Tensor) -> torch.Tensor:
        assert type(tensor) in (torch.Tensor, torch.nn.Parameter), f"cannot stage a {type(tensor).__name__}"
        source = tensor.untyped_storage()
        key = source._cdata  # what torch.save tells storages apart by
        host = self.storages.get(key)
        if host is None:
            host = self._buffer(source.nbytes(), pinned=source.device.type == "cuda")
            host.copy_(source, non_blocking=source.device.type == "cuda")
            self.on_gpu |= source.device.type == "cuda"
            self.storages[key] = host
        staged = torch.empty(0, dtype=tensor.dtype).set_(host, tensor.storage_offset(), tensor.size(), tensor.stride())
        if isinstance(tensor, torch.nn.Parameter):
            staged = torch.nn.Parameter(staged, requires_grad=tensor.requires_grad)
        else:
            staged.requires_grad_(tensor.requires_grad)  # torch.save records it (ZeRO's fp32 partitions need it)
        # torch.save records a tensor's Python attributes too (DeepSpeed's ds_id on its flat partitions).
        staged.__dict__.update((name, self.copy(value)) for name, value in vars(tensor).items())
        return staged

    def _buffer(self, nbytes: int, *, pinned: bool) -> torch.UntypedStorage:
        index = self.used
        self.used += 1
        if index < len(self.buffers):
            kept = self.buffers[index]
            if kept.nbytes() == nbytes and kept.is_pinned() == pinned:
                return kept
        fresh = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned).untyped_storage()
        if index < len(self.buffers):
            self.buffers[index] = fresh
        else:
            self.buffers.append(fresh)
        return fresh


def _is_dtensor(value: Any) -> bool:
    # Without importing torch.distributed.tensor (over a second): a DTensor exists only once it is imported.
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(value, module.DTensor)
