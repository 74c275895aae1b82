"""FSDP2: ``fully_shard`` on each repeated block, then the root, over a 1-D device mesh.

Parameters, gradients and optimizer state are sharded over the ranks (ZeRO-3's layout): each rank
all-gathers a block's parameters just before using it and reduce-scatters its gradients right after.
Checkpoints go through ``torch.distributed.checkpoint``: every rank writes its own shards, and they
load at any world size. They are read as data: DCP unpickles its ``.metadata`` index with plain
``pickle`` and its non-tensor items with ``weights_only=False``, so both go through ``checkpoints.unpickle``'s
allow-lists first (``SafeReader``, ``SafePlanner``).
"""

from __future__ import annotations

import contextlib
import copy
import io
import os
import warnings
from functools import partial
from pathlib import Path
from typing import Any, ContextManager, Iterator

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.filesystem import FileSystem
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata, StorageMeta, TensorStorageMetadata
from torch.distributed.checkpoint.planner import ReadItem
from torch.distributed.checkpoint.staging import AsyncStager
from torch.distributed.checkpoint.state_dict import (
    get_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import (
    CPUOffloadPolicy,
    MixedPrecisionPolicy,
    OffloadPolicy,
    fully_shard,
)
from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler
from torch.distributed.tensor import DTensor

from orchestrator.checkpoints import unpickle
from orchestrator.checkpoints.hashing import FileDigest, HashingFile, save_hashed
from orchestrator.checkpoints.staging import HostStaging
from orchestrator.config.schema import Offload, Precision
from orchestrator.models.meta import meta_device
from orchestrator.models.recipe import ModelRecipe, WeightSource, check_weights_fit
from orchestrator.strategies.base import LOW_PRECISION, OptimizerFactory, PendingWrite, TorchStrategy
from orchestrator.strategies.blocks import prepare_blocks
from orchestrator.strategies.fsdp2 import META_INIT_MIN_PARAMS, FSDP2Config, InitDevice
from orchestrator.strategies.weights import StoredTensor

DCP_DIR = "dcp"
SCALER_FILE = "scaler.pt"


def _builds_on_meta(init_device: InitDevice, recipe: ModelRecipe) -> bool:
    if init_device is not InitDevice.auto:
        return init_device is InitDevice.meta
    if recipe.initial_state is not None:
        return True  # the weights come from a file: the same model either way
    with meta_device():
        num_params = sum(p.numel() for p in recipe.build().parameters())
    return num_params >= META_INIT_MIN_PARAMS


class FSDP2Strategy(TorchStrategy):
    cfg: FSDP2Config

    def _make_scaler(self, *, enabled: bool) -> torch.amp.GradScaler:
        # Each rank sees only its gradient shards: the scaler must agree on "inf found" across ranks.
        return ShardedGradScaler(self.dist.device.type, enabled=enabled)

    def setup(self, recipe: ModelRecipe, *, build_optimizer: OptimizerFactory) -> None:
        self.module = self.model = self.build_model(recipe)
        self.optimizer = build_optimizer(self.model)
        self._background_group: torch.distributed.ProcessGroup | None = None  # asynchronous saves' (snapshot)

    def build_model(self, recipe: ModelRecipe) -> nn.Module:
        """The model sharded over the ranks, initialized, before any optimizer exists."""
        on_meta = _builds_on_meta(self.cfg.init_device, recipe)
        offload = self.cfg.offload_params is Offload.cpu
        if on_meta:
            with meta_device():
                model = recipe.build()
                recipe.finish(model)  # adapters (nothing allocated yet) before sharding wraps the modules
        else:
            model = recipe.build_complete()  # every rank builds the same full model, then keeps its shards
        blocks = prepare_blocks(
            model,
            recipe.blocks(model),
            activation_checkpointing=self.cfg.activation_checkpointing,
            compile=self.cfg.compile,
        )
        shard = dict(
            mesh=init_device_mesh(self.dist.device.type, (self.dist.world_size,)),
            reshard_after_forward=self.cfg.reshard_after_forward,
            mp_policy=self._mixed_precision(),
            # Pinned host memory speeds host-device copies; there is nothing to pin for without a GPU.
            offload_policy=CPUOffloadPolicy(pin_memory=self.dist.device.type == "cuda") if offload else OffloadPolicy(),
        )
        for block in blocks:
            fully_shard(block, **shard)
        fully_shard(model, **shard)
        home = torch.device("cpu") if offload else self.dist.device
        if on_meta:
            model.to_empty(device=home)
            model.init_weights()
            if recipe.adapters is not None:
                recipe.adapters.reset(model)  # init_weights drew the adapters as any linear layer
            if recipe.initial_state is not None:
                source = recipe.initial_state()
                if recipe.adapters is not None:
                    source = recipe.adapters.under_adapters(source, names=list(model.state_dict()))
                load_shards(model, source, rank=self.dist.rank, world_size=self.dist.world_size)
        else:
            model.to(home)
        return model

    def _sum_over_shards(self, value: torch.Tensor) -> torch.Tensor:
        return self.dist.all_reduce_sum(value)

    def _mixed_precision(self) -> MixedPrecisionPolicy:
        if self.precision is Precision.fp32:
            return MixedPrecisionPolicy()
        # Compute in the low-precision dtype, keep fp32 sharded master weights, reduce gradients in fp32.
        return MixedPrecisionPolicy(param_dtype=LOW_PRECISION[self.precision], reduce_dtype=torch.float32)

    def autocast(self) -> ContextManager:
        return contextlib.nullcontext()  # the mixed-precision policy casts parameters and inputs itself

    def save(self, directory: Path) -> dict[Path, FileDigest]:
        writer = _HashingWriter(directory / DCP_DIR)
        dcp.save(self._dcp_state(), storage_writer=writer)
        return self._written(directory, writer, self._scaler_state())

    def snapshot(self, directory: Path) -> PendingWrite:
        """DCP's own asynchronous save: the state staged into host memory now, written by DCP's thread.

        DCP's thread plans and commits the save with collectives of its own (gathering the ranks' plans
        and the index), so it runs them over a gloo group of its own rather than the training group,
        which the main thread keeps using meanwhile.
        """
        if self._background_group is None and torch.distributed.is_initialized():
            self._background_group = torch.distributed.new_group(backend="gloo")  # collective: every rank, once
        writer = _HashingWriter(directory / DCP_DIR)
        future = dcp.async_save(
            self._dcp_state(),
            storage_writer=writer,
            process_group=self._background_group,
            async_stager=_Stager(self.staging),
        )
        scaler_state = copy.deepcopy(self._scaler_state())  # plain numbers

        def write() -> dict[Path, FileDigest]:
            future.result()
            return self._written(directory, writer, scaler_state)

        return write

    def _dcp_state(self) -> dict[str, Any]:
        model_state, optimizer_state = get_state_dict(self.model, self.optimizer)
        # Each rank's writer creates its own data files (__<rank>_<n>.distcp); rank 0's also the .metadata index.
        return {"model": model_state, "optim": optimizer_state}

    def _scaler_state(self) -> dict[str, Any] | None:
        return self.scaler.state_dict() if self.dist.is_main and self.scaler.is_enabled() else None

    def _written(
        self, directory: Path, writer: _HashingWriter, scaler_state: dict[str, Any] | None
    ) -> dict[Path, FileDigest]:
        written = dict(writer.fs.digests)
        if scaler_state is not None:
            written[directory / SCALER_FILE] = save_hashed(scaler_state, directory / SCALER_FILE)
        return written

    def load(self, directory: Path) -> None:
        model_state, optimizer_state = get_state_dict(self.model, self.optimizer)
        state = {"model": model_state, "optim": optimizer_state}
        # Reshards when the world size differs.
        dcp.load(state, storage_reader=SafeReader(directory / DCP_DIR), planner=SafePlanner())
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        if self.scaler.is_enabled() and (directory / SCALER_FILE).exists():
            self.scaler.load_state_dict(torch.load(directory / SCALER_FILE, weights_only=True))


class _HashingFileSystem(FileSystem):
    """DCP's local file system, hashing every file it writes (``digests``, by final path)."""

    def __init__(self) -> None:
        super().__init__()
        self.digests: dict[Path, FileDigest] = {}

    @contextlib.contextmanager
    def create_stream(self, path: str | os.PathLike, mode: str) -> Iterator[Any]:
        if mode == "rb":
            with super().create_stream(path, mode) as stream:
                yield stream
            return
        assert mode == "wb", f"DCP opened {path} with mode {mode!r}"
        with HashingFile(Path(path)) as stream:
            yield stream
        self.digests[Path(path)] = stream.digest()

    def rename(self, path: str | os.PathLike, new_path: str | os.PathLike) -> None:
        super().rename(path, new_path)  # the .metadata index is written under a temporary name
        self.digests[Path(new_path)] = self.digests.pop(Path(path))


class _Stager(AsyncStager):
    """DCP's staging step done by ``HostStaging``: a host copy into buffers kept from save to save. It is
    finished when ``stage`` returns (DCP's own stager on CPU would allocate fresh memory every save)."""

    _synchronize_after_execute = False

    def __init__(self, staging: HostStaging) -> None:
        self.staging = staging

    def stage(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        return self.staging.stage(state_dict)


class _HashingWriter(FileSystemWriter):
    """DCP's file system writer, hashing what it writes. It leaves fsync to the checkpoint protocol, which
    fsyncs every file once it is closed (a ``HashingFile`` has no descriptor for DCP to fsync)."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, sync_files=False)
        self.fs = _HashingFileSystem()


@torch.no_grad()
def load_shards(model: nn.Module, source: WeightSource, *, rank: int, world_size: int) -> None:
    """Copies ``source`` into a sharded model, each rank reading only the rows its shards hold.

    ``fully_shard`` splits every parameter along its first dimension as ``torch.chunk`` does: rank r
    holds rows ``[r * ceil(n / N), ...)``, as many as its local tensor has.
    """
    entries = model.state_dict(keep_vars=True)
    check_weights_fit({name: list(tensor.shape) for name, tensor in entries.items()}, source)
    for name, tensor in entries.items():
        if source.fresh(name):
            continue
        if isinstance(tensor, DTensor):
            local = tensor.to_local()
            start = min(rank * -(-tensor.shape[0] // world_size), tensor.shape[0])
            local.copy_(source.read(name, rows=(start, start + local.shape[0])))
        else:
            tensor.copy_(source.read(name))


def read_weights(directory: Path) -> dict[str, torch.Tensor]:
    """The full model state dict of an FSDP2 checkpoint, read in one process (no process group)."""
    reader = SafeReader(directory / DCP_DIR)
    metadata = reader.read_metadata()
    prefix = "model."
    state = {
        key[len(prefix) :]: torch.empty(entry.size, dtype=entry.properties.dtype)
        for key, entry in metadata.state_dict_metadata.items()
        if key.startswith(prefix) and hasattr(entry, "size")
    }
    wrapped = {"model": state}
    dcp.load(wrapped, storage_reader=reader, planner=SafePlanner(), no_dist=True)
    return wrapped["model"]


class SafeReader(FileSystemReader):
    """DCP's file reader with the ``.metadata`` index unpickled through an allow-list, and no storage
    transforms (orchestrator writes none; a reader given one would run an extension it names)."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        metadata = read_dcp_metadata(Path(self.path))
        if metadata.storage_meta is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafePlanner(DefaultLoadPlanner):
    """DCP's load planner, with each non-tensor item checked before torch unpickles it."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        unpickle.check_bytes(
            value.getvalue(), allowed=unpickle.TORCH_TENSORS, source=f"{DCP_DIR} item {read_item.dest_index.fqn}"
        )
        value.seek(0)
        super().load_bytes(read_item, value)


def read_dcp_metadata(dcp_dir: Path) -> Metadata:
    """The ``.metadata`` index of a DCP checkpoint, unpickled through an allow-list."""
    source = str(dcp_dir / ".metadata")
    with open(source, "rb") as stream:
        metadata = unpickle.load(stream, allowed=unpickle.DCP_METADATA, source=source)
    if not isinstance(metadata, Metadata):
        raise unpickle.UnsafeCheckpoint(source, f"it holds a {type(metadata).__name__}, not DCP metadata")
    for info in (metadata.storage_data or {}).values():
        if getattr(info, "transform_descriptors", None):
            raise unpickle.UnsafeCheckpoint(
                source,
                f"it names storage transforms {list(info.transform_descriptors)}, which orchestrator never writes",
            )
        name = str(info.relative_path)
        if "/" in name or "\\" in name or name in ("", ".", ".."):
            raise unpickle.UnsafeCheckpoint(source, f"it names a file outside its directory ({name!r})")
    return metadata


def stored_weights(directory: Path) -> dict[str, StoredTensor]:
    """The ``.metadata`` index lists every tensor; each is loaded alone when read, ``dcp.load`` on a one-key
    state dict, through the same allow-listed ``SafeReader``/``SafePlanner`` as every other DCP read."""
    prefix = "model."
    metadata = read_dcp_metadata(directory / DCP_DIR)
    return {
        key[len(prefix) :]: StoredTensor(
            shape=tuple(entry.size),
            dtype=entry.properties.dtype,
            read=partial(_read_dcp_tensor, directory / DCP_DIR, key, entry),
        )
        for key, entry in metadata.state_dict_metadata.items()
        if key.startswith(prefix) and isinstance(entry, TensorStorageMetadata)
    }


def _read_dcp_tensor(dcp_dir: Path, key: str, entry: TensorStorageMetadata) -> torch.Tensor:
    tensor = torch.empty(entry.size, dtype=entry.properties.dtype)
    with warnings.catch_warnings():  # "no process group: loading in one process", which is the intent
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load({key: tensor}, storage_reader=SafeReader(dcp_dir), planner=SafePlanner(), no_dist=True)
    return tensor


def check_files(directory: Path) -> None:
    """``check_dcp`` for every DCP index under ``directory``."""
    for index in sorted(directory.rglob(".metadata")):
        check_dcp(index.parent)


def check_dcp(dcp_dir: Path) -> None:
    """Reads what DCP would unpickle from ``dcp_dir`` (the index and every non-tensor item) through the
    allow-lists, in one process: ``UnsafeCheckpoint`` for a file that would run code when loaded."""
    metadata = read_dcp_metadata(dcp_dir)
    for index, info in (metadata.storage_data or {}).items():
        if not isinstance(metadata.state_dict_metadata.get(index.fqn), BytesStorageMetadata):
            continue  # tensors: DCP itself loads them with weights_only=True
        item = dcp_dir / info.relative_path
        with open(item, "rb") as stream:
            stream.seek(info.offset)
            data = stream.read(info.length)
        unpickle.check_bytes(data, allowed=unpickle.TORCH_TENSORS, source=f"{item} (item {index.fqn})")


STRATEGIES = {"fsdp2": FSDP2Strategy}
