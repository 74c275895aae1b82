"""One search trial: a Ray Tune trainable whose actor drives an ordinary ``launcher=ray`` run.

The trainable's actor composes the trial's config, prepares its data and runs ``launch.run_job`` in a
thread: the run dir is ``<search dir>/<trial name>``, the Ray Train workers join the search's Ray,
and each eval of rank 0 comes through the trial's channel (``launch/trial_channel.py``). Each
``step()`` hands Ray Tune the next eval; when the run has ended (done, or stopped at an eval by the
scheduler), the last ``step()`` returns its final result with ``done``, and a failed run raises, which
Ray Tune records as an errored trial.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from omegaconf import OmegaConf
from ray import tune

from orchestrator.config.compose import compose, to_config
from orchestrator.errors import UserError, first_line
from orchestrator.launch import run_job
from orchestrator.launch.preflight import preflight
from orchestrator.launch.prepared import PreparedJob
from orchestrator.launch.trial_channel import open_channel
from orchestrator.rundir import RunDir, RunSummary
from orchestrator.search.space import Dimension, trial_overrides

# The keys of a trial's Ray Tune config: its name (its run dir's) and its sampled values.
TRIAL_KEY, PARAMS_KEY = "trial", "params"
# How often a waiting step() looks whether the run has ended.
POLL_S = 1.0


class TrialFailed(Exception):
    """The trial's run failed: its summary's error, which Ray Tune records for the trial."""


@dataclass(frozen=True)
class TrialSettings:
    """What every trial shares: where the runs go, the job they train, the space they sample."""

    search_dir: Path
    base: list[str]
    space: list[Dimension]
    job: str | None
    metric: str


def train_trial(settings: TrialSettings, run_dir: Path, params: dict[str, Any]) -> RunSummary:
    """Composes, checks and trains one trial in ``run_dir`` (continued from its checkpoints if it has any)."""
    cfg = compose(trial_overrides(settings.base, settings.space, params))
    config = to_config(cfg)
    # The search's driver checked every trial against the machine before the first one started; the
    # trial's actor prepares its data and builds its model, as ``launch.prepared.prepare`` would.
    job = PreparedJob(config, OmegaConf.to_yaml(cfg, resolve=True), settings.job, preflight(config))
    return run_job(job, run_dir=run_dir, print_summary=False)


class SearchTrial(tune.Trainable):
    """The Ray Tune trainable of every trial (``tune.with_parameters(SearchTrial, settings=...)``)."""

    def setup(self, config: dict[str, Any], settings: TrialSettings) -> None:
        self.settings = settings
        self._start(config)

    def reset_config(self, new_config: dict[str, Any]) -> bool:
        """The next trial in this actor (``reuse_actors``: torch, Hydra and the data stay loaded)."""
        ray.kill(self.channel)
        self._start(new_config)
        return True

    def _start(self, config: dict[str, Any]) -> None:
        self.run_dir = self.settings.search_dir / config[TRIAL_KEY]
        self.channel = open_channel(self.run_dir)
        self.pending: Any = None  # the channel's next report, asked for and not yet come
        self.summary: RunSummary | None = None
        self.thread = threading.Thread(target=self._train, args=(config[PARAMS_KEY],), daemon=True)
        self.thread.start()

    def _train(self, params: dict[str, Any]) -> None:
        try:
            self.summary = train_trial(self.settings, self.run_dir, params)
        except Exception as exc:  # a sampled point the schema rejects, a broken run: a failed trial, not a crash
            message = str(exc) if isinstance(exc, UserError) else first_line(exc)
            self.summary = RunSummary(status="failed", error=message, run_dir=str(self.run_dir))
            summary_file = RunDir(self.run_dir).summary
            if not summary_file.exists():
                self.run_dir.mkdir(parents=True, exist_ok=True)
                self.summary.write(summary_file)

    def step(self) -> dict[str, Any]:
        """The run's next eval; after its last, its final result (``done``)."""
        while True:
            if self.pending is None:
                self.pending = self.channel.next_report.remote()
            ready, _ = ray.wait([self.pending], timeout=POLL_S)
            if ready:
                report, self.pending = ray.get(self.pending), None
                return report
            if not self.thread.is_alive():
                break
        summary = self.summary
        assert summary is not None  # the thread sets it before it ends
        if summary.status == "failed":
            raise TrialFailed(f"{self.run_dir.name}: {summary.error}")
        final = {"eval_loss": summary.final_eval_loss, "eval_accuracy": summary.final_eval_accuracy}
        return {
            "step": summary.steps,
            **{key: value for key, value in final.items() if value is not None},
            "done": True,
        }
