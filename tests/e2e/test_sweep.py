"""Hyperparameter search through the installed console script: `-m hydra/sweeper=optuna` minimizes the
final eval loss, records a diverging trial as failed and goes on, and rejects a bad search space before
any run."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from tests.helpers import run_cli, train_in_process

# TPE with this seed samples every lr of the choice below once, the diverging one first.
SEARCH = ["-m", "hydra/sweeper=optuna", "hydra.sweeper.n_trials=3", "hydra.sweeper.sampler.seed=2"]
ONE_PROCESS = ["launcher=local", "launcher.num_workers=1", "strategy=none", "trainer.max_steps=10",
               "trainer.eval_every=5", "scheduler.warmup_steps=2", "trainer.checkpoint.every=0"]


def test_optuna_search_minimizes_eval_loss_and_records_a_diverging_trial_as_failed(
        tmp_path: Path, tiny_overrides) -> None:
    sweep_dir = tmp_path / "sweep"
    result = run_cli("train", *SEARCH, "optim.lr=choice(1e-3,1e-2,1e30)", *tiny_overrides, *ONE_PROCESS,
                     f"hydra.sweep.dir={sweep_dir}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr

    trials = {}
    for run_dir in (path for path in sweep_dir.iterdir() if path.is_dir()):
        lr = yaml.safe_load((run_dir / "config.yaml").read_text())["optim"]["lr"]
        trials[lr] = json.loads((run_dir / "summary.json").read_text())
    assert sorted(trials) == [1e-3, 1e-2, 1e30]
    # lr=1e30 turns the loss into NaN at step 2: that trial fails, the search goes on to the others.
    assert trials[1e30]["status"] == "failed" and "non-finite loss" in trials[1e30]["error"]
    eval_losses = {lr: summary["final_eval_loss"] for lr, summary in trials.items() if lr != 1e30}
    assert all(trials[lr]["status"] == "completed" for lr in eval_losses)

    best_lr = min(eval_losses, key=eval_losses.__getitem__)
    results = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    assert results["best_params"] == {"optim.lr": best_lr}
    assert results["best_value"] == eval_losses[best_lr]
    assert "Failed experiment" in result.stdout  # the sweeper's own record of the FAIL trial


def test_bad_search_space_fails_in_one_line_before_any_run(tmp_path: Path, tiny_overrides, capfd) -> None:
    sweep_dir = tmp_path / "sweep"
    bad_spaces = {
        "optim.lr=interval(a,b)": "optim.lr=interval(a,b)",
        "optim.lrr=interval(1e-4,1e-2)": "optim.lrr",
        "optim.lr=interval(1e-2,1e-4)": "not a search space",
        "optim.lr=interval(-1.0,1.0)": "optim.lr",
        "optim=choice(adamw,adamw9)": "optim=adamw9",
    }
    for space, named in bad_spaces.items():  # in this process: the CLI's own main, without its start-up
        code, stderr = train_in_process([*SEARCH, space, *tiny_overrides, *ONE_PROCESS,
                                         f"hydra.sweep.dir={sweep_dir}"], tmp_path, capfd)
        assert code == 2, (space, stderr)
        lines = stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and named in lines[0], (space, lines)
    no_eval = run_cli("train", *SEARCH, "optim.lr=interval(1e-4,1e-2)", *tiny_overrides, *ONE_PROCESS,
                      "trainer.eval_every=0", f"hydra.sweep.dir={sweep_dir}", cwd=tmp_path, timeout=120)
    assert no_eval.returncode == 2 and no_eval.stderr.count("\n") == 1 and "trainer.eval_every" in no_eval.stderr
    assert not sweep_dir.exists()
