"""logger=wandb: the offline W&B run of a 2-worker run, read back with W&B's own reader (`wandb leet
inspect --json`), holds what metrics.jsonl and resources.jsonl hold; a W&B key never lands anywhere;
an unreachable W&B does not stop training; a resumed run continues its W&B run."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.helpers import CLI, read_jsonl, run_cli, tiny_job, train_losses

SENTINEL = "sentinel-key-4f1d2c3b5a6e7f8091a2b3c4d5e6f708192a3b4c"
OFFLINE = {"WANDB_MODE": "offline", "WANDB_API_KEY": SENTINEL}


def _records(run_dir: Path) -> list[list[dict]]:
    """Each offline W&B run under the run dir, oldest first, as W&B's own reader prints its records."""
    runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert runs, f"no offline W&B run under {run_dir / 'wandb'}"
    wandb = CLI.with_name("wandb")
    return [
        [
            json.loads(line)
            for line in subprocess.run(
                [str(wandb), "leet", "inspect", "--json", str(run)],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.splitlines()
        ]
        for run in runs
    ]


def _history(records: list[dict]) -> dict[int, dict[str, float]]:
    """step -> the values W&B logged at that step."""
    rows: dict[int, dict[str, float]] = {}
    for record in records:
        if record["type"] == "history":
            items = record["history"]["item"]
            rows.setdefault(int(items["_step"]), {}).update(items)
    return rows


@pytest.fixture(scope="module")
def offline_run(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> tuple[Path, subprocess.CompletedProcess]:
    """A 2-worker run with W&B offline and a (sentinel) W&B key in its environment, steps 3-4 profiled."""
    root = tmp_path_factory.mktemp("wandb")
    result = run_cli(
        "train",
        *tiny_job(cache_dir),
        "logger.resources_every=5",
        "trainer.profile.start_step=2",
        "trainer.profile.steps=2",
        f"hydra.run.dir={root / 'run'}",
        cwd=root,
        env=OFFLINE,
        check=True,
    )
    return root / "run", result


def test_the_offline_wandb_run_holds_the_same_losses_and_every_ranks_resources(offline_run) -> None:
    run_dir, result = offline_run
    [records] = _records(run_dir)
    history = _history(records)
    logged = {step: row["train/loss"] for step, row in history.items() if "train/loss" in row}
    assert logged == train_losses(run_dir)  # every step, bit for bit
    evals = {r["step"]: r["eval_loss"] for r in read_jsonl(run_dir / "metrics.jsonl") if "eval_loss" in r}
    assert {step: row["eval/loss"] for step, row in history.items() if "eval/loss" in row} == evals
    for key in (
        "train/lr",
        "train/grad_norm",
        "perf/tokens_per_s",
        "perf/tokens_per_s_per_worker",
        "perf/samples_per_s",
        "perf/step_time_s",
        "perf/data_time_s",
        "memory/peak_bytes",
    ):
        assert all(key in row for step, row in history.items() if step in logged), key
    # Every rank's resource use, at the steps resources.jsonl has it.
    resources = read_jsonl(run_dir / "resources.jsonl")
    for rank in (0, 1):
        ours = {r["step"]: r["rss_bytes"] for r in resources if r["rank"] == rank}
        assert len(ours) >= 4
        assert {step: history[step][f"resources/rank{rank}/rss_bytes"] for step in ours} == ours
        assert all(f"resources/rank{rank}/cpu_pct" in history[step] for step in ours)
    # The run config: the resolved job, and what it ran on.
    config = next(r["run"]["config"]["update"] for r in records if r["type"] == "run")
    assert config["trainer"]["max_steps"] == 20 and config["strategy"]["name"] == "ddp"
    assert config["run"]["world_size"] == 2 and config["run"]["launcher"] == "local"
    assert len(config["run"]["git_commit"]) == 40 and config["run"]["hardware"]["device"] == "cpu"
    run = next(r["run"] for r in records if r["type"] == "run")
    assert run["project"] == "orchestrator" and run["job_type"] == "train"
    # The console says where the W&B run is.
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["wandb"].startswith(f"wandb sync {run_dir / 'wandb' / 'offline-run-'}")
    assert f"W&B                 {summary['wandb']}" in result.stdout


def test_every_ranks_profiler_trace_is_in_the_wandb_runs_files(offline_run) -> None:
    run_dir, _ = offline_run
    [files] = [run / "files" for run in (run_dir / "wandb").glob("offline-run-*")]
    for rank in (0, 1):
        saved = files / "pytorch_traces" / f"rank{rank}.pt.trace.json"  # where W&B's profiler integration looks
        assert json.loads(saved.read_text()) == json.loads((run_dir / "profile" / f"rank{rank}.json").read_text())


def test_a_wandb_key_is_written_nowhere(offline_run) -> None:
    run_dir, result = offline_run
    assert SENTINEL not in result.stdout + result.stderr
    for path in run_dir.rglob("*"):
        if path.is_file():
            assert SENTINEL.encode() not in path.read_bytes(), path


@pytest.mark.parametrize(
    "env",
    [
        {"WANDB_MODE": "online", "WANDB_BASE_URL": "http://127.0.0.1:9", "WANDB_API_KEY": SENTINEL},  # unreachable
        {"WANDB_MODE": "sometimes", "WANDB_API_KEY": SENTINEL},  # misconfigured
    ],
    ids=["unreachable", "misconfigured"],
)
def test_a_failing_wandb_warns_once_and_training_goes_on(
    tmp_path: Path, tiny_overrides: list[str], env: dict[str, str]
) -> None:
    run_dir = tmp_path / "run"
    result = run_cli(
        "train",
        *tiny_overrides,
        "trainer.max_steps=4",
        "trainer.eval_every=2",
        "scheduler.warmup_steps=0",
        "logger.wandb.init_timeout_s=3",
        f"hydra.run.dir={run_dir}",
        cwd=tmp_path,
        check=True,
        env=env,
    )
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: W&B:")]
    assert len(warnings) == 1 and "going on without it" in warnings[0]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and "wandb" not in summary
    assert sorted(train_losses(run_dir)) == [1, 2, 3, 4]
    assert SENTINEL not in result.stdout + result.stderr


def test_a_resumed_run_continues_its_wandb_run(tmp_path: Path, tiny_overrides: list[str]) -> None:
    run_dir = tmp_path / "run"
    args = ["train", *tiny_overrides, "trainer.eval_every=0", "scheduler.warmup_steps=0", f"hydra.run.dir={run_dir}"]
    run_cli(*args, "trainer.max_steps=10", cwd=tmp_path, env=OFFLINE, check=True)
    run_cli(*args, "trainer.max_steps=16", cwd=tmp_path, env=OFFLINE, check=True)  # resumes from step 10
    first, second = _records(run_dir)
    ids = [next(r["run"]["run_id"] for r in records if r["type"] == "run") for records in (first, second)]
    assert ids[0] == ids[1]
    assert sorted(s for s, row in _history(first).items() if "train/loss" in row) == list(range(1, 11))
    assert sorted(s for s, row in _history(second).items() if "train/loss" in row) == list(range(11, 17))
