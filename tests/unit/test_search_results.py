"""A search's record and what it leaves, without running trials: a continued search reruns unfinished trials
first and tells Optuna the finished ones; the report draws every trial's eval loss with the best one marked;
the best trial's job file composes back to its values."""

from __future__ import annotations

import json
from pathlib import Path

from orchestrator.config.compose import compose, to_config
from orchestrator.rundir import STOPPED_BY_SEARCH
from orchestrator.search.plan import SearchPlan, plan_search
from orchestrator.search.record import RECORD_FILE, SearchRecord, TrialRecord
from orchestrator.search.results import search_section, write_best_job


def _plan(tmp_path: Path, *extra: str) -> SearchPlan:
    return plan_search(
        [
            "job=gpt_tiny_cpu",
            "launcher.num_workers=1",
            "search.num_samples=5",
            f"search.output_dir={tmp_path / 'search'}",
            "optim.lr=tag(log,interval(1e-4,1e-2))",
            *extra,
        ],
        check_machine=False,
    )


def _record(plan: SearchPlan) -> SearchRecord:
    record = plan.new_record()
    record.trials = [
        TrialRecord(name="trial-000", params={"optim.lr": 3e-3}, status="completed", value=3.5, steps=20),
        TrialRecord(name="trial-001", params={"optim.lr": 1e-4}, status=STOPPED_BY_SEARCH, value=5.2, steps=5),
        TrialRecord(name="trial-002", params={"optim.lr": 2e-4}),  # running when the driver died
    ]
    return record


def test_a_continued_search_reruns_unfinished_trials_first_and_tells_optuna_the_finished(tmp_path: Path) -> None:
    from orchestrator.search.driver import RecordedSearch

    plan = _plan(tmp_path)
    plan.search_dir.mkdir(parents=True)
    record = _record(plan)
    search = RecordedSearch(plan, record)
    assert len(search.optuna._ot_study.trials) == 2  # the finished trials, as completed Optuna trials

    rerun, new = search.suggest("a"), search.suggest("b")
    assert rerun == {"trial": "trial-002", "params": {"optim.lr": 2e-4}}
    assert new["trial"] == "trial-003" and 1e-4 <= new["params"]["optim.lr"] <= 1e-2
    assert [t.name for t in SearchRecord.read(plan.search_dir / RECORD_FILE).trials][-1] == "trial-003"


def test_a_random_search_draws_the_same_points_on_every_start(tmp_path: Path) -> None:
    first = _plan(tmp_path, "search.algorithm=random")
    again = _plan(tmp_path, "search.algorithm=random")
    assert [first.listed_point(i) for i in range(5)] == [again.listed_point(i) for i in range(5)]
    assert len({p["optim.lr"] for p in (first.listed_point(i) for i in range(5))}) == 5


def test_a_different_search_in_the_same_dir_is_named(tmp_path: Path) -> None:
    plan = _plan(tmp_path)
    other = _plan(tmp_path, "trainer.max_steps=50")
    assert plan.new_record().same_search(other.new_record()) == "overrides"
    assert plan.new_record().same_search(_plan(tmp_path, "search.num_samples=9").new_record()) is None


def test_the_report_draws_every_trial_and_marks_the_best(tmp_path: Path) -> None:
    plan = _plan(tmp_path)
    record = _record(plan)
    record.trials[2].params = {"optim.lr": "<script>alert(1)</script>"}
    for trial, losses in zip(record.trials, ([5.5, 4.1, 3.5], [5.5, 5.2], [5.5])):
        run_dir = plan.search_dir / trial.name
        run_dir.mkdir(parents=True)
        (run_dir / "metrics.jsonl").write_text(
            "".join(json.dumps({"step": 5 * i, "eval_loss": loss}) + "\n" for i, loss in enumerate(losses))
        )
    html = search_section(plan.search_dir, record)
    assert 'data-chart="search_eval_loss"' in html
    assert 'data-series="trial-000 (best)"' in html and 'data-series="trial-001"' in html
    assert STOPPED_BY_SEARCH in html and "<script>" not in html


def test_the_best_job_file_composes_to_the_best_trials_values(tmp_path: Path) -> None:
    plan, value = _plan(tmp_path, "trainer.max_steps=40", "optim=adam"), 3e-3
    best = TrialRecord(name="trial-000", params={"optim.lr": value}, status="completed", value=3.5, steps=40)
    path = write_best_job(plan, best)
    config = to_config(compose([f"hydra.searchpath=[file://{plan.search_dir}]", f"job={path.stem}"]))
    assert config.optim.lr == value and config.optim.name.value == "adam" and config.trainer.max_steps == 40
    assert config.model.n_layer == to_config(compose(["job=gpt_tiny_cpu"])).model.n_layer
