"""A run directory's layout, and ``summary.json``: the one place their file names and fields are spelled.

What a run dir holds::

    config.yaml       the resolved config (the driver, at the start)
    metrics.jsonl     one record per logged step and eval (rank 0, as it trains)
    resources.jsonl   every rank's CPU, memory and GPU use (rank 0, as it trains)
    summary.json      the outcome (the driver, at the end): RunSummary
    report.html       the HTML report (the driver, at the end)
    checkpoints/      one directory per saved step (train/checkpoint.py)
    profile/          traces and top operators (trainer.profile)
    replaced/         what an earlier run left here, set aside rather than deleted
    .lock             held by the run that owns the dir (launch/ownership.py)
    wandb/            the W&B run's files (logger=wandb; W&B names it under the dir it is given)

This module sits at the bottom of the package: it imports only the standard library and
``orchestrator.errors`` / ``orchestrator.fsutil``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from orchestrator.errors import UserError
from orchestrator.fsutil import read_json_object, write_atomic

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
RESOURCES_FILE = "resources.jsonl"
SUMMARY_FILE = "summary.json"
REPORT_FILE = "report.html"
CHECKPOINTS_DIR = "checkpoints"
PROFILE_DIR = "profile"
REPLACED_DIR = "replaced"
LOCK_FILE = ".lock"

# Written by rank 0 as it trains; the driver writes the others.
WORKER_RECORDS = (METRICS_FILE, RESOURCES_FILE)
DRIVER_RECORDS = (CONFIG_FILE, SUMMARY_FILE, REPORT_FILE)
# Any of them makes a directory a run dir (one still running has no summary yet).
RUN_FILES = (METRICS_FILE, SUMMARY_FILE, CONFIG_FILE)


@dataclass(frozen=True)
class RunDir:
    """The paths inside one run directory."""

    path: Path

    @property
    def config(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def metrics(self) -> Path:
        return self.path / METRICS_FILE

    @property
    def resources(self) -> Path:
        return self.path / RESOURCES_FILE

    @property
    def summary(self) -> Path:
        return self.path / SUMMARY_FILE

    @property
    def report(self) -> Path:
        return self.path / REPORT_FILE

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS_DIR

    @property
    def profile(self) -> Path:
        return self.path / PROFILE_DIR

    @property
    def replaced(self) -> Path:
        return self.path / REPLACED_DIR

    @property
    def lock(self) -> Path:
        return self.path / LOCK_FILE

    def is_run(self) -> bool:
        """The directory holds a run's records (it may still be running)."""
        return any((self.path / name).exists() for name in RUN_FILES)


# RunSummary.status of a search trial whose scheduler stopped it before trainer.max_steps (its
# last checkpoint is complete); the others are completed and failed.
STOPPED_BY_SEARCH = "stopped_early_by_search"

# Written only when set: a run without an error, a W&B run or a script has no such key at all.
_OMITTED_WHEN_NONE = frozenset({"error", "wandb", "kind", "script", "args"})


@dataclass(kw_only=True)
class RunSummary:
    """A run's outcome, as ``summary.json`` holds it; the only writer and reader of that file.

    The training loop measures most fields (``train/loop.py``); the driver adds where and how the run
    ran (``job`` to ``run_dir``); a script job (``job.kind=script``) fills only ``status``, the script
    fields and the driver's. A field nobody knows is null in the file, except those in
    ``_OMITTED_WHEN_NONE``, which are left out. Keys the fields do not name (a file from another
    version) are kept in ``extra`` and written back unchanged. Values are not type-checked on read.
    """

    status: str  # completed, failed, or STOPPED_BY_SEARCH
    error: str | None = None
    kind: str | None = None  # "script" for a script job, else unset
    script: str | None = None
    args: list[str] | None = None
    # measured by the training loop
    steps: int | None = None
    final_loss: float | None = None
    first_eval_loss: float | None = None
    final_eval_loss: float | None = None
    best_eval_loss: float | None = None
    final_eval_accuracy: float | None = None
    tokens_per_s: float | None = None
    tokens_per_s_per_worker: float | None = None
    step_time_s_median: float | None = None
    mfu: float | None = None
    tokens_seen: int | None = None
    world_size: int | None = None
    strategy: str | None = None
    device: str | None = None
    restarts: int | None = None
    resumed_from_step: int | None = None
    stopped_early: bool | None = None
    nonfinite_skips: int | None = None
    overflow_skips: int | None = None
    num_params: int | None = None
    num_trainable_params: int | None = None
    flops_per_token: float | None = None
    peak_flops_per_device: float | None = None
    param_bytes: int | None = None
    grad_bytes: int | None = None
    optimizer_bytes: int | None = None
    master_bytes: int | None = None
    peak_mem_bytes: int | None = None
    train_wall_s: float | None = None
    wandb: str | None = None  # the W&B run's URL, or the `wandb sync` command
    # added by the driver
    job: str | None = None
    launcher: str | None = None
    wall_s: float | None = None
    run_dir: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def completed(self) -> bool:
        return self.status == "completed"

    @property
    def model_state_bytes(self) -> int:
        """One rank's parameters, gradients, optimizer state and fp32 master copy, together."""
        return sum(value or 0 for value in (self.param_bytes, self.grad_bytes, self.optimizer_bytes, self.master_bytes))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunSummary:
        """The summary in ``data`` (what a launcher returns, or a file's content); unknown keys go to ``extra``.

        Raises:
            UserError: ``data`` has no ``status``.
        """
        if not isinstance(data.get("status"), str):
            raise UserError(f"a run summary needs a status, got {data.get('status')!r}")
        names = _field_names()
        known = {key: value for key, value in data.items() if key in names}
        return cls(**known, extra={key: value for key, value in data.items() if key not in names})

    def to_dict(self) -> dict[str, Any]:
        """The file's content: non-finite numbers (a diverged loss) as None, as in ``metrics.jsonl``
        (JSON has no NaN, and strict readers reject it)."""
        content = {
            name: getattr(self, name)
            for name in _field_names()
            if name not in _OMITTED_WHEN_NONE or getattr(self, name) is not None
        }
        content.update(self.extra)
        return {
            key: None if isinstance(value, float) and not math.isfinite(value) else value
            for key, value in content.items()
        }

    def write(self, path: Path) -> None:
        """Writes the summary to ``path`` (a ``summary.json``), durably."""
        write_atomic(path, json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def read(cls, path: Path) -> RunSummary:
        """The summary in ``path`` (a ``summary.json``).

        Raises:
            UserError: the file is missing, not a JSON object, or has no status.
        """
        content = read_json_object(path, key=SUMMARY_FILE)
        if not isinstance(content.get("status"), str):
            raise UserError(f"{SUMMARY_FILE}: {path} has no status")
        return cls.from_dict(content)


def _field_names() -> tuple[str, ...]:
    return tuple(f.name for f in fields(RunSummary) if f.name != "extra")
