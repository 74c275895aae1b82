"""Running a job: the run dir, data preparation, the launcher, and the summary.

This is the driver side, in the process the user started; workers run ``train.worker.run_worker``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from orchestrator.config.schema import Config
from orchestrator.data import prepare_data
from orchestrator.errors import TrainingError
from orchestrator.tracking.console import format_bytes, format_duration, format_summary
from orchestrator.fsutil import write_atomic

CONFIG_FILE = "config.yaml"
SUMMARY_FILE = "summary.json"


def run_job(config: Config, *, run_dir: Path, resolved_yaml: str, job_name: str | None) -> dict[str, Any]:
    """Trains ``config`` with its launcher, writes ``summary.json`` and prints the summary.

    Args:
        config: the validated job.
        run_dir: the run directory (exists or is created; an existing one is resumed per trainer.resume).
        resolved_yaml: the resolved config, saved as ``config.yaml``.
        job_name: the ``job=`` choice, if any.
    """
    from orchestrator.launch.local import launch_local

    started = time.perf_counter()
    run_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(run_dir / CONFIG_FILE, resolved_yaml)
    prepare_data(config.data)  # a cache hit: the CLI prepared it before creating the run dir
    try:
        summary = launch_local(config, run_dir)
    except TrainingError as exc:
        summary = {"status": "failed", "error": str(exc)}
    summary = {
        **summary,
        "job": job_name,
        "launcher": config.launcher.name,
        "strategy": config.strategy.name,
        "world_size": config.launcher.num_workers,
        "wall_s": time.perf_counter() - started,
        "run_dir": str(run_dir),
    }
    write_atomic(run_dir / SUMMARY_FILE, json.dumps(summary, indent=1) + "\n")
    _print_summary(summary)
    return summary


def _print_summary(summary: dict[str, Any]) -> None:
    if summary["status"] != "completed":
        print(f"error: {summary.get('error', 'training failed')}", file=sys.stderr)
        print(f"run dir: {summary['run_dir']}", file=sys.stderr)
        return
    first, final = summary.get("first_eval_loss"), summary.get("final_eval_loss")
    eval_row = f"{first:.4f} -> {final:.4f}" if first is not None and final is not None else None
    mfu = summary.get("mfu")
    rows = [
        ("status", summary["status"] + (" (stopped early)" if summary.get("stopped_early") else "")),
        ("steps", summary["steps"]),
        ("final loss", summary.get("final_loss")),
        ("eval loss", eval_row),
        ("tokens/s", f"{summary['tokens_per_s']:,.0f}" if summary.get("tokens_per_s") else None),
        ("step time (median)", f"{summary['step_time_s_median'] * 1000:.1f} ms"
         if summary.get("step_time_s_median") else None),
        ("MFU", f"{mfu:.1%}" if mfu is not None else None),
        ("peak memory / rank", format_bytes(summary["peak_mem_bytes"]) if summary.get("peak_mem_bytes") else None),
        ("workers", f"{summary['world_size']} x {summary.get('device', '?')}, strategy={summary['strategy']}"),
        ("restarts", summary.get("restarts") or None),
        ("wall time", format_duration(summary["wall_s"])),
        ("run dir", summary["run_dir"]),
    ]
    print(format_summary(rows), flush=True)
