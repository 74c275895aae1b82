"""A search, planned and checked before anything starts: the job, the space, the trials, the resources.

Bad input ends here as one line naming the key: a space over an unknown key or with an empty range,
``search.num_samples`` < 1, a metric the loop does not report, a launcher other than Ray, more
concurrent trials than the cluster can ever place. Every choice and each end of every range is
composed and checked against the schema and the machine (one dimension at a time), and the data is
prepared, so a trial fails only for what training itself finds.
"""

from __future__ import annotations

import itertools
import math
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.config.checks import check_environment
from orchestrator.config.compose import compose, override_value, to_config
from orchestrator.config.hydra_compat import parse_overrides
from orchestrator.config.schema import (
    Config,
    JobKind,
    LossName,
    SampleKind,
    SearchAlgorithm,
    SearchConfig,
)
from orchestrator.errors import UserError
from orchestrator.launchers.ray import RayLauncherConfig
from orchestrator.launchers.spec import uses_gpu, visible_gpu_count
from orchestrator.search.record import SearchRecord
from orchestrator.search.space import Dimension, check_points, split_command

DEFAULT_ROOT = Path("outputs") / "search"


@dataclass(kw_only=True)
class SearchPlan:
    """The search as it will run: settings resolved, every dimension parsed."""

    settings: SearchConfig
    base: list[str]  # the overrides every trial trains with (W&B group and console settings added)
    space: list[Dimension]
    job: str | None
    search_dir: Path
    seed: int
    max_steps: int
    grace_steps: int
    num_samples: int
    trial_resources: dict[str, float]  # what one trial's Ray Train workers hold, together
    launcher: RayLauncherConfig
    max_concurrent: int = 0  # 0 until fit_to() resolves it against the cluster
    _listed: list[dict[str, Any]] = field(default_factory=list, repr=False)

    def grid(self) -> list[dict[str, Any]]:
        """Every combination of the dimensions' values (search.algorithm=grid), in order."""
        keys = [dimension.key for dimension in self.space]
        return [dict(zip(keys, values)) for values in itertools.product(*(d.grid() for d in self.space))]

    def listed_point(self, index: int) -> dict[str, Any]:
        """The ``index``-th point of a random or grid search: the same on every start of the search."""
        if not self._listed:
            if self.settings.algorithm is SearchAlgorithm.grid:
                self._listed = self.grid()
            else:
                rng = random.Random(self.seed)
                self._listed = [{d.key: d.sample(rng) for d in self.space} for _ in range(self.num_samples)]
        return self._listed[index]

    def new_record(self) -> SearchRecord:
        settings = self.settings
        return SearchRecord(
            job=self.job or "default",
            overrides=self.base,
            space={d.key: d.expression.partition("=")[2] for d in self.space},
            metric=settings.metric,
            mode=settings.mode.value,
            algorithm=settings.algorithm.value,
            seed=self.seed,
            num_samples=self.num_samples,
        )

    def fit_to(self, cluster: dict[str, float]) -> None:
        """Sets ``max_concurrent`` (0: as many trials as ``cluster`` fits at once).

        Raises:
            UserError: one trial does not fit, or search.max_concurrent trials never can.
        """
        fits = min(math.floor(cluster.get(name, 0.0) / amount + 1e-9) for name, amount in self.trial_resources.items())
        need = _format(self.trial_resources)
        if fits < 1:
            raise UserError(
                f"launcher.num_workers={self.launcher.num_workers}: one trial needs {need}; "
                f"the cluster has {_format(cluster, names=self.trial_resources)}"
            )
        wanted = self.settings.max_concurrent
        if wanted > fits:
            raise UserError(
                f"search.max_concurrent={wanted}: the cluster fits {fits} trial(s) at once (each needs "
                f"{need}; the cluster has {_format(cluster, names=self.trial_resources)}); "
                f"use search.max_concurrent<={fits}"
            )
        self.max_concurrent = wanted or fits


def plan_search(overrides: list[str], *, check_machine: bool = True) -> SearchPlan:
    """The search ``overrides`` describe, checked; ``check_machine`` False leaves out the checks against this
    machine (a search submitted to a cluster is checked again there).

    Raises:
        UserError: bad input, named in one line.
    """
    plain = [override.input_line for override in parse_overrides(overrides) if not override.is_sweep_override()]
    config = to_config(compose(plain))
    settings = config.search
    base, space = split_command(overrides, dict(settings.space))
    # The trials train the job; the search's settings stay with the search (and may change when it continues).
    base = [override for override in base if not override.lstrip("+~").startswith("search.")]
    job = override_value(base, "job")
    _check_job(config, space)
    num_samples = _num_samples(settings, space)
    # Absolute: the trials' actors start in working directories of their own.
    search_dir = Path(settings.output_dir or DEFAULT_ROOT / (job or "default")).absolute()
    base = [*base, *_trial_settings(base, group=f"search-{search_dir.name}")]
    points = check_points(base, space)
    configs = [to_config(compose(point)) for point in points]  # every choice and end, against the schema
    if check_machine:
        from orchestrator.launch.preflight import preflight  # lazy: imports torch

        for point_config in configs:
            check_environment(point_config)
            preflight(point_config)
    launcher = config.launcher
    assert isinstance(launcher, RayLauncherConfig)  # _check_job
    resources = {"CPU": launcher.num_workers * launcher.cpus_per_worker}
    if check_machine and uses_gpu(config):
        resources["GPU"] = float(launcher.num_workers)
    plan = SearchPlan(
        settings=settings,
        base=base,
        space=space,
        job=job,
        search_dir=search_dir,
        seed=config.seed,
        max_steps=config.trainer.max_steps,
        grace_steps=settings.grace_steps or config.trainer.eval_every,
        num_samples=num_samples,
        trial_resources=resources,
        launcher=launcher,
    )
    if check_machine and launcher.address is None:  # an embedded Ray, sized to this machine
        plan.fit_to({"CPU": float(os.cpu_count() or 1), "GPU": float(visible_gpu_count())})
    return plan


def _check_job(config: Config, space: list[Dimension]) -> None:
    settings = config.search
    if not space:
        raise UserError(
            "search: no search space; give a dimension (optim.lr=tag(log,interval(1e-4,1e-2))) "
            "or search.space in the job"
        )
    if config.job.kind is JobKind.script:
        raise UserError("job.kind=script: a search's trials report their evals from orchestrator's training loop")
    if not isinstance(config.launcher, RayLauncherConfig):
        raise UserError(
            f"launcher={config.launcher.name}: a search runs each trial as a Ray Train run; use launcher=ray"
        )
    if not config.trainer.eval_every:
        raise UserError(f"search.metric={settings.metric} is reported at each eval: set trainer.eval_every > 0")
    if settings.metric == "eval_accuracy":
        classifies = config.data.output_kind is not SampleKind.tokens and config.trainer.loss in (
            LossName.cross_entropy,
            LossName.bce,
        )
        if not classifies:
            raise UserError(
                f"search.metric=eval_accuracy: the loop reports it only for classifiers "
                f"(trainer.loss=cross_entropy or bce on data with classes); data={config.data.name} "
                f"with trainer.loss={config.trainer.loss.value} reports eval_loss"
            )


def _num_samples(settings: SearchConfig, space: list[Dimension]) -> int:
    if settings.algorithm is SearchAlgorithm.grid:
        size = math.prod(len(dimension.grid()) for dimension in space)
        if settings.num_samples not in (None, size):
            raise UserError(
                f"search.num_samples={settings.num_samples}: search.algorithm=grid runs each of "
                f"the grid's {size} points once; leave search.num_samples unset"
            )
        return size
    if settings.num_samples is None:
        raise UserError(
            f"search.num_samples: missing: how many trials search.algorithm="
            f"{settings.algorithm.value} runs (set search.num_samples=N)"
        )
    return settings.num_samples


def _trial_settings(base: list[str], *, group: str) -> list[str]:
    """The trials' W&B group and job type, and no per-step console lines (the search prints one line per
    trial), unless the command sets them."""
    wanted = {"logger.group": group, "logger.job_type": "search", "logger.progress": "false"}
    keys = {override.partition("=")[0].lstrip("+~") for override in base}
    return [f"{key}={value}" for key, value in wanted.items() if key not in keys]


def _format(resources: dict[str, float], *, names: dict[str, float] | None = None) -> str:
    shown = names if names is not None else resources
    return "{" + ", ".join(f"{name}: {resources.get(name, 0.0):g}" for name in shown) + "}"
