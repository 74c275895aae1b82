"""bench/gpu.py at tiny size on the CPU (``--smoke``): the GPU call's script, checked before it gets one."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

from tests.helpers import REPO

SCRIPT = REPO / "bench" / "gpu.py"


def _bench(*args: str, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--models", "tiny", "--out", str(out), *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=out.parent,
    )


def _rows(stdout: str) -> dict[str, list[str]]:
    """mode -> the cells of its table row."""
    rows = [
        [cell.strip() for cell in line.strip("|").split("|")]
        for line in stdout.splitlines()
        if line.startswith("| tiny |")
    ]
    return {cells[1]: cells for cells in rows}


def _gpu_module():
    spec = importlib.util.spec_from_file_location("bench_gpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_a_failed_run_keeps_its_error_and_dir_and_the_next_run_still_runs(tmp_path: Path) -> None:
    out = tmp_path / "runs"
    result = _bench("--modes", "ddp,fsdp2", "--extra", "ddp:trainer.bogus_key=1", out=out)
    assert result.returncode == 1, result.stderr
    rows = _rows(result.stdout)
    assert list(rows) == ["ddp", "fsdp2"]
    assert rows["ddp"][-1].startswith("failed: exit 2: error: trainer.bogus_key: unknown key")
    assert rows["fsdp2"][-1] == "completed"
    assert float(rows["fsdp2"][2]) > 0 and float(rows["fsdp2"][3].replace(",", "")) > 0  # step time, tokens/s
    assert f"log {out / 'tiny-ddp.log'}" in result.stderr and (out / "tiny-ddp.log").exists()
    assert json.loads((out / "tiny-fsdp2" / "summary.json").read_text())["status"] == "completed"


def test_a_run_past_its_timeout_is_killed_and_reported(tmp_path: Path) -> None:
    result = _bench("--modes", "ddp", "--run-timeout", "1", out=tmp_path / "runs")
    assert result.returncode == 1
    assert _rows(result.stdout)["ddp"][-1].startswith("timed out: killed after 1 s")


def test_runs_left_when_the_budget_is_spent_are_skipped(tmp_path: Path) -> None:
    result = _bench("--modes", "ddp,zero3+compile", "--budget", "0", out=tmp_path / "runs")
    rows = _rows(result.stdout)
    assert result.returncode == 1 and list(rows) == ["ddp", "zero3+compile"]
    assert all(cells[-1].startswith("skipped") for cells in rows.values())


def test_the_slowest_variants_run_last() -> None:
    gpu = _gpu_module()
    order = [(v.model, v.mode) for v in gpu.variants(["gpt2_124m", "gpt_1p3b"], list(gpu.ALL_MODES))]
    assert len(order) == 16
    assert order[-2:] == [("gpt2_124m", "zero3+compile"), ("gpt_1p3b", "zero3+compile")]
    assert all(not mode.endswith("+compile") for _, mode in order[:8])


def test_a_failed_run_reports_summary_error_else_the_log_error_line(tmp_path: Path) -> None:
    gpu = _gpu_module()
    log = tmp_path / "run.log"
    log.write_text(
        'starting\nTraceback (most recent call last):\n  File "x.py", line 1, in <module>\n'
        "RuntimeError: CUDA out of memory | tried 2 GiB\nrun dir: /tmp/x\n"
    )
    assert gpu.failure_reason({"error": "non-finite loss (nan) at step 3"}, log) == "non-finite loss (nan) at step 3"
    assert gpu.failure_reason({}, log) == "RuntimeError: CUDA out of memory / tried 2 GiB"
    assert gpu.failure_reason({}, tmp_path / "missing.log") == ""


def test_no_git_gives_an_unknown_commit(monkeypatch) -> None:
    gpu = _gpu_module()
    monkeypatch.setenv("PATH", "")
    assert gpu.commit_of_checkout() == "unknown"
