"""Training on CUDA through ``python -m orchestrator`` (skipped without a GPU).

Not the console script: on a GPU image the project is on ``PYTHONPATH`` (bench/README.md), not installed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import REPO

pytestmark = pytest.mark.gpu


def run_cli(*args: str, cwd: Path, check: bool) -> subprocess.CompletedProcess:
    """``python -m orchestrator ARGS`` with this checkout first on ``PYTHONPATH``."""
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    result = subprocess.run(
        [sys.executable, "-m", "orchestrator", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": path},
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"orchestrator {' '.join(args)} exited {result.returncode}\n"
            f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
        )
    return result


def _job(run_dir: Path, cache_dir: Path, *extra: str) -> list[str]:
    return [
        "train",
        "job=gpt_tiny_cpu",
        "launcher=local",
        "logger=jsonl",
        "trainer.device=cuda",
        "trainer.precision=bf16",
        "trainer.max_steps=20",
        "trainer.eval_every=10",
        "scheduler.warmup_steps=0",
        f"data.cache_dir={cache_dir}",
        "data.max_bytes=400000",
        f"hydra.run.dir={run_dir}",
        "logger.progress=false",
        *extra,
    ]


def test_one_gpu_bf16_run_reports_gpu_memory_and_mfu(tmp_path: Path, cache_dir: Path) -> None:
    run_dir = tmp_path / "run"
    run_cli(*_job(run_dir, cache_dir, "strategy=none", "launcher.num_workers=1"), cwd=tmp_path, check=True)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["device"] == "cuda"
    resources = [json.loads(line) for line in (run_dir / "resources.jsonl").read_text().splitlines()]
    assert all(r["gpu_mem_peak_bytes"] > 0 for r in resources)
    if torch.cuda.get_device_name().startswith("NVIDIA H"):
        assert summary["mfu"] is not None and 0 < summary["mfu"] < 1


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_ddp_on_two_gpus_uses_nccl(tmp_path: Path, cache_dir: Path) -> None:
    run_dir = tmp_path / "run"
    run_cli(*_job(run_dir, cache_dir, "strategy=ddp", "launcher.num_workers=2"), cwd=tmp_path, check=True)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["world_size"] == 2 and summary["device"] == "cuda"
