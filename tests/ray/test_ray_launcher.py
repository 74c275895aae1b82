"""``launcher=ray``: Ray Train's TorchTrainer runs the same worker as ``launcher=local``, on an
embedded Ray started for the run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import run_cli, train_losses


@pytest.mark.slow
def test_an_embedded_ray_run_trains_exactly_as_the_local_launcher(tmp_path: Path, tiny_overrides) -> None:
    local, ray = tmp_path / "local", tmp_path / "ray"
    run_cli("train", *tiny_overrides, f"hydra.run.dir={local}", cwd=tmp_path, check=True)
    run_cli("train", *_on_ray(tiny_overrides), f"hydra.run.dir={ray}", cwd=tmp_path, check=True, timeout=300)

    summary = json.loads((ray / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 20 and summary["world_size"] == 2
    assert train_losses(ray) == train_losses(local)
    # Our checkpoints are Ray Train's: registered in place (no copy) as each one completes.
    snapshot = (ray / "checkpoint_manager_snapshot.json").read_text()
    assert "step-00000010" in snapshot and "step-00000020" in snapshot
    assert sorted(p.name for p in (ray / "checkpoints").iterdir()) == ["latest", "step-00000010", "step-00000020"]


def _on_ray(overrides: list[str]) -> list[str]:
    return [("launcher=ray" if override == "launcher=local" else override) for override in overrides]
