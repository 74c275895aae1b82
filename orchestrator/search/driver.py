"""The search's Ray Tune experiment: the searcher, the scheduler and the record they keep.

Ray Tune runs the trials (``search/trial.py``), as many at once as ``search.max_concurrent``. Around
its pieces sit two of ours:

- ``RecordedSearch``, the searcher: it names each trial, takes its values from Optuna (Ray Tune's
  ``OptunaSearch``, TPE) or from a seeded list (random, grid), and writes every trial's values and
  outcome to ``search.json`` as it goes. A search started again on the same dir reads that record:
  finished trials are not run again (Optuna is told their results), unfinished ones run first with
  their own values (their run dirs continue from their checkpoints), then the remaining samples.
- ``DecidingScheduler``: Ray Tune's scheduler (ASHA, median stopping, or none) decides on each eval,
  and the decision goes to the trial's run through its channel while Ray Tune is told to go on; a
  stopped run ends at that eval with its checkpoint, and its trial then reports ``done``. Ray Tune
  never has to kill a trial that is still training.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, MedianStoppingRule, TrialScheduler
from ray.tune.search import Searcher

from orchestrator.config.schema import SearchAlgorithm, SearchScheduler
from orchestrator.launch.trial_channel import find_channel
from orchestrator.rundir import RunDir, RunSummary
from orchestrator.search.plan import SearchPlan
from orchestrator.search.record import FAILED, RECORD_FILE, TUNE_DIR, SearchRecord, TrialRecord, trial_name
from orchestrator.search.trial import PARAMS_KEY, TRIAL_KEY, SearchTrial, TrialSettings

# A trial's own actor only drives its run (the CPUs and GPUs are its Ray Train workers'); Ray Tune
# needs some request for it, so it asks for memory.
TRIAL_DRIVER_MEMORY_BYTES = 256 << 20


def run_trials(plan: SearchPlan, record: SearchRecord) -> None:
    """Runs the trials the record does not hold as finished, ``plan.max_concurrent`` at a time."""
    finished = [trial for trial in record.trials if trial.finished]
    remaining = record.num_samples - len(finished)
    if remaining <= 0:
        return
    settings = TrialSettings(
        search_dir=plan.search_dir, base=plan.base, space=plan.space, job=plan.job, metric=plan.settings.metric
    )
    trainable = tune.with_resources(
        tune.with_parameters(SearchTrial, settings=settings), {"CPU": 0, "memory": TRIAL_DRIVER_MEMORY_BYTES}
    )
    # Ray Tune's console tables off (its new output prints some even at verbose=0): the search prints a
    # line per trial as it starts and ends.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=RecordedSearch(plan, record),
            scheduler=DecidingScheduler(plan),
            num_samples=remaining,
            max_concurrent_trials=plan.max_concurrent,
            reuse_actors=True,
        ),
        run_config=tune.RunConfig(
            name=TUNE_DIR,
            storage_path=str(plan.search_dir),
            verbose=0,
            callbacks=[Progress(plan)],
            checkpoint_config=tune.CheckpointConfig(checkpoint_at_end=False),
        ),
    )
    tuner.fit()


class RecordedSearch(Searcher):
    """Names and samples the trials, and keeps ``search.json`` (see the module's docstring)."""

    def __init__(self, plan: SearchPlan, record: SearchRecord) -> None:
        settings = plan.settings
        super().__init__(metric=settings.metric, mode=settings.mode.value)
        self.plan, self.record = plan, record
        self.reruns = [trial for trial in record.trials if not trial.finished]
        self.trials: dict[str, TrialRecord] = {}  # Ray Tune's trial id -> ours
        self.optuna: Searcher | None = None
        if settings.algorithm is SearchAlgorithm.optuna:
            import optuna
            from optuna.samplers import TPESampler
            from ray.tune.search.optuna import OptunaSearch

            optuna.logging.set_verbosity(optuna.logging.WARNING)  # its line per study created

            # Seeded by how far the search got: a continued search draws new points, not the first ones again.
            self.optuna = OptunaSearch(
                space={d.key: d.optuna_distribution() for d in plan.space},
                metric=settings.metric,
                mode=settings.mode.value,
                sampler=TPESampler(seed=plan.seed + len(record.trials)),
            )
            for trial in record.trials:
                if trial.finished and trial.status != FAILED and trial.value is not None:
                    self.optuna.add_evaluated_point(trial.params, trial.value)
        self.asked: set[str] = set()  # the trial ids Optuna sampled

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        if self.reruns:
            trial = self.reruns.pop(0)
        else:
            index = len(self.record.trials)
            if self.optuna is not None:
                params = self.optuna.suggest(trial_id)
                self.asked.add(trial_id)
            else:
                params = self.plan.listed_point(index)
            trial = TrialRecord(name=trial_name(index), params=params)
            self.record.trials.append(trial)
            self._write()
        self.trials[trial_id] = trial
        return {TRIAL_KEY: trial.name, PARAMS_KEY: trial.params}

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        if self.optuna is not None and trial_id in self.asked:
            self.optuna.on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False) -> None:
        trial = self.trials[trial_id]
        summary_file = RunDir(self.plan.search_dir / trial.name).summary
        summary = (
            RunSummary.read(summary_file)
            if summary_file.exists()
            else RunSummary(status=FAILED, error="the trial ended before its run wrote a summary")
        )
        trial.finish(summary, metric=self.metric)
        self._write()
        if self.optuna is not None and trial_id in self.asked:
            self.optuna.on_trial_complete(trial_id, result, error)
        elif self.optuna is not None and trial.status != FAILED and trial.value is not None:
            self.optuna.add_evaluated_point(trial.params, trial.value)  # a trial rerun after a restart

    def save(self, checkpoint_path: str) -> None:
        """Nothing for Ray Tune's experiment state: the search resumes from ``search.json``, which is data."""

    def _write(self) -> None:
        self.record.write(self.plan.search_dir / RECORD_FILE)


class DecidingScheduler(FIFOScheduler):
    """Ray Tune's scheduler decides on each eval; the run hears the decision, Ray Tune hears "go on"."""

    def __init__(self, plan: SearchPlan) -> None:
        super().__init__()
        self.search_dir = plan.search_dir
        self.inner = scheduler_for(plan)

    def set_search_properties(self, metric: str | None, mode: str | None, **spec: Any) -> bool:
        return self.inner.set_search_properties(metric, mode, **spec)

    def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
        self.inner.on_trial_add(tune_controller, trial)

    def on_trial_error(self, tune_controller: Any, trial: Any) -> None:
        self.inner.on_trial_error(tune_controller, trial)

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict[str, Any]) -> str:
        decision = self.inner.on_trial_result(tune_controller, trial, result)
        channel = find_channel(self.search_dir / trial.config[TRIAL_KEY])
        if channel is not None:  # None: the trial's actor is gone, and its run with it
            channel.decide.remote(result["step"], decision != TrialScheduler.STOP)
        return TrialScheduler.CONTINUE

    def on_trial_complete(self, tune_controller: Any, trial: Any, result: dict[str, Any]) -> None:
        self.inner.on_trial_complete(tune_controller, trial, result)

    def on_trial_remove(self, tune_controller: Any, trial: Any) -> None:
        self.inner.on_trial_remove(tune_controller, trial)

    def debug_string(self) -> str:
        return self.inner.debug_string()


def scheduler_for(plan: SearchPlan) -> TrialScheduler:
    """``search.scheduler``'s Ray Tune scheduler, on the training step (the trials report at each eval)."""
    settings = plan.settings
    metric, mode = settings.metric, settings.mode.value
    if settings.scheduler is SearchScheduler.asha:
        return ASHAScheduler(
            time_attr="step",
            metric=metric,
            mode=mode,
            max_t=plan.max_steps,
            grace_period=plan.grace_steps,
            reduction_factor=settings.reduction_factor,
        )
    if settings.scheduler is SearchScheduler.median:
        return MedianStoppingRule(
            time_attr="step",
            metric=metric,
            mode=mode,
            grace_period=plan.grace_steps,
            min_samples_required=settings.reduction_factor,
        )
    return FIFOScheduler()


class Progress(tune.Callback):
    """One line per trial as it starts and as it ends (Ray Tune's own tables are off)."""

    def __init__(self, plan: SearchPlan) -> None:
        self.plan = plan

    def on_trial_start(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        params = ", ".join(
            f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}"
            for key, value in trial.config[PARAMS_KEY].items()
        )
        print(f"{trial.config[TRIAL_KEY]}: started ({params})", flush=True)

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self._ended(trial)

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self._ended(trial)

    def _ended(self, trial: Any) -> None:
        name = trial.config[TRIAL_KEY]
        summary_file = RunDir(self.plan.search_dir / name).summary
        if not summary_file.exists():
            print(f"{name}: ended without a summary", file=sys.stderr, flush=True)
            return
        summary = RunSummary.read(summary_file)
        value = summary.final_eval_loss if self.plan.settings.metric == "eval_loss" else summary.final_eval_accuracy
        outcome = f"{summary.status} at step {summary.steps}" + (
            f", {self.plan.settings.metric} {value:.4f}" if value is not None else ""
        )
        if summary.error:
            outcome += f": {summary.error}"
        print(f"{name}: {outcome}", flush=True)
