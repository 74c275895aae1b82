"""``model.pretrained=DIR``: the weights of a ``save_pretrained`` directory, read one tensor (or one
rank's rows of it) at a time.

DIR holds ``config.json`` and the weights as safetensors: ``model.safetensors``, or shards listed by
``model.safetensors.index.json``. safetensors is a header of names, dtypes, shapes and offsets followed
by raw bytes: nothing in it can run code, and ``safe_open(...).get_slice(name)[start:stop]`` reads just
those rows from disk (and ``[:, start:stop]`` those columns: a tensor stored transposed, as GPT-2's
``Conv1D`` weights are, gives a rank its rows that way). PyTorch pickles (``pytorch_model.bin``) are never
read. Nothing is downloaded: a hub id that is not a local directory is an error saying how to get a local copy.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from orchestrator.errors import UserError
from orchestrator.fsutil import read_json_object
from orchestrator.models.recipe import WeightSource

CONFIG_FILE = "config.json"
# safetensors' dtype names (the header's), as torch dtypes.
_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def pretrained_dir(path: str, *, key: str = "model.pretrained") -> Path:
    """The local directory ``path`` names, with a config and safetensors weights; UserError otherwise."""
    directory = Path(path).expanduser()
    if not directory.exists():
        hint = (
            (
                " (it looks like a Hugging Face hub id: nothing is downloaded here; fetch it first, e.g. "
                f"`huggingface-cli download {path} --local-dir DIR`, and set {key}=DIR)"
            )
            if "/" in path and not path.startswith(("/", ".", "~"))
            else ""
        )
        raise UserError(f"{key}={path}: no such directory{hint}")
    if not directory.is_dir():
        raise UserError(
            f"{key}={path}: not a directory (expected what save_pretrained writes: {CONFIG_FILE} and *.safetensors)"
        )
    if not (directory / CONFIG_FILE).is_file():
        raise UserError(f"{key}={path}: no {CONFIG_FILE} in it (expected what save_pretrained writes)")
    if not (directory / SINGLE_FILE).is_file() and not (directory / INDEX_FILE).is_file():
        pickles = sorted(p.name for p in directory.glob("*.bin"))
        found = (
            f" ({', '.join(pickles)} are pickles, which are never read: save them as safetensors)" if pickles else ""
        )
        raise UserError(f"{key}={path}: no {SINGLE_FILE} or {INDEX_FILE} in it{found}")
    return directory


def read_config(directory: Path, *, key: str = "model.pretrained") -> dict[str, Any]:
    """``config.json`` as a dict; UserError naming the file when it is not a JSON object."""
    return read_json_object(directory / CONFIG_FILE, key=key)


class SafetensorsWeights(WeightSource):
    """The tensors of a pretrained directory under the model's own state-dict names.

    Args:
        directory: the checked directory (``pretrained_dir``).
        names: model state-dict name -> the name in the files (a prefix added or dropped, say).
        aliases: model names that share a tensor with another name (tied weights), mapped to that name:
            a file may store a tied tensor once.
        transposed: model names whose tensor the files store transposed (GPT-2's ``Conv1D`` weights, (in,
            out) for ``nn.Linear``'s (out, in)): read back transposed, a rank's rows read as the file's columns.
        key: the setting named in errors.
    """

    def __init__(
        self,
        directory: Path,
        *,
        names: Mapping[str, str],
        aliases: Mapping[str, str] | None = None,
        transposed: frozenset[str] = frozenset(),
        key: str = "model.pretrained",
    ) -> None:
        self.directory = directory
        self.key = key
        self._files = self._file_of_each_tensor()
        self._names = dict(names)
        self._transposed = transposed
        for alias, target in (aliases or {}).items():
            if self._names.get(alias) not in self._files and self._names.get(target) in self._files:
                self._names[alias] = self._names[target]
                if target in transposed:
                    self._transposed = self._transposed | {alias}

    def read_stored(self, stored: str) -> torch.Tensor | None:
        """The tensor the files call ``stored`` (one the model need not have), or None where they lack it."""
        from safetensors import safe_open

        if stored not in self._files:
            return None
        with safe_open(str(self._files[stored]), framework="pt") as f:
            return f.get_tensor(stored)

    def file_of(self, stored: str) -> Path:
        """The file that holds the tensor the files call ``stored``."""
        return self._files[stored]

    def _file_of_each_tensor(self) -> dict[str, Path]:
        from safetensors import safe_open

        index = self.directory / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise UserError(f"{self.key}: {index} is not a safetensors index ({exc})") from None
            files = {}
            for name, file in weight_map.items():
                path = self.directory / file
                if path.parent != self.directory or not path.is_file():
                    raise UserError(f"{self.key}: {index} names {file!r}, which is not a file in {self.directory}")
                files[name] = path
            return files
        try:
            with safe_open(str(self.directory / SINGLE_FILE), framework="pt") as f:
                return {name: self.directory / SINGLE_FILE for name in f.keys()}
        except Exception as exc:  # safetensors raises its own SafetensorError for a damaged header
            raise UserError(f"{self.key}: {self.directory / SINGLE_FILE} is not a safetensors file ({exc})") from None

    def shapes(self) -> dict[str, list[int]]:
        found = {}
        for name, stored in self._headers():
            shape = list(stored.get_shape())
            found[name] = shape[::-1] if name in self._transposed else shape
        return found

    def dtypes(self) -> dict[str, torch.dtype]:
        return {name: _DTYPES[stored.get_dtype()] for name, stored in self._headers()}

    def _headers(self) -> Iterator[tuple[str, Any]]:
        """Each model name with its stored tensor's lazy slice (shape and dtype from the header, no data)."""
        from safetensors import safe_open

        by_file: dict[Path, list[str]] = {}
        for name, stored in self._names.items():
            if stored in self._files:
                by_file.setdefault(self._files[stored], []).append(name)
        for path, names in by_file.items():
            with safe_open(str(path), framework="pt") as f:
                for name in names:
                    yield name, f.get_slice(self._names[name])

    def read(self, name: str, *, rows: tuple[int, int] | None = None) -> torch.Tensor:
        from safetensors import safe_open

        stored = self._names[name]
        with safe_open(str(self._files[stored]), framework="pt") as f:
            if name in self._transposed:
                # The model's rows are the file's columns: a slice reads just those, a row of the file at a time.
                tensor = f.get_tensor(stored) if rows is None else f.get_slice(stored)[:, rows[0] : rows[1]]
                return tensor.t().contiguous()
            if rows is None:
                return f.get_tensor(stored)
            return f.get_slice(stored)[rows[0] : rows[1]]
