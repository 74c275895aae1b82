"""``HashingFile``: the digest of what ``torch.save`` writes through it is the digest of the file."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from orchestrator.checkpoints import hashing, manifest


@pytest.mark.parametrize("zipfile", [True, False], ids=["zip", "legacy"])
def test_torch_save_through_a_hashing_file_hashes_exactly_the_file(tmp_path: Path, zipfile: bool) -> None:
    state = {"weight": torch.randn(1000, 300), "step": torch.tensor(7), "note": {"lr": 0.1}}
    path = tmp_path / "state.pt"
    digest = hashing.save_hashed(state, path, zipfile=zipfile)
    assert digest == hashing.read_back(path)
    assert digest.entry() == manifest.file_entry(path)
    loaded = torch.load(path, weights_only=True, mmap=zipfile)  # mmap reads the zip format only
    assert torch.equal(loaded["weight"], state["weight"]) and loaded["note"] == state["note"]


def test_written_bytes_are_hashed_as_written(tmp_path: Path) -> None:
    digest = hashing.write_hashed(tmp_path / "state.json", b'{"step": 3}\n')
    assert digest == hashing.read_back(tmp_path / "state.json")
