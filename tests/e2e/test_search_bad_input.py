"""A search's bad input: one line on stderr naming the key, exit status 2, before Ray or any trial starts, and no
search dir left behind (the pattern of test_bad_input.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.helpers import cli_in_process, run_cli

SPACE = "optim.lr=tag(log,interval(1e-4,1e-2))"
CASES = {
    "unknown key": (
        ["search.num_samples=4", "optim.lrr=interval(1e-4,1e-2)"],
        "optim.lrr: unknown key; allowed keys: betas, eps, lr",
    ),
    "unknown group option": (["search.num_samples=4", "optim=choice(adamw,adamw9)"], "optim=adamw9: no such option"),
    "empty range": (["search.num_samples=4", "model.n_layer=range(3,3)"], "model.n_layer=range(3,3): an empty range"),
    "reversed interval": (
        ["search.num_samples=4", "optim.lr=interval(1e-2,1e-4)"],
        "optim.lr=interval(1e-2,1e-4): an empty interval",
    ),
    "a value the schema refuses": (["search.num_samples=4", "optim.lr=interval(-1.0,1.0)"], "optim.lr must be > 0"),
    "no space": (["search.num_samples=4"], "search: no search space"),
    "no samples": (["search.num_samples=0", SPACE], "search.num_samples must be >= 1, got 0"),
    "samples unset": ([SPACE], "search.num_samples: missing"),
    "grid over an interval": (
        ["search.algorithm=grid", SPACE],
        "optim.lr=tag(log,interval(1e-4,1e-2)): search.algorithm=grid needs choice",
    ),
    "metric the loop does not report": (
        ["search.num_samples=4", "search.metric=eval_acc", SPACE],
        "search.metric=eval_acc: the training loop reports eval_loss and eval_accuracy",
    ),
    "accuracy of a language model": (
        ["search.num_samples=4", "search.metric=eval_accuracy", SPACE],
        "search.metric=eval_accuracy: the loop reports it only for classifiers",
    ),
    "no evals": (["search.num_samples=4", "trainer.eval_every=0", SPACE], "set trainer.eval_every > 0"),
    "local launcher": (["search.num_samples=4", "launcher=local", SPACE], "launcher=local: a search runs each trial"),
    "more trials at once than the cluster places": (
        ["search.num_samples=4", f"search.max_concurrent={(os.cpu_count() or 1) + 1}", SPACE],
        f"search.max_concurrent={(os.cpu_count() or 1) + 1}: the cluster fits {os.cpu_count() or 1} trial(s) at once",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_search_input_is_one_line_naming_the_key(case: str, tmp_path: Path, cache_dir: Path) -> None:
    overrides, expected = CASES[case]
    search_dir = tmp_path / "search"
    job = [
        "job=gpt_tiny_cpu",
        f"data.cache_dir={cache_dir}",
        "data.max_bytes=400000",
        "data.seq_len=32",
        "launcher.num_workers=1",
        "strategy=none",
        f"search.output_dir={search_dir}",
    ]
    result = cli_in_process("search", *job, *overrides, cwd=tmp_path)
    code, stderr = result.returncode, result.stderr

    assert code == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], stderr
    assert not search_dir.exists() and not (tmp_path / "outputs").exists()


def test_the_retired_optuna_sweeper_points_to_search(tmp_path: Path) -> None:
    result = run_cli("train", "-m", "hydra/sweeper=optuna", "optim.lr=interval(1e-4,1e-2)", cwd=tmp_path, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "error: hydra/sweeper=optuna: the Optuna sweeper is retired; search with "
        "`orchestrator search` (docs/search.md), which runs trials concurrently on Ray"
    )
    assert not (tmp_path / "multirun").exists()
