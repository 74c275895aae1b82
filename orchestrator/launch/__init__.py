"""Running a job: the run dir, the launcher, and the summary.

This is the driver side, in the process the user started; workers run ``train.worker.run_worker``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from orchestrator.config.schema import Config, GPTConfig, HFConfig, JobKind
from orchestrator.errors import LaunchError, first_line
from orchestrator.fsutil import write_atomic
from orchestrator.launch.ownership import own_run_dir
from orchestrator.launch.prepared import PreparedJob
from orchestrator.launch.script import run_script_job
from orchestrator.launchers import launcher_spec
from orchestrator.report import write_report
from orchestrator.rundir import RunDir, RunSummary
from orchestrator.tracking.console import format_bytes, format_duration, format_summary
from orchestrator.tracking.jsonl import read_jsonl
from orchestrator.train.storage import put_driver_records


def run_job(job: PreparedJob, *, run_dir: Path, print_summary: bool = True) -> RunSummary:
    """Trains the job with its launcher, writes ``summary.json`` and prints the summary.

    A script job (``job.kind=script``) runs the user's script instead: see ``launch/script.py``.

    Args:
        job: the job, prepared (``launch.prepared``).
        run_dir: the run directory; an existing one is continued per ``trainer.resume``.
        print_summary: print the summary table (or the error) at the end.

    Raises:
        UserError: the run dir is in use by another run (``launch/ownership.py``), or holds checkpoints
            this job must not overwrite or cannot continue.
    """
    run_dir = run_dir.absolute()  # Ray's workers start in working dirs of their own
    _absolute_inputs(job.config)
    with own_run_dir(run_dir):
        return _run_owned(job, run_dir=run_dir, print_summary=print_summary)


def _absolute_inputs(config: Config) -> None:
    """Relative paths of the weights and checkpoints a run reads, made absolute against this working directory:
    Ray's workers start in working directories of their own."""

    def absolute(path: str) -> str:
        local = Path(path).expanduser()
        return str(local.absolute()) if local.exists() else path

    trainer = config.trainer
    if trainer.init_from:
        trainer.init_from = absolute(trainer.init_from)
    if (resume := trainer.resume_from.path) is not None:
        trainer.resume = absolute(resume)
    if isinstance(config.model, (GPTConfig, HFConfig)) and config.model.pretrained:
        config.model.pretrained = absolute(config.model.pretrained)


def _run_owned(job: PreparedJob, *, run_dir: Path, print_summary: bool) -> RunSummary:
    from orchestrator.launch.preflight import check_run_dir  # lazy: imports torch

    config, job_name = job.config, job.job_name
    if config.job.kind is JobKind.script:
        return run_script_job(
            config, run_dir=run_dir, resolved_yaml=job.resolved_yaml, job_name=job_name, print_summary=print_summary
        )
    assert job.model_shapes is not None
    check_run_dir(config, run_dir, model_shapes=job.model_shapes)
    files = RunDir(run_dir)
    started = time.perf_counter()
    run_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(files.config, job.resolved_yaml)
    _mirror(config, run_dir)
    try:
        outcome = launcher_spec(config.launcher.name).train(config, run_dir)
    except LaunchError as exc:
        outcome = _crash_summary(files, error=str(exc), restarts=config.trainer.max_restarts)
    if outcome.get("already_complete") and files.summary.exists():
        print(f"{run_dir} is already complete at step {outcome['steps']}: nothing to train", flush=True)
        summary = RunSummary.read(files.summary)
        _print_summary(summary, report=None)
        return summary
    summary = RunSummary.from_dict(
        {
            **outcome,
            "job": job_name,
            "launcher": config.launcher.name,
            "strategy": config.strategy.name,
            "world_size": config.launcher.num_workers,
            "wall_s": time.perf_counter() - started,
            "run_dir": str(run_dir),
        }
    )
    summary.write(files.summary)
    report = _write_report(files)
    _mirror(config, run_dir)
    if print_summary:
        _print_summary(summary, report=report)
    return summary


def _write_report(files: RunDir) -> str | None:
    """The run's HTML report, ``RUN_DIR/report.html`` (``orchestrator report``); a failure is a warning."""
    try:
        return str(write_report([files.path], files.report))
    except Exception as exc:  # the run is done and recorded: a report that cannot be drawn must not undo that
        print(f"warning: the HTML report could not be written ({first_line(exc)})", file=sys.stderr, flush=True)
        return None


def _mirror(config: Config, run_dir: Path) -> None:
    """The driver's records (config.yaml, summary.json) to ``trainer.storage``; a failed copy is a warning."""
    if not config.trainer.storage:
        return
    try:
        put_driver_records(config.trainer.storage, run_dir, timeout_s=config.trainer.storage_timeout_s)
    except Exception as exc:  # the run dir holds them: a store that is down costs the copy, not the run
        print(
            f"warning: trainer.storage={config.trainer.storage}: copy failed ({first_line(exc)})",
            file=sys.stderr,
            flush=True,
        )


def _crash_summary(files: RunDir, *, error: str, restarts: int) -> dict[str, Any]:
    """What is known of a run whose workers crashed: its last logged step, from metrics.jsonl."""
    steps = [record for record in read_jsonl(files.metrics) if "loss" in record]
    return {
        "status": "failed",
        "error": error,
        "steps": steps[-1]["step"] if steps else 0,
        "final_loss": steps[-1]["loss"] if steps else None,
        "restarts": restarts,
    }


def _parameters_row(summary: RunSummary) -> str | None:
    total, trainable = summary.num_params, summary.num_trainable_params
    if total is None:
        return None
    return f"{total:,}" if trainable in (None, total) else f"{total:,} ({trainable:,} trainable)"


def _model_state_row(summary: RunSummary) -> str | None:
    """What this rank's parameters, gradients and optimizer state hold (ZeRO's fp32 master copy apart)."""
    parts = [
        ("params", summary.param_bytes),
        ("grads", summary.grad_bytes),
        ("optimizer", summary.optimizer_bytes),
        ("master", summary.master_bytes),
    ]
    if parts[0][1] is None:
        return None
    return ", ".join(
        f"{label} {format_bytes(value)}" for label, value in parts if value is not None and (value or label != "master")
    )


def _print_summary(summary: RunSummary, *, report: str | None) -> None:
    if not summary.completed:
        print(f"error: {summary.error or 'training failed'}", file=sys.stderr)
        print(f"run dir: {summary.run_dir}", file=sys.stderr)
        return
    first, final = summary.first_eval_loss, summary.final_eval_loss
    eval_row = f"{first:.4f} -> {final:.4f}" if first is not None and final is not None else None
    mfu, accuracy, step_time_s = summary.mfu, summary.final_eval_accuracy, summary.step_time_s_median
    rows = [
        ("status", summary.status + (" (stopped early)" if summary.stopped_early else "")),
        ("steps", summary.steps),
        ("final loss", summary.final_loss),
        ("eval loss", eval_row),
        ("eval accuracy", f"{accuracy:.2%}" if accuracy is not None else None),
        ("tokens/s", f"{summary.tokens_per_s:,.0f}" if summary.tokens_per_s else None),
        ("step time (median)", f"{step_time_s * 1000:.1f} ms" if step_time_s else None),
        ("MFU", f"{mfu:.1%}" if mfu is not None else None),
        ("parameters", _parameters_row(summary)),
        ("model state / rank", _model_state_row(summary)),
        ("peak memory / rank", format_bytes(summary.peak_mem_bytes) if summary.peak_mem_bytes else None),
        ("workers", f"{summary.world_size} x {summary.device or '?'}, strategy={summary.strategy}"),
        ("restarts", summary.restarts or None),
        ("wall time", format_duration(summary.wall_s or 0.0)),
        ("run dir", summary.run_dir),
        ("report", report),
        ("W&B", summary.wandb),
    ]
    print(format_summary(rows), flush=True)
