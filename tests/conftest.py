"""Shared test fixtures: the installed console script, fast job overrides, a shared data cache, GPU skips."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterator

import psutil
import pytest
import torch

# Runs in tests that are not about W&B log no W&B run (the default logger=wandb would start W&B's service
# in every run); the W&B tests set WANDB_MODE themselves. Subprocesses and Ray nodes inherit it.
os.environ["WANDB_MODE"] = "disabled"

# One intra-op thread in the test processes themselves (two of them share two cores): and since GNU OpenMP
# then never starts a thread pool here, the CPU workers of a run started in-process (``cli_in_process``,
# which forks them from this process) do not inherit a pool that no longer exists and wait on it forever.
torch.set_num_threads(1)


# The longest test files, longest first (measured): under `make test`'s `--dist loadfile
# --no-loadscope-reorder` files start in this order, and the last file to start decides when the
# run ends; one of these started last would run alone.
LONGEST_FIRST = (
    "tests/ray/test_cluster.py",
    "tests/e2e/test_search.py",
    "tests/e2e/test_script_jobs.py",  # a minute of it waits for an orphaned Ray to give up: early, beside work
    "tests/e2e/test_sharding.py",
    "tests/distributed/test_strategies.py",
    "tests/e2e/test_default_job.py",
    "tests/e2e/test_lora.py",
    "tests/e2e/test_resume.py",
    "tests/e2e/test_export.py",
    "tests/configs/test_jobs.py",
    "tests/e2e/test_train.py",
    "tests/e2e/test_storage.py",
    "tests/e2e/test_untrusted_checkpoints.py",
    "tests/e2e/test_async_checkpoints.py",
    "tests/e2e/test_pretrained.py",
    "tests/e2e/test_scale.py",
    "tests/e2e/test_wandb.py",
    "tests/e2e/test_bad_input.py",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        path = item.nodeid.split("::")[0]
        return LONGEST_FIRST.index(path) if path in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: the rest keep their order
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def shared_dir(tmp_path_factory: pytest.TempPathFactory, name: str) -> Path:
    """A directory that every xdist worker of this test run shares (a session temp dir without xdist)."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        path = tmp_path_factory.getbasetemp().parent / name
        path.mkdir(exist_ok=True)
        return path
    return tmp_path_factory.mktemp(name)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One data cache for the whole session, and for every xdist worker: tokenized corpora are built once
    (two workers building the same cache at once is safe: the first to finish publishes it)."""
    return shared_dir(tmp_path_factory, "data-cache")


@pytest.fixture
def tiny_overrides(cache_dir: Path) -> list[str]:
    """A 2-worker DDP GPT job that trains in a few seconds on two CPU cores (torch elastic: no Ray start-up)."""
    from tests.helpers import tiny_job

    return tiny_job(cache_dir)


@pytest.fixture(scope="session")
def exit_by_session_end() -> Iterator[list[psutil.Process]]:
    """Processes that must exit on their own, though not at once: a test adds them, and the end of the
    session (of this xdist worker) checks that they did, so no test idles waiting for them. Ray's agents
    are such: after their node is killed with its driver, they give up on the dead GCS after a minute."""
    from tests.helpers import wait_gone

    expected: list[psutil.Process] = []
    yield expected
    left = wait_gone(expected, timeout_s=240)
    for process in expected:  # nothing outlives the session
        with contextlib.suppress(psutil.Error):
            process.kill()
    assert not left, f"still running at the end of the session (after up to 240 s more): {left}"


@pytest.fixture(scope="session")
def uninterrupted_run(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Path:
    """The run dir of the resume tests' job run start to end without interruption (launcher=local); read only."""
    from filelock import FileLock

    from tests.helpers import resume_job, run_cli

    root = shared_dir(tmp_path_factory, "uninterrupted")
    with FileLock(root / ".lock"):  # one run for all workers
        if not (root / "run" / "summary.json").exists():
            shutil.rmtree(root / "run", ignore_errors=True)
            run_cli(*resume_job(cache_dir, root / "run"), cwd=root, check=True)
    return root / "run"


@pytest.fixture(scope="session")
def uninterrupted(uninterrupted_run: Path) -> dict[int, float]:
    """step -> loss of that uninterrupted run."""
    from tests.helpers import train_losses

    return train_losses(uninterrupted_run)
