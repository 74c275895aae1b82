"""``orchestrator search`` on the embedded Ray, through the console script: 4 trials, 2 at a time, ASHA stops
the worse early with their checkpoints intact and their run dirs saying so; the best trial's job file
composes to the config that trial trained; a driver killed mid-search and started again continues
without redoing finished trials."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import yaml

from orchestrator.checkpoints import manifest
from orchestrator.rundir import STOPPED_BY_SEARCH
from tests.helpers import CLI, committed_step, read_jsonl, run_cli

MAX_STEPS = 20
# Four learning rates, best first: every later trial is worse than the first at step 5, where ASHA's
# first rung is. The first two start together; the last two reach the rung after both have reported and
# are worse than both, so ASHA stops at least those two there, whichever of the first two reports first.
LRS = "3e-3,1e-3,3e-4,1e-4"


def tiny_search(cache_dir: Path, search_dir: Path, *extra: str) -> list[str]:
    """One Ray Train worker per trial, a few seconds of training: two trials fill this machine's two cores."""
    return [
        "search",
        "job=gpt_tiny_cpu",
        f"data.cache_dir={cache_dir}",
        "data.max_bytes=400000",
        "data.seq_len=32",
        f"trainer.max_steps={MAX_STEPS}",
        "trainer.global_batch_size=8",
        "trainer.micro_batch_size=8",
        "trainer.eval_every=5",
        "trainer.eval_batches=2",
        "trainer.checkpoint.every=5",
        "scheduler.warmup_steps=2",
        "logger=jsonl",
        "launcher.num_workers=1",
        "strategy=none",
        "search.max_concurrent=2",
        f"search.output_dir={search_dir}",
        *extra,
    ]


def record(search_dir: Path) -> dict:
    return json.loads((search_dir / "search.json").read_text())


def most_at_once(search_dir: Path, names: list[str]) -> int:
    """The most trials whose logged records (first to last) overlap: how many trained at once."""
    spans = []
    for name in names:
        times = [r["time"] for r in read_jsonl(search_dir / name / "metrics.jsonl") if "time" in r]
        spans.append((min(times), max(times)))
    return max(sum(start <= t <= end for start, end in spans) for t, _ in spans)


def test_asha_stops_trials_early_two_at_a_time_and_the_best_job_is_the_best_trials_config(
    tmp_path: Path, cache_dir: Path
) -> None:
    search_dir = tmp_path / "search"
    result = run_cli(
        *tiny_search(cache_dir, search_dir, "search.algorithm=grid", f"optim.lr=choice({LRS})"),
        cwd=tmp_path,
        timeout=1500,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    trials = record(search_dir)["trials"]
    assert [t["params"]["optim.lr"] for t in trials] == [float(lr) for lr in LRS.split(",")]
    stopped = [t for t in trials if t["status"] == STOPPED_BY_SEARCH]
    assert {"trial-002", "trial-003"} <= {t["name"] for t in stopped}, [
        (t["name"], t["status"], t["steps"]) for t in trials
    ]
    assert all(t["status"] in ("completed", STOPPED_BY_SEARCH) for t in trials)
    for trial in stopped:  # it ended at an eval, cleanly: its summary says why, its last checkpoint verifies
        run_dir = search_dir / trial["name"]
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["status"] == STOPPED_BY_SEARCH and summary["steps"] == trial["steps"] < MAX_STEPS
        newest, damaged = manifest.latest_valid(run_dir / "checkpoints")
        assert newest is not None and manifest.step_of(newest) == trial["steps"] and not damaged
    assert most_at_once(search_dir, [t["name"] for t in trials]) == 2

    best = min((t for t in trials if t["value"] is not None), key=lambda t: t["value"])
    assert f"best: {best['name']}" in result.stdout
    report = (search_dir / "report.html").read_text()
    assert 'data-chart="search_eval_loss"' in report and f'data-series="{best["name"]} (best)"' in report

    # The best job file composes to exactly the config the best trial trained (its run dir's config.yaml,
    # every key): training it is that trial's run again.
    composed = run_cli(
        "train", f"hydra.searchpath=[file://{search_dir}]", "job=best", "--cfg", "job", cwd=tmp_path, check=True
    )
    trained = yaml.safe_load((search_dir / best["name"] / "config.yaml").read_text())
    assert yaml.safe_load(composed.stdout) == trained and trained["optim"]["lr"] == best["params"]["optim.lr"]


def test_a_killed_search_continues_without_redoing_finished_trials(tmp_path: Path, cache_dir: Path) -> None:
    search_dir = tmp_path / "search"
    command = tiny_search(
        cache_dir, search_dir, "search.num_samples=4", "search.scheduler=none", "optim.lr=tag(log,interval(1e-4,3e-3))"
    )
    driver = subprocess.Popen(
        [str(CLI), *command], cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        running = _kill_mid_search(driver, search_dir)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    killed_running = [name for name in running if not (search_dir / name / "summary.json").exists()]
    before = {
        t["name"]: (search_dir / t["name"] / "summary.json").read_bytes()
        for t in record(search_dir)["trials"]
        if t["status"] != "running"
    }
    assert before and killed_running

    result = run_cli(*command, cwd=tmp_path, timeout=1500)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "continuing" in result.stdout
    trials = record(search_dir)["trials"]
    assert [t["name"] for t in trials] == [f"trial-{i:03d}" for i in range(4)]
    assert all(t["status"] == "completed" for t in trials)
    for name, summary in before.items():  # finished trials were not run again
        assert (search_dir / name / "summary.json").read_bytes() == summary
    for name in killed_running:  # unfinished ones continued from their checkpoints
        summary = json.loads((search_dir / name / "summary.json").read_text())
        assert 5 <= summary["resumed_from_step"] < MAX_STEPS and summary["steps"] == MAX_STEPS, (name, summary)


def _kill_mid_search(driver: subprocess.Popen, search_dir: Path) -> list[str]:
    """SIGKILLs the driver (and everything it started) once a trial has finished and another one is training
    past a checkpoint before its last step; returns the trials that were then so."""
    while driver.poll() is None:
        time.sleep(0.1)
        if not (search_dir / "search.json").exists():
            continue
        trials = record(search_dir)["trials"]
        running = [
            t["name"]
            for t in trials
            if t["status"] == "running" and 0 < committed_step(search_dir / t["name"]) < MAX_STEPS
        ]
        if any(t["status"] == "completed" for t in trials) and running:
            os.killpg(driver.pid, signal.SIGKILL)
            return running
    raise AssertionError(f"the search ended (exit {driver.returncode}) before it could be killed mid-trial")
