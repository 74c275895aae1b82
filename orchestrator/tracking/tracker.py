"""Rank 0's record of a run: the console, ``metrics.jsonl``, ``resources.jsonl`` and the W&B run.

Other ranks hold a Tracker too, with every method a no-op, so the loop never asks which rank it is on
to decide whether to log.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from orchestrator.rundir import WORKER_RECORDS, RunDir
from orchestrator.tracking.console import Progress
from orchestrator.tracking.jsonl import JsonlWriter, set_aside, truncate_after_step
from orchestrator.tracking.wandb_run import WandbRun, wandb_name


class Tracker:
    """Args:
    run_dir: where the JSONL files live.
    enabled: True on rank 0 only.
    max_steps: the run's last step (for the progress bar).
    resume_step: the step a resumed run continues from (later records in the files are dropped; they
        are recomputed), or None for a fresh start (the files start empty; records an earlier run left
        in the run dir are moved to ``replaced/``, never deleted).
    progress: show the console progress.
    wandb: rank 0's W&B run (logger=wandb), or None.
    """

    def __init__(
        self,
        run_dir: Path,
        *,
        enabled: bool,
        max_steps: int,
        resume_step: int | None,
        progress: bool,
        wandb: WandbRun | None = None,
    ) -> None:
        self.enabled = enabled
        self.wandb = wandb
        if not enabled:
            return
        if resume_step is None:
            set_aside(run_dir, WORKER_RECORDS)
        else:
            for name in WORKER_RECORDS:
                truncate_after_step(run_dir / name, resume_step)
        files = RunDir(run_dir)
        self.metrics = JsonlWriter(files.metrics)
        self.resources = JsonlWriter(files.resources)
        self.progress = Progress(total=max_steps, initial=resume_step or 0, enabled=progress)

    def log_step(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.metrics.write({"step": step, **metrics, "time": time.time()})
        self.progress.update(step, loss=metrics["loss"], tokens_per_s=metrics["tokens_per_s"])
        if self.wandb is not None:
            self.wandb.log(
                step, {wandb_name(key): value for key, value in metrics.items() if isinstance(value, (int, float))}
            )

    def log_eval(self, step: int, eval_loss: float) -> None:
        if not self.enabled:
            return
        self.metrics.write({"step": step, "eval_loss": eval_loss, "time": time.time()})
        self.progress.write(f"step {step}: eval loss {eval_loss:.4f}")
        if self.wandb is not None:
            self.wandb.log(step, {"eval/loss": eval_loss})

    def log_resources(self, step: int, per_rank: list[dict[str, Any]]) -> None:
        if not self.enabled:
            return
        now = time.time()
        for rank, sample in enumerate(per_rank):
            self.resources.write({"step": step, "rank": rank, **sample, "time": now})
        if self.wandb is not None:
            self.wandb.log(
                step,
                {
                    f"resources/rank{rank}/{key}": value
                    for rank, sample in enumerate(per_rank)
                    for key, value in sample.items()
                    if isinstance(value, (int, float))
                },
            )

    def save_traces(self, traces: list[Path]) -> None:
        """The run's profiler traces (``trainer.profile``), one per rank, to its W&B run."""
        if self.wandb is not None:
            self.wandb.save_traces(traces)

    def message(self, text: str) -> None:
        if self.enabled:
            self.progress.write(text)

    def close(self, summary: dict[str, Any] | None) -> None:
        """Closes the files and finishes the W&B run; ``summary`` None: the run crashed.

        The summary gains ``wandb``: where to see the W&B run (its URL, or the ``wandb sync`` command).
        """
        if self.enabled:
            self.progress.close()
            self.metrics.close()
            self.resources.close()
        if self.wandb is not None:
            location = self.wandb.location
            if self.wandb.finish(summary) and summary is not None and location is not None:
                summary["wandb"] = location
