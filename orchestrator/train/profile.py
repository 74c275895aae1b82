"""``trainer.profile``: a ``torch.profiler`` trace of a window of optimizer steps, on every rank.

With ``trainer.profile.steps`` > 0, steps ``start_step + 1`` to ``start_step + steps`` (numbered as in
``metrics.jsonl``) run under the profiler: CPU activity always, CUDA kernels too on a GPU. Each step is a
named range (``step 3``) in the trace. When the window ends each rank writes, under the run dir::

    profile/rank<N>.json           the trace (Chrome trace format: Perfetto, chrome://tracing)
    profile/rank<N>_top_ops.json   the operators with the most self time (torch's key_averages)

With ``steps`` = 0 (the default) nothing is built: the loop holds None and checks it, no more.
A run resumed inside the window records the window's remaining steps; one resumed past it records none.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from orchestrator.config.schema import ProfileConfig
from orchestrator.fsutil import write_atomic
from orchestrator.rundir import PROFILE_DIR

TOP_OPS_KEPT = 50
STEP_PREFIX = "step "  # the per-step ranges' names: "step 3"
TRACE_NAME = re.compile(r"rank(\d+)\.json")

log = logging.getLogger(__name__)


def trace_name(rank: int) -> str:
    return f"rank{rank}.json"


def top_ops_name(rank: int) -> str:
    return f"rank{rank}_top_ops.json"


class StepProfiler:
    """Profiles the steps of ``settings``' window on one rank; ``begin_step`` and ``end_step`` bracket each step.

    Args:
        settings: ``trainer.profile``.
        run_dir: the run dir; the files go to ``run_dir/profile``.
        rank: this worker's rank (names its files).
        device: this worker's device; CUDA activity is recorded on a GPU.
    """

    def __init__(self, settings: ProfileConfig, *, run_dir: Path, rank: int, device: torch.device) -> None:
        self.first_step, self.last_step = settings.start_step + 1, settings.start_step + settings.steps
        self.record_shapes = settings.record_shapes
        self.directory = run_dir / PROFILE_DIR
        self.rank = rank
        self.cuda = device.type == "cuda"
        self.profiler: profile | None = None
        self.step_range: record_function | None = None
        self.steps: list[int] = []

    @classmethod
    def create(
        cls, settings: ProfileConfig, *, run_dir: Path, rank: int, device: torch.device, next_step: int
    ) -> StepProfiler | None:
        """A profiler for a run whose next step is ``next_step``; None when profiling is off or the window has passed."""
        if settings.steps == 0 or next_step > settings.start_step + settings.steps:
            return None
        return cls(settings, run_dir=run_dir, rank=rank, device=device)

    def begin_step(self, step: int) -> None:
        """Before step ``step``: starts the profiler at the window's first step, opens the step's range."""
        if not self.first_step <= step <= self.last_step:
            return
        if self.profiler is None:
            activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if self.cuda else [])]
            self.profiler = profile(activities=activities, record_shapes=self.record_shapes)
            self.profiler.start()
        self.step_range = record_function(f"{STEP_PREFIX}{step}")
        self.step_range.__enter__()

    def end_step(self, step: int) -> None:
        """After step ``step``: closes its range; after the window's last step, writes the files."""
        if self.step_range is None:
            return
        self.step_range.__exit__(None, None, None)
        self.step_range = None
        self.steps.append(step)
        if step == self.last_step:
            self.close()

    def close(self) -> None:
        """Stops the profiler and writes this rank's files; the end of a run calls it in case the window was cut
        short (early stopping, an error), and then the files hold the steps that ran."""
        if self.profiler is None:
            return
        if self.step_range is not None:  # an exception inside a step
            self.step_range.__exit__(None, None, None)
            self.step_range = None
        profiler, self.profiler = self.profiler, None
        profiler.stop()
        if not self.steps:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        trace = self.directory / trace_name(self.rank)
        partial = trace.with_name(f".{trace.name}.tmp-{os.getpid()}")
        try:
            profiler.export_chrome_trace(str(partial))
            os.replace(partial, trace)
        finally:
            partial.unlink(missing_ok=True)
        write_atomic(
            self.directory / top_ops_name(self.rank),
            json.dumps(top_ops(profiler, steps=self.steps, cuda=self.cuda), indent=1) + "\n",
        )
        if self.steps[-1] != self.last_step:
            log.warning(
                "rank %d: trainer.profile recorded steps %d-%d of %d-%d (the run ended or stopped first)",
                self.rank,
                self.steps[0],
                self.steps[-1],
                self.first_step,
                self.last_step,
            )


def top_ops(profiler: profile, *, steps: list[int], cuda: bool) -> dict[str, Any]:
    """The operators with the most self time (self CUDA time on a GPU, else self CPU time), step ranges left out.

    Times are microseconds summed over the profiled steps, as torch's ``key_averages`` gives them.
    """
    rows = []
    for event in profiler.key_averages():
        if event.key.startswith(STEP_PREFIX) or event.key.startswith("ProfilerStep"):
            continue
        row = {
            "name": event.key,
            "calls": event.count,
            "self_cpu_us": round(event.self_cpu_time_total, 1),
            "cpu_total_us": round(event.cpu_time_total, 1),
        }
        if cuda:
            row.update(
                self_cuda_us=round(event.self_device_time_total, 1), cuda_total_us=round(event.device_time_total, 1)
            )
        rows.append(row)
    sort_key = "self_cuda_us" if cuda else "self_cpu_us"
    rows.sort(key=lambda row: row[sort_key], reverse=True)
    return {"steps": steps, "device": "cuda" if cuda else "cpu", "sorted_by": sort_key, "ops": rows[:TOP_OPS_KEPT]}


def trace_files(run_dir: Path) -> list[Path]:
    """The run's trace files, by rank (none when it was not profiled)."""
    directory = run_dir / PROFILE_DIR
    if not directory.is_dir():
        return []
    ranks = sorted(int(match[1]) for path in directory.iterdir() if (match := TRACE_NAME.fullmatch(path.name)))
    return [directory / trace_name(rank) for rank in ranks]


def read_top_ops(run_dir: Path, *, rank: int = 0) -> dict[str, Any] | None:
    """A rank's top-ops file from ``run_dir``, or None when the run has none (or it is unreadable)."""
    path = run_dir / PROFILE_DIR / top_ops_name(rank)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None
