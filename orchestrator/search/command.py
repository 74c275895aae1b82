"""``orchestrator search``: trials of a job over a search space, concurrently on Ray, worse ones stopped early.

    orchestrator search job=NAME search.num_samples=8 'optim.lr=tag(log,interval(1e-4,1e-2))' ...

Here the trials run on an embedded Ray (or the cluster ``launcher.address`` names); with
``cluster=NAME`` the whole search is submitted to that cluster as one Ray job. The same command again
continues the search in its dir (``search.json``): finished trials are kept, unfinished ones continue
from their checkpoints, and only the missing samples are drawn.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from orchestrator.cluster import jobs
from orchestrator.errors import UserError, first_line
from orchestrator.launch.ownership import own_run_dir
from orchestrator.launch.ray import ray_session
from orchestrator.logs import configure_logging
from orchestrator.search.plan import SearchPlan, plan_search
from orchestrator.search.record import RECORD_FILE, SearchRecord
from orchestrator.search.results import (
    format_table,
    train_best_command,
    trials_table,
    write_best_job,
    write_search_report,
)

if TYPE_CHECKING:
    from orchestrator.cluster.named import Cluster

USAGE = """usage: orchestrator search [cluster=NAME [--follow]] [job=NAME] [key=value ...] [key=SPACE ...]

SPACE: choice(a,b,...) | a,b,... | range(lo,hi[,step]) | interval(lo,hi) | tag(log,interval(lo,hi))
settings: search.num_samples, search.max_concurrent, search.metric, search.mode,
          search.algorithm=optuna|random|grid, search.scheduler=asha|median|none, search.output_dir
see docs/search.md"""


def search_command(args: list[str]) -> int:
    """Runs the search here, or with ``cluster=NAME`` submits it as one Ray job.

    Exit status 0 when a trial finished with a result (the best job file is written), 1 when none did.
    """
    if any(arg in ("-h", "--help") for arg in args):
        print(USAGE)
        return 0
    cluster = next((arg.partition("=")[2] for arg in args if arg.startswith("cluster=")), None)
    overrides = [arg for arg in args if not arg.startswith("cluster=") and arg != "--follow"]
    if cluster is not None:
        return _submit(cluster, overrides, follow="--follow" in args)
    plan = plan_search(overrides)
    record = _record(plan)
    configure_logging()
    with ray_session(plan.launcher):
        if plan.launcher.address is not None:
            import ray

            plan.fit_to(ray.cluster_resources())
        with own_run_dir(plan.search_dir, key="search.output_dir"):
            record.write(plan.search_dir / RECORD_FILE)
            print(
                f"search: {record.num_samples} trials of {record.job}, {plan.max_concurrent} at a time, "
                f"{plan.settings.algorithm.value} / {plan.settings.scheduler.value}; search dir {plan.search_dir}",
                flush=True,
            )
            from orchestrator.search.driver import run_trials  # lazy: imports Ray Tune, once the checks have passed

            run_trials(plan, record)
    return _results(plan, SearchRecord.read(plan.search_dir / RECORD_FILE))


def _record(plan: SearchPlan) -> SearchRecord:
    """The search dir's record (this search, continued), or a new one; written by the caller.

    Raises:
        UserError: the search dir holds a different search.
    """
    path = plan.search_dir / RECORD_FILE
    fresh = plan.new_record()
    if not path.exists():
        return fresh
    record = SearchRecord.read(path)
    differs = record.same_search(fresh)
    if differs is not None:
        raise UserError(
            f"search.output_dir={plan.search_dir} holds a different search (its {differs} differs); "
            f"choose another search.output_dir"
        )
    record.num_samples = fresh.num_samples
    done = sum(trial.finished for trial in record.trials)
    print(f"search: continuing {path}: {done} trial(s) finished, {len(record.trials) - done} to continue", flush=True)
    return record


def _results(plan: SearchPlan, record: SearchRecord) -> int:
    """Prints the trials' table; writes the best job file and the report."""
    print(format_table(trials_table(record)), flush=True)
    try:
        print(f"report: {write_search_report(plan.search_dir, record)}", flush=True)
    except Exception as exc:  # the trials are done and recorded: a report that cannot be drawn must not undo that
        print(f"warning: the search's report could not be written ({first_line(exc)})", file=sys.stderr, flush=True)
    best = record.best()
    if best is None:
        print("error: no trial finished with a result", file=sys.stderr, flush=True)
        return 1
    path = write_best_job(plan, best)
    print(
        f"best: {best.name} ({plan.settings.metric} {best.value:.4f}); its job: {path}\n"
        f"train it: {train_best_command(plan.search_dir)}",
        flush=True,
    )
    return 0


def _submit(name: str, overrides: list[str], *, follow: bool) -> int:
    cluster = jobs.resolve_cluster(name)
    job_id, search_dir = submit_search(cluster, overrides)
    print(f"submitted {job_id}  search dir {search_dir}", flush=True)
    return jobs.follow_or_hint(cluster, job_id, follow_it=follow)


def submit_search(cluster: Cluster, overrides: list[str]) -> tuple[str, str]:
    """The search as one Ray job on ``cluster``: its driver runs there (``launcher.address=auto``), each trial a
    Ray Train run there, the search dir on the cluster's shared storage (a relative ``search.output_dir`` is
    under it). Checked here first, all but the checks against the machine, which run there. Returns the job's
    id and the search dir.

    Raises:
        UserError: bad input, or a cluster that cannot take the job.
    """
    plan = plan_search(overrides, check_machine=False)
    storage = jobs.shared_storage(cluster, purpose="orchestrator search")
    output_dir = plan.settings.output_dir or f"search/{plan.job or 'default'}"
    search_dir = output_dir if output_dir.startswith("/") else f"{storage}/{output_dir}"
    arguments = [o for o in overrides if not o.startswith("search.output_dir=")] + [f"search.output_dir={search_dir}"]
    job_id = jobs.submit_experiment(
        cluster, "search", arguments, job=plan.job or "default", metadata={"run_dir": search_dir}
    )
    return job_id, search_dir
