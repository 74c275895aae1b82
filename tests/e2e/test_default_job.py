"""The default job (`make run`): a small GPT on the standard library, 2 Ray workers, DDP, from a cold cache.

Its 3-minute goal is measured by bench/goals.py, not here: a wall-clock limit fails on a slow day."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import run_cli


@pytest.mark.slow
def test_default_job_learns_from_a_cold_cache(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    # A fresh cache dir: the tokenizer is trained and the corpus encoded inside the timed run.
    result = run_cli(
        "train",
        f"data.cache_dir={tmp_path / 'cache'}",
        f"hydra.run.dir={run_dir}",
        "logger.progress=false",
        cwd=tmp_path,
        check=True,
        timeout=400,
        env={"WANDB_MODE": "offline"},
    )  # what `make run` does on a machine without a W&B key
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["world_size"] == 2 and summary["strategy"] == "ddp"
    assert summary["launcher"] == "ray"  # an embedded Ray, started and stopped for the run
    assert summary["final_eval_loss"] <= 0.7 * summary["first_eval_loss"]
    # Our checkpoints are Ray Train's: each registered in place (no copy) as it completed.
    kept = sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("step-"))
    snapshot = (run_dir / "checkpoint_manager_snapshot.json").read_text()
    assert kept and all(f"checkpoints/{name}" in snapshot for name in kept)
    # It ends by saying where the HTML report and the (offline) W&B run are.
    assert f"report              {run_dir / 'report.html'}" in result.stdout and (run_dir / "report.html").exists()
    assert f"W&B                 wandb sync {run_dir / 'wandb' / 'offline-run-'}" in result.stdout
