"""A search dir's layout, and ``search.json``: the record a search resumes from.

What a search dir holds::

    search.json       the search and every trial started: params, status, result (the driver, as it goes)
    trial-000/ ...    one ordinary run dir per trial (rundir.py)
    job/best.yaml     the best trial as a job file: `orchestrator train 'hydra.searchpath=[file://DIR]' job=best`
    report.html       eval loss per trial against steps, the trials' table
    tune/             Ray Tune's own experiment files (never read back)

The record is JSON, written atomically after every change, and read back as data: a search resumes
from it, not from Ray Tune's pickled experiment state (``Tuner.restore`` unpickles files from disk).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.errors import UserError
from orchestrator.fsutil import read_json_object, write_atomic
from orchestrator.rundir import STOPPED_BY_SEARCH, RunSummary

RECORD_FILE = "search.json"
BEST_JOB_DIR = "job"  # best.yaml's folder: Hydra finds job=best in a search path entry that holds it
BEST_JOB = "best"
REPORT_FILE = "report.html"
TUNE_DIR = "tune"

RUNNING = "running"
COMPLETED = "completed"
FAILED = "failed"
FINISHED = (COMPLETED, STOPPED_BY_SEARCH, FAILED)


def trial_name(index: int) -> str:
    return f"trial-{index:03d}"


@dataclass(kw_only=True)
class TrialRecord:
    """One trial: its sampled values and, once it ended, how and with what result."""

    name: str
    params: dict[str, Any]
    status: str = RUNNING
    value: float | None = None  # search.metric at the trial's last eval: what the searcher was told
    best_eval_loss: float | None = None
    steps: int | None = None
    error: str | None = None

    @property
    def finished(self) -> bool:
        return self.status in FINISHED

    def finish(self, summary: RunSummary, *, metric: str) -> None:
        """Takes the outcome from the trial's run summary."""
        self.status = summary.status if summary.status in FINISHED else FAILED
        self.value = summary.final_eval_loss if metric == "eval_loss" else summary.final_eval_accuracy
        self.best_eval_loss, self.steps, self.error = summary.best_eval_loss, summary.steps, summary.error


@dataclass(kw_only=True)
class SearchRecord:
    """``search.json``: what was searched, and every trial started; its only writer and reader."""

    job: str
    overrides: list[str]  # the job every trial trains
    space: dict[str, str]  # key -> expression, as given
    metric: str
    mode: str
    algorithm: str
    seed: int
    num_samples: int
    trials: list[TrialRecord] = field(default_factory=list)

    def same_search(self, other: SearchRecord) -> str | None:
        """What differs from ``other`` that makes it a different search (None: the same one; the number of
        samples may grow or shrink)."""
        for name in ("job", "overrides", "space", "metric", "mode", "algorithm", "seed"):
            if getattr(self, name) != getattr(other, name):
                return name
        return None

    def trial(self, name: str) -> TrialRecord:
        return next(trial for trial in self.trials if trial.name == name)

    def best(self) -> TrialRecord | None:
        """The finished trial with the best value (the lowest under mode min)."""
        scored = [(trial.value, trial) for trial in self.trials if trial.status != FAILED and trial.value is not None]
        if not scored:
            return None
        sign = 1 if self.mode == "min" else -1
        return min(scored, key=lambda scored_trial: sign * scored_trial[0])[1]

    def write(self, path: Path) -> None:
        write_atomic(path, json.dumps(asdict(self), indent=1) + "\n")

    @classmethod
    def read(cls, path: Path) -> SearchRecord:
        """The record in ``path``.

        Raises:
            UserError: the file is not a search record.
        """
        content = read_json_object(path, key=RECORD_FILE)
        try:
            trials = [TrialRecord(**trial) for trial in content.pop("trials", [])]
            return cls(**content, trials=trials)
        except TypeError as exc:
            raise UserError(f"{path}: not a search record ({exc})") from None
