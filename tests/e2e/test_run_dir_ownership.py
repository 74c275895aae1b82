"""A run dir has one owner: a second run into a held dir fails at once naming the holder, a dead
holder's lock is recognized, default names never collide, and nothing another run wrote is deleted."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from orchestrator.checkpoints import manifest
from orchestrator.launch.ownership import own_run_dir
from orchestrator.rundir import LOCK_FILE
from tests.helpers import CLI, read_jsonl, run_cli, train_losses
from tests.helpers import resume_job as job

SMALL = ["job=digits_mlp_cpu", "launcher=local", "trainer.max_steps=2", "trainer.eval_every=0", "logger.progress=false"]


def test_a_second_run_into_a_held_run_dir_fails_naming_the_holder(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    with own_run_dir(run_dir):  # this process holds it, as a running `orchestrator train` would
        result = run_cli("train", *SMALL, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"error: hydra.run.dir={run_dir} is in use by another run (pid {os.getpid()} on ")
    assert sorted(p.name for p in run_dir.iterdir()) == [LOCK_FILE]  # the second run wrote nothing


def test_a_dead_holder_is_recognized_and_an_earlier_runs_records_are_kept(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; "
            "from orchestrator.launch.ownership import own_run_dir\n"
            f"with own_run_dir(Path({str(run_dir)!r})):\n    print('held', flush=True); time.sleep(600)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0, "from": "an earlier run"}\n')
    held = run_cli("train", *SMALL, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert held.returncode == 2 and f"(pid {holder.pid} on " in held.stderr
    holder.send_signal(signal.SIGKILL)
    holder.wait()

    run_cli("train", *SMALL, f"hydra.run.dir={run_dir}", cwd=tmp_path, check=True)
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"
    assert [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r] == [1, 2]
    assert read_jsonl(run_dir / "replaced" / "0" / "metrics.jsonl")[0]["from"] == "an earlier run"


def test_runs_started_in_the_same_second_get_their_own_run_dirs(tmp_path: Path) -> None:
    runs = [
        subprocess.Popen([str(CLI), "train", *SMALL], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for _ in range(2)
    ]
    assert [run.wait(timeout=300) for run in runs] == [0, 0]
    run_dirs = list((tmp_path / "outputs" / "digits_mlp_cpu").iterdir())
    assert len(run_dirs) == 2
    assert all(json.loads((d / "summary.json").read_text())["status"] == "completed" for d in run_dirs)
    assert {d.name.rsplit("-", 1)[1] for d in run_dirs} == {str(run.pid) for run in runs}


def test_resuming_an_older_checkpoint_never_deletes_newer_ones_unless_asked(
    tmp_path: Path, cache_dir: Path, uninterrupted_run: Path
) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(uninterrupted_run, run_dir)
    older = run_dir / "checkpoints" / "step-00000030"
    refused = run_cli(*job(cache_dir, run_dir, f"trainer.resume={older}"), cwd=tmp_path)
    assert refused.returncode == 2
    assert refused.stderr.strip() == (
        f"error: trainer.resume={older} continues from step 30, but hydra.run.dir={run_dir} holds newer "
        f"checkpoints (newest step-00000040) that resuming would delete; use another hydra.run.dir, or "
        f"trainer.discard_newer_checkpoints=true to delete them"
    )
    assert manifest.verify(run_dir / "checkpoints" / "step-00000040").step == 40

    run_cli(
        *job(cache_dir, run_dir, f"trainer.resume={older}", "trainer.discard_newer_checkpoints=true"),
        cwd=tmp_path,
        check=True,
    )
    assert train_losses(run_dir) == train_losses(uninterrupted_run)  # steps 31-40 again, bit for bit
