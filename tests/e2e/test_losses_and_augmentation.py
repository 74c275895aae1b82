"""Through the console script: the MSE regression job learns, a classifier reports accuracy, and augmented
training is the same on every run and resumes bit for bit after a SIGKILL."""

from __future__ import annotations

import json
from pathlib import Path

from tests.e2e.test_resume import kill_group, last_step, start, wait_for
from tests.helpers import cli_in_process, committed_step, read_jsonl, train_losses

AUGMENTED_STEPS = 40


def augmented_job(run_dir: Path, *extra: str) -> list[str]:
    """The augmentation job at tiny size: 2 DDP workers, 2 micro-steps each per step, a checkpoint every 10."""
    return [
        "train",
        "job=digits_cnn_augment_cpu",
        "launcher=local",
        "model.widths=[8]",
        f"trainer.max_steps={AUGMENTED_STEPS}",
        "trainer.global_batch_size=16",
        "trainer.micro_batch_size=4",
        "trainer.eval_every=20",
        "trainer.eval_batches=2",
        "trainer.checkpoint.every=10",
        "logger=jsonl",
        "logger.progress=false",
        f"hydra.run.dir={run_dir}",
        *extra,
    ]


def test_the_regression_job_learns_with_mse(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    cli_in_process(
        "train",
        "job=diabetes_mlp_cpu",
        "launcher=local",
        "trainer.max_steps=60",
        "trainer.eval_every=30",
        "scheduler.warmup_steps=0",
        "logger=jsonl",
        "logger.progress=false",
        f"hydra.run.dir={run_dir}",
        cwd=tmp_path,
        check=True,
    )
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 60
    # The target is standardized: predicting its mean scores about 1.
    assert summary["first_eval_loss"] > 0.9 and summary["final_eval_loss"] < 0.8
    losses = list(train_losses(run_dir).values())
    assert sum(losses[-10:]) < 0.8 * sum(losses[:10])
    assert summary["final_eval_accuracy"] is None  # float targets: no accuracy
    assert [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl") if "eval_loss" in r] == [0, 30, 60]


def test_a_classifier_reports_eval_accuracy(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = cli_in_process(
        "train",
        "job=digits_mlp_cpu",
        "launcher=local",
        "trainer.max_steps=40",
        "trainer.eval_every=40",
        "logger=jsonl",
        f"hydra.run.dir={run_dir}",
        cwd=tmp_path,
        check=True,
    )
    summary = json.loads((run_dir / "summary.json").read_text())
    assert 0.8 < summary["final_eval_accuracy"] <= 1.0
    assert f"step 40: eval accuracy {summary['final_eval_accuracy']:.2%}" in result.stdout + result.stderr


def test_augmented_training_is_deterministic_and_resumes_bit_exact(tmp_path: Path) -> None:
    uninterrupted = tmp_path / "uninterrupted"
    cli_in_process(*augmented_job(uninterrupted), cwd=tmp_path, check=True)
    expected = train_losses(uninterrupted)
    assert len(expected) == AUGMENTED_STEPS

    plain = tmp_path / "plain"
    cli_in_process(
        *augmented_job(
            plain, "data.augment.crop_padding=0", "data.augment.rotate_degrees=0", "data.augment.noise_std=0"
        ),
        cwd=tmp_path,
        check=True,
    )
    assert train_losses(plain)[1] != expected[1]  # the augmentation changes what the model sees

    run_dir = tmp_path / "run"
    process = start(augmented_job(run_dir), tmp_path)
    wait_for(process, lambda: last_step(run_dir) >= 15 and committed_step(run_dir) >= 10, what="step 15")
    kill_group(process)
    killed_at, committed = last_step(run_dir), committed_step(run_dir)
    assert 15 <= killed_at < AUGMENTED_STEPS and committed in range(10, killed_at + 1, 10)

    result = cli_in_process(*augmented_job(run_dir), cwd=tmp_path, check=True)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["resumed_from_step"] == committed and "resumed from" in result.stdout
    # Every step's loss, before the kill and after the resume, is the uninterrupted run's, bit for bit:
    # the sampler's position comes back from the checkpoint, and each sample's augmentation is a
    # function of (seed, epoch, sample id), so there is no generator state to lose.
    assert train_losses(run_dir) == expected
    assert summary["final_eval_loss"] == json.loads((uninterrupted / "summary.json").read_text())["final_eval_loss"]
