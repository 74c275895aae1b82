"""The default job (`make run`): a small GPT on the standard library, 2 workers, DDP, from a cold cache."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.helpers import run_cli


@pytest.mark.slow
def test_default_job_learns_in_under_three_minutes(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    started = time.monotonic()
    # A fresh cache dir: the tokenizer is trained and the corpus encoded inside the timed run.
    run_cli("train", f"data.cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={run_dir}", "logger.progress=false",
            cwd=tmp_path, check=True, timeout=400)
    wall_s = time.monotonic() - started
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["world_size"] == 2 and summary["strategy"] == "ddp"
    assert summary["final_eval_loss"] <= 0.7 * summary["first_eval_loss"]
    assert wall_s < 180
