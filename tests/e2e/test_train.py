"""`orchestrator train` end to end through the installed console script: the run dir contract, the
console, sweeps, Hydra's own flags, fine-tuning, early stopping, non-finite losses."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from tests.helpers import cli_in_process, read_jsonl, run_cli, train_losses


def test_run_dir_holds_config_metrics_resources_summary_and_checkpoints(tmp_path: Path, tiny_overrides) -> None:
    run_dir = tmp_path / "run"
    result = cli_in_process("train", *tiny_overrides, f"hydra.run.dir={run_dir}", cwd=tmp_path, check=True)

    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["model"]["name"] == "gpt" and config["trainer"]["max_steps"] == 20

    metrics = read_jsonl(run_dir / "metrics.jsonl")
    steps = [m for m in metrics if "loss" in m]
    assert [m["step"] for m in steps] == list(range(1, 21))
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "step_time_s", "data_time_s", "mem_peak_bytes"):
        assert all(isinstance(m[key], (int, float)) for m in steps), key
    evals = [m for m in metrics if "eval_loss" in m]
    assert [m["step"] for m in evals] == [0, 10, 20]
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]

    resources = read_jsonl(run_dir / "resources.jsonl")
    assert {r["rank"] for r in resources} == {0, 1}
    assert all(r["rss_bytes"] > 0 and "cpu_pct" in r for r in resources)

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 20
    assert summary["world_size"] == 2 and summary["strategy"] == "ddp" and summary["restarts"] == 0
    assert summary["final_loss"] == steps[-1]["loss"]
    for key in ("tokens_per_s", "step_time_s_median", "wall_s"):
        assert summary[key] > 0

    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert checkpoints == ["latest", "step-00000010", "step-00000020"]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step-00000020"

    # Rank 0 alone writes the console: one summary table naming the run dir.
    assert result.stdout.count("status") == 1 and str(run_dir) in result.stdout
    assert "[rank1]" not in result.stdout


def test_help_lists_groups_and_jobs_and_cfg_prints_the_composed_job(tmp_path: Path) -> None:
    help_text = cli_in_process("train", "--help", cwd=tmp_path, check=True).stdout
    assert "model:" in help_text and "gpt_small" in help_text
    assert "job:" in help_text and "gpt_tiny_cpu" in help_text and "digits_cnn_cpu" in help_text
    printed = cli_in_process("train", "job=digits_cnn_cpu", "--cfg", "job", cwd=tmp_path, check=True).stdout
    composed = yaml.safe_load(printed)
    assert composed["model"]["name"] == "cnn" and composed["data"]["name"] == "digits"
    assert not (tmp_path / "outputs").exists()


def test_multirun_sweep_makes_one_run_per_point(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "sweep"
    run_cli(
        "train",
        "-m",
        "job=digits_mlp_cpu",
        "launcher=local",
        "optim.lr=1e-3,3e-3",
        "trainer.max_steps=10",
        "trainer.eval_every=5",
        f"hydra.sweep.dir={sweep_dir}",
        "logger.progress=false",
        cwd=tmp_path,
        check=True,
        timeout=300,
    )
    lrs, loggers = [], []
    for point in ("0", "1"):
        summary = json.loads((sweep_dir / point / "summary.json").read_text())
        assert summary["status"] == "completed" and summary["steps"] == 10
        config = yaml.safe_load((sweep_dir / point / "config.yaml").read_text())
        lrs.append(config["optim"]["lr"])
        loggers.append((config["logger"]["group"], config["logger"]["job_type"]))
    assert lrs == [1e-3, 3e-3]
    # One W&B group for the sweep, job_type sweep.
    assert loggers[0] == loggers[1] and loggers[0][0].startswith("digits_mlp_cpu-sweep-") and loggers[0][1] == "sweep"


def test_early_stopping_stops_when_eval_loss_stops_improving(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    cli_in_process(
        "train",
        "job=digits_mlp_cpu",
        "launcher=local",
        "trainer.max_steps=100",
        "trainer.eval_every=10",
        "trainer.early_stopping.patience=2",
        "trainer.early_stopping.min_delta=100",
        f"hydra.run.dir={run_dir}",
        "logger.progress=false",
        cwd=tmp_path,
        check=True,
    )
    summary = json.loads((run_dir / "summary.json").read_text())
    # The eval at step 0 sets the best; no later eval beats it by 100, so the second one after stops.
    assert summary["stopped_early"] is True and summary["steps"] == 20


def test_fine_tuning_starts_from_another_runs_weights_with_frozen_modules(tmp_path: Path) -> None:
    base = tmp_path / "base"
    cli_in_process(
        "train",
        "job=digits_mlp_cpu",
        "launcher=local",
        "trainer.max_steps=30",
        "trainer.eval_every=30",
        f"hydra.run.dir={base}",
        "logger.progress=false",
        cwd=tmp_path,
        check=True,
    )
    tuned = tmp_path / "tuned"
    cli_in_process(
        "train",
        "job=digits_mlp_cpu",
        "launcher=local",
        "trainer.max_steps=10",
        "trainer.eval_every=10",
        f"trainer.init_from={base}",
        "trainer.freeze=[hidden.0]",
        f"hydra.run.dir={tuned}",
        "logger.progress=false",
        cwd=tmp_path,
        check=True,
    )
    base_summary = json.loads((base / "summary.json").read_text())
    tuned_summary = json.loads((tuned / "summary.json").read_text())
    # The fine-tuned run's first eval sees exactly the base run's final weights.
    assert tuned_summary["first_eval_loss"] == pytest.approx(base_summary["final_eval_loss"], rel=1e-6)
    before = torch.load(base / "checkpoints" / "step-00000030" / "model.pt", weights_only=True)
    after = torch.load(tuned / "checkpoints" / "step-00000010" / "model.pt", weights_only=True)
    assert torch.equal(before["hidden.0.0.weight"], after["hidden.0.0.weight"])  # frozen
    assert not torch.equal(before["head.weight"], after["head.weight"])  # trained


def _npz_with_an_exploding_sample(path: Path) -> Path:
    # Sample 7 is finite (the loader rejects NaN inputs) but so large that the first layer overflows.
    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 8)).astype(np.float32)
    y = rng.integers(0, 4, size=256)
    x[7] = np.finfo(np.float32).max
    np.savez(path, x=x, y=y)
    return path


def _nan_job(tmp_path: Path, *extra: str) -> list[str]:
    data = _npz_with_an_exploding_sample(tmp_path / "exploding.npz")
    return [
        "train",
        "model=mlp",
        "data=npz",
        f"data.path={data}",
        "strategy=none",
        "launcher=local",
        "launcher.num_workers=1",
        "trainer.device=cpu",
        "trainer.max_steps=30",
        "trainer.global_batch_size=32",
        "trainer.micro_batch_size=32",
        "trainer.eval_every=0",
        "scheduler=constant",
        "logger.progress=false",
        *extra,
    ]


def test_non_finite_loss_stops_before_the_optimizer_step_naming_the_step(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = cli_in_process(*_nan_job(tmp_path, f"hydra.run.dir={run_dir}"), cwd=tmp_path)
    assert result.returncode == 1
    error = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and re.search(r"non-finite (loss|gradient norm) \((nan|inf)\) at step \d+", error[0])
    failed_step = int(error[0].split("at step ")[1].split(",")[0])
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and "non-finite" in summary["error"]
    assert max(train_losses(run_dir)) == failed_step - 1


def test_non_finite_steps_are_skipped_and_recorded_when_asked(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    cli_in_process(
        *_nan_job(tmp_path, "trainer.on_nonfinite=skip", f"hydra.run.dir={run_dir}"), cwd=tmp_path, check=True
    )
    summary = json.loads((run_dir / "summary.json").read_text())
    skipped = [m for m in read_jsonl(run_dir / "metrics.jsonl") if m.get("skipped")]
    assert summary["status"] == "completed" and summary["steps"] == 30
    # The exploding sample comes once per epoch (~7 steps); each time its step is skipped, not applied.
    assert summary["nonfinite_skips"] == len(skipped) >= 3
    assert np.isfinite(summary["final_loss"])


def _diverging_job(run_dir: Path, *extra: str) -> list[str]:
    # Adam's first update at lr=1e30 moves every weight by ~1e30: from step 2 on, no loss is finite.
    return [
        "train",
        "job=digits_mlp_cpu",
        "launcher=local",
        "optim.lr=1e30",
        "trainer.on_nonfinite=skip",
        "trainer.eval_every=0",
        "logger.progress=false",
        f"hydra.run.dir={run_dir}",
        *extra,
    ]


def test_skipping_stops_a_run_that_diverged_after_max_consecutive_skips(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = cli_in_process(*_diverging_job(run_dir, "trainer.max_steps=30"), cwd=tmp_path)
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    match = re.fullmatch(
        r"error: non-finite loss \((nan|inf)\) at step (\d+), 11 non-finite steps in a row "
        r"\(more than trainer.max_consecutive_skips=10\): the run has diverged; lower optim.lr",
        errors[0],
    )
    assert match, errors[0]
    failed_step = int(match.group(2))
    # The default allows 10 skipped steps in a row; the 11th fails the run, before its optimizer step.
    metrics = [m for m in read_jsonl(run_dir / "metrics.jsonl") if "step" in m and "loss" in m]
    assert [m["step"] for m in metrics if m.get("skipped")] == list(range(failed_step - 10, failed_step))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["steps"] == failed_step - 1 and summary["nonfinite_skips"] == 10


def test_a_run_whose_final_loss_is_not_finite_is_failed_not_completed(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = cli_in_process(
        *_diverging_job(run_dir, "trainer.max_steps=4", "trainer.max_consecutive_skips=100"), cwd=tmp_path
    )
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and re.fullmatch(
        r"error: the final training loss is not finite \((nan|inf)\) at step 4: "
        r"the run has diverged; lower optim.lr",
        errors[0],
    ), result.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["steps"] == 4 and summary["nonfinite_skips"] == 3


def test_ddp_with_one_local_worker_trains_as_one_replica(tmp_path: Path) -> None:
    # torch elastic with one worker sets up no process group; DDP then wraps nothing (it used to fail).
    run_dir = tmp_path / "run"
    cli_in_process(
        "train",
        "job=digits_mlp_cpu",
        "strategy=ddp",
        "launcher=local",
        "launcher.num_workers=1",
        "trainer.max_steps=3",
        "trainer.eval_every=0",
        "logger.progress=false",
        f"hydra.run.dir={run_dir}",
        cwd=tmp_path,
        check=True,
    )
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 3
