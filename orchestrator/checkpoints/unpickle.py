"""Pickles from checkpoints read as data: every global a pickle names must be on an allow-list.

A pickle is a program: unpickling calls whatever callables it names (``os.system`` as readily as
``OrderedDict``), so a checkpoint someone hands you could run their code in every worker. torch's
``weights_only`` loader admits only tensors and plain data, and orchestrator reads its own
``torch.save`` files with it. Two readers it calls do not: ``torch.distributed.checkpoint`` (FSDP2)
unpickles its ``.metadata`` index with plain ``pickle`` and its non-tensor items with
``weights_only=False``, and DeepSpeed loads its files with ``weights_only=False``. Here:

- ``load`` unpickles with the real classes, but only those on its allow-list (DCP's metadata);
- ``check_torch_file`` walks a ``torch.save`` file's pickles without building anything (each allowed
  global is replaced by an inert stand-in) and raises ``UnsafeCheckpoint`` naming the first global
  that is not allowed; a file that passes names nothing that can run code, so a library may then
  load it its own way.

Allow-lists hold what orchestrator's strategies write, found by walking real checkpoints of each
(tests/unit/test_unpickle.py keeps them honest). This module uses the standard library only.
"""

from __future__ import annotations

import importlib
import io
import pickle
import zipfile
from pathlib import Path
from typing import IO, Any, Iterable

from orchestrator.errors import UserError

Global = tuple[str, str]

# torch.save of tensors and containers of them (the rebuild functions take only storages and numbers).
TORCH_TENSORS: frozenset[Global] = frozenset(
    {
        ("collections", "OrderedDict"),
        ("torch", "Size"),
        ("torch", "Tensor"),
        ("torch.nn.parameter", "Parameter"),
        ("torch._utils", "_rebuild_tensor_v2"),
        ("torch._utils", "_rebuild_parameter"),
        ("torch._tensor", "_rebuild_from_type_v2"),
        ("torch.serialization", "_get_layout"),
        *(
            ("torch", f"{kind}Storage")
            for kind in (
                "Float",
                "Double",
                "Half",
                "BFloat16",
                "Long",
                "Int",
                "Short",
                "Char",
                "Byte",
                "Bool",
                "Untyped",
            )
        ),
        *(
            ("torch", dtype)
            for dtype in (
                "float32",
                "float64",
                "float16",
                "bfloat16",
                "int64",
                "int32",
                "int16",
                "int8",
                "uint8",
                "bool",
            )
        ),
    }
)
# DeepSpeed's model and optimizer state files (ZeRO stages 0-3): tensors plus a few plain records.
DEEPSPEED: frozenset[Global] = TORCH_TENSORS | {
    ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
    ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),
    ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
    ("deepspeed.utils.tensor_fragment", "fragment_address"),
}
# torch.distributed.checkpoint's ``.metadata``: its index dataclasses, shapes and dtypes.
DCP_METADATA: frozenset[Global] = TORCH_TENSORS | {
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    *(
        ("torch.distributed.checkpoint.metadata", name)
        for name in (
            "Metadata",
            "MetadataIndex",
            "StorageMeta",
            "TensorProperties",
            "TensorStorageMetadata",
            "ChunkStorageMetadata",
            "BytesStorageMetadata",
            "_MEM_FORMAT_ENCODING",
        )
    ),
}


class UnsafeCheckpoint(UserError):
    """A checkpoint file that would run code when loaded: refused, never retried or skipped."""

    def __init__(self, source: str, reason: str) -> None:
        super().__init__(f"{source} refused: {reason}")
        self.source = source
        self.reason = reason

    def __reduce__(self) -> tuple:  # crosses processes (DCP gathers every rank's exception)
        return type(self), (self.source, self.reason)


def _calls(found: str) -> str:
    return f"loading it would call {found}, and a checkpoint may hold only tensors and plain data"


class _Inert:
    """Stands in for every allowed global while a pickle is only walked: accepts any call or state."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __call__(self, *args: Any, **kwargs: Any) -> _Inert:
        return _Inert()

    def __setstate__(self, state: Any) -> None:
        pass

    def __setitem__(self, key: Any, value: Any) -> None:  # SETITEM(S) on an allowed mapping type
        pass

    def append(self, value: Any) -> None:  # APPEND(S) on an allowed sequence type
        pass

    def extend(self, values: Any) -> None:
        pass


class _Restricted(pickle.Unpickler):
    def __init__(self, stream: IO[bytes], *, allowed: frozenset[Global], source: str, inert: bool) -> None:
        super().__init__(stream)
        self.allowed = allowed
        self.source = source
        self.inert = inert

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.allowed:
            raise UnsafeCheckpoint(self.source, _calls(f"{module}.{name}"))
        if self.inert:
            return _Inert
        return getattr(importlib.import_module(module), name)

    def persistent_load(self, pid: Any) -> Any:
        if not self.inert:
            raise UnsafeCheckpoint(self.source, "a persistent reference, which this file type never holds")
        return _Inert()


def load(stream: IO[bytes], *, allowed: frozenset[Global], source: str) -> Any:
    """Unpickles ``stream``, building only the allowed globals; ``UnsafeCheckpoint`` for any other."""
    try:
        return _Restricted(stream, allowed=allowed, source=source, inert=False).load()
    except UnsafeCheckpoint:
        raise
    except Exception as exc:  # a truncated or malformed pickle
        raise UnsafeCheckpoint(source, f"not a readable pickle ({type(exc).__name__})") from None


def check_bytes(data: bytes, *, allowed: frozenset[Global], source: str) -> None:
    """Walks ``torch.save`` output held in memory: see ``check_torch_file``."""
    _check_torch_stream(io.BytesIO(data), allowed=allowed, source=source)


def check_torch_file(path: Path, *, allowed: frozenset[Global], source: str | None = None) -> None:
    """Raises ``UnsafeCheckpoint`` unless every pickle in the ``torch.save`` file ``path`` names allowed
    globals only. Only the zip format (torch's default since 1.6) is accepted: the legacy format's
    several pickles in a row are never read."""
    with open(path, "rb") as stream:
        _check_torch_stream(stream, allowed=allowed, source=source or str(path))


def _check_torch_stream(stream: IO[bytes], *, allowed: frozenset[Global], source: str) -> None:
    if not zipfile.is_zipfile(stream):
        raise UnsafeCheckpoint(source, "not in torch's zip format (the legacy format is never read)")
    stream.seek(0)
    with zipfile.ZipFile(stream) as archive:
        pickles = [name for name in archive.namelist() if name.endswith(".pkl")]
        if not pickles:
            raise UnsafeCheckpoint(source, "a zip file with no pickle in it")
        for name in pickles:
            try:
                _Restricted(io.BytesIO(archive.read(name)), allowed=allowed, source=source, inert=True).load()
            except UnsafeCheckpoint:
                raise
            except Exception as exc:  # malformed: refuse rather than let another reader interpret it
                raise UnsafeCheckpoint(source, f"not a readable pickle ({type(exc).__name__})") from None


def check_torch_files(paths: Iterable[Path], *, allowed: frozenset[Global], root: Path) -> None:
    """``check_torch_file`` for each path, named relative to ``root`` in errors."""
    for path in paths:
        check_torch_file(path, allowed=allowed, source=f"{root}: {path.relative_to(root)}")
