"""Files hashed while they are written: a checkpoint's manifest without reading the checkpoint back.

A strategy's ``save`` writes through ``HashingFile`` (``save_hashed`` for ``torch.save``) and returns
each file's ``FileDigest``: its size and the sha256 of exactly the bytes that went to the file. A file
written by code that takes only a path (a copied script) is hashed by reading it back (``read_back``).
Verification on resume is unchanged: it reads every file and compares with the manifest.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from orchestrator.checkpoints import manifest


@dataclass(frozen=True, kw_only=True)
class FileDigest:
    """What the manifest records of one file."""

    size: int
    sha256: str

    def entry(self) -> dict:
        return {"size": self.size, "sha256": self.sha256}


def read_back(path: Path) -> FileDigest:
    """The digest of a file already on disk, by reading it."""
    return FileDigest(**manifest.file_entry(path))


def write_hashed(path: Path, data: bytes) -> FileDigest:
    """Writes ``data`` to the new file ``path``; returns its digest."""
    path.write_bytes(data)
    return FileDigest(size=len(data), sha256=hashlib.sha256(data).hexdigest())


class HashingFile:
    """A new file open for sequential binary writing that hashes every byte it writes.

    It is what ``torch.save``, ``pickle.dump`` and DCP's writer need of a stream (``write``, ``tell``,
    ``flush``); it cannot seek, so nothing can rewrite bytes already hashed. It has no ``fileno`` on
    purpose: given one, ``torch.save``'s legacy format writes tensors to the descriptor directly,
    past ``write``. The checkpoint protocol fsyncs every file after it is closed.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = open(path, "wb")
        self._sha256 = hashlib.sha256()
        self._size = 0

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")  # torch hands over views of tensor memory: no copy
        self._sha256.update(view)
        written = self._file.write(view)
        assert written == len(view), "a buffered file writes everything or raises"
        self._size += written
        return written

    def tell(self) -> int:
        return self._size

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()

    @property
    def closed(self) -> bool:
        return self._file.closed

    def digest(self) -> FileDigest:
        """The size and sha256 of what was written so far."""
        return FileDigest(size=self._size, sha256=self._sha256.hexdigest())

    def __enter__(self) -> HashingFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def save_hashed(obj: Any, path: Path, *, zipfile: bool = True) -> FileDigest:
    """``torch.save(obj, path)``, returning the written file's digest.

    Args:
        zipfile: torch's zip format (what ``torch.load(mmap=True)`` needs); False: the legacy format.
    """
    with HashingFile(path) as f:
        torch.save(obj, f, _use_new_zipfile_serialization=zipfile)
        f.flush()
        return f.digest()
