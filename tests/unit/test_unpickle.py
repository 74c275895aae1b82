"""train.unpickle: pickles read as data, every global on an allow-list."""

from __future__ import annotations

import collections
import io
import pickle
import zipfile
from pathlib import Path

import pytest
import torch

from orchestrator.checkpoints import unpickle
from tests.helpers import Payload


def test_tensors_and_plain_data_pass(tmp_path: Path) -> None:
    path = tmp_path / "state.pt"
    torch.save(
        {
            "w": torch.ones(2, 3),
            "b": torch.zeros(3, dtype=torch.bfloat16),
            "step": 7,
            "betas": (0.9, 0.95),
            "nested": collections.OrderedDict(a=[1.5, None, "x"]),
            "p": torch.nn.Parameter(torch.ones(1)),
        },
        path,
    )
    unpickle.check_torch_file(path, allowed=unpickle.TORCH_TENSORS)


@pytest.mark.parametrize(
    "write, reason",
    [
        (
            lambda path, marker: torch.save({"w": torch.ones(1), "x": Payload(marker)}, path),
            "loading it would call posix.system",
        ),
        (
            lambda path, marker: torch.save({"w": torch.ones(1)}, path, _use_new_zipfile_serialization=False),
            "not in torch's zip format",
        ),
        (lambda path, marker: path.write_bytes(pickle.dumps(Payload(marker))), "not in torch's zip format"),
        (lambda path, marker: zipfile.ZipFile(path, "w").close(), "a zip file with no pickle in it"),
        (lambda path, marker: _zip(path, {"archive/version": b"3"}), "a zip file with no pickle in it"),
        (lambda path, marker: _zip(path, {"archive/data.pkl": b"\x80\x04garbage"}), "not a readable pickle"),
    ],
    ids=["payload", "legacy format", "plain pickle", "empty zip", "zip without pickle", "torn pickle"],
)
def test_anything_else_is_refused_and_nothing_runs(tmp_path: Path, write, reason: str) -> None:
    path, marker = tmp_path / "state.pt", tmp_path / "pwned"
    write(path, marker)
    with pytest.raises(unpickle.UnsafeCheckpoint, match=f"{path} refused: {reason}"):
        unpickle.check_torch_file(path, allowed=unpickle.TORCH_TENSORS)
    assert not marker.exists()


def _zip(path: Path, members: dict[str, bytes]) -> None:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)


def test_load_builds_allowed_classes_only(tmp_path: Path) -> None:
    data = pickle.dumps({"shape": torch.Size([2, 3]), "dtype": torch.float32, "path": Path("/x")})
    loaded = unpickle.load(io.BytesIO(data), allowed=unpickle.DCP_METADATA, source="index")
    assert loaded == {"shape": torch.Size([2, 3]), "dtype": torch.float32, "path": Path("/x")}
    with pytest.raises(unpickle.UnsafeCheckpoint, match="index refused: loading it would call posix.system"):
        unpickle.load(
            io.BytesIO(pickle.dumps(Payload(tmp_path / "pwned"))), allowed=unpickle.DCP_METADATA, source="index"
        )
    assert not (tmp_path / "pwned").exists()


def test_the_refusal_crosses_processes_intact() -> None:
    """DCP gathers every rank's exception: it must pickle and come back with its message."""
    error = unpickle.UnsafeCheckpoint("ckpt/x.pt", "loading it would call posix.system")
    again = pickle.loads(pickle.dumps(error))
    assert type(again) is unpickle.UnsafeCheckpoint and str(again) == str(error)
