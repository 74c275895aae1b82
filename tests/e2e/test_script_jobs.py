"""Script jobs (``job.kind=script``) end to end through the console script: a user's unchanged
Accelerate script on Ray workers, a torchrun script under torch elastic, torchrun's environment,
restarts, a failing script, workers that die with a killed driver, and the bad-input cases."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import yaml

from tests.helpers import CLI, REPO, run_cli, wait_gone

# Writes what a worker sees into the run dir, one file per rank and attempt; on the first attempt
# rank 1 exits with status 3 unless FAIL_ONCE is "no", and always when it is "always".
PROBE = """
import json, os, sys
run_dir = os.environ["ORCHESTRATOR_RUN_DIR"]
rank, attempt = os.environ["RANK"], os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
names = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
         "ACCELERATE_USE_CPU", "GREETING")
seen = {"env": {name: os.environ.get(name) for name in names}, "argv": sys.argv, "cwd": os.getcwd()}
with open(os.path.join(run_dir, f"rank{rank}-attempt{attempt}.json"), "w") as f:
    json.dump(seen, f)
fail = os.environ["FAIL_ONCE"]
if rank == "1" and (fail == "always" or (fail == "yes" and attempt == "0")):
    sys.exit(3)
"""


def _records(run_dir: Path) -> dict[int, dict]:
    return {rank: json.loads((run_dir / f"rank{rank}.json").read_text()) for rank in (0, 1)}


@pytest.mark.slow
def test_an_accelerate_script_trains_on_two_ray_workers(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = run_cli(
        "train",
        "job.kind=script",
        "job.script=examples/accelerate_train.py",
        "job.args=[--epochs,1]",
        "launcher=ray",
        "launcher.num_workers=2",
        f"hydra.run.dir={run_dir}",
        cwd=REPO,
        check=True,
    )

    records = _records(run_dir)
    for rank, record in records.items():
        assert record["rank"] == rank and record["world_size"] == 2
        # Accelerate chose its multi-process CPU mode, and the all-reduce saw both processes.
        assert record["distributed_type"] == "MULTI_CPU" and record["backend"] == "gloo"
        assert record["rank_sum"] == 1.0
        assert record["steps"] == 512 // 16 // 2  # each process trained on its half of the batches
    assert records[0]["weights_checksum"] == records[1]["weights_checksum"]  # gradients were averaged

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["kind"] == "script" and summary["launcher"] == "ray"
    assert summary["world_size"] == 2 and summary["script"] == "examples/accelerate_train.py"
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["job"]["kind"] == "script"
    assert "epoch 0: loss" in result.stdout + result.stderr


def test_a_torchrun_script_trains_on_two_local_workers_from_the_current_directory(tmp_path: Path) -> None:
    shutil.copy(REPO / "examples" / "torchrun_train.py", tmp_path)
    run_dir = tmp_path / "run"
    result = run_cli(
        "train",
        "job.kind=script",
        "job.script=torchrun_train.py",
        "job.args=[--epochs,2]",
        "launcher=local",
        "launcher.num_workers=2",
        f"hydra.run.dir={run_dir}",
        cwd=tmp_path,
        check=True,
    )

    records = _records(run_dir)
    for rank, record in records.items():
        assert record["rank"] == record["local_rank"] == rank and record["world_size"] == 2
        assert record["backend"] == "gloo" and record["rank_sum"] == 1.0 and record["steps"] == 2 * 16
    assert records[0]["weights_checksum"] == records[1]["weights_checksum"]
    assert result.stdout.count("epoch 1: loss") == 1  # the script prints on rank 0 only
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["launcher"] == "local" and summary["args"] == ["--epochs", "2"]


def test_script_workers_get_torchruns_environment_and_a_failed_worker_is_restarted(tmp_path: Path) -> None:
    (tmp_path / "probe.py").write_text(PROBE)
    run_dir = tmp_path / "run"
    run_cli(
        "train",
        "job.kind=script",
        "job.script=probe.py",
        "job.args=[--lr,0.1]",
        "+job.env.GREETING=hello",
        "trainer.max_restarts=1",
        "launcher=local",
        "launcher.num_workers=2",
        f"hydra.run.dir={run_dir}",
        cwd=tmp_path,
        env={"FAIL_ONCE": "yes"},
        check=True,
    )

    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"
    seen = {rank: json.loads((run_dir / f"rank{rank}-attempt1.json").read_text()) for rank in (0, 1)}
    for rank, worker in seen.items():
        env = worker["env"]
        assert (env["RANK"], env["LOCAL_RANK"], env["WORLD_SIZE"], env["LOCAL_WORLD_SIZE"]) == (
            str(rank),
            str(rank),
            "2",
            "2",
        )
        assert env["MASTER_ADDR"] and env["MASTER_PORT"].isdigit()
        assert env["GREETING"] == "hello" and env["ACCELERATE_USE_CPU"] == "true"
        assert worker["argv"] == ["probe.py", "--lr", "0.1"] and worker["cwd"] == str(tmp_path)


def test_a_script_that_exits_non_zero_fails_the_run_naming_its_exit_code(tmp_path: Path) -> None:
    (tmp_path / "probe.py").write_text(PROBE)
    run_dir = tmp_path / "run"
    result = run_cli(
        "train",
        "job.kind=script",
        "job.script=probe.py",
        "launcher=local",
        f"hydra.run.dir={run_dir}",
        cwd=tmp_path,
        env={"FAIL_ONCE": "always"},
    )

    assert result.returncode == 1
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and "worker rank 1" in summary["error"] and "exit code 3" in summary["error"]
    assert "exit code 3" in result.stderr


SLEEPER = """
import time
print("worker up", flush=True)
time.sleep(600)
"""


def _workers_of(run_dir: Path) -> list[psutil.Process]:
    """The script's processes, found by the ORCHESTRATOR_RUN_DIR in their environment, whoever their parent is."""
    found = []
    for process in psutil.process_iter():
        try:
            if process.environ().get("ORCHESTRATOR_RUN_DIR") == str(run_dir) and "sleeper.py" in process.cmdline():
                found.append(process)
        except psutil.Error:
            continue
    return found


@pytest.mark.parametrize("launcher", ["local", pytest.param("ray", marks=pytest.mark.slow)])
def test_script_workers_die_with_a_killed_driver(
    tmp_path: Path, launcher: str, exit_by_session_end: list[psutil.Process]
) -> None:
    (tmp_path / "sleeper.py").write_text(SLEEPER)
    run_dir = (tmp_path / "run").resolve()
    driver = subprocess.Popen(
        [
            str(CLI),
            "train",
            "job.kind=script",
            "job.script=sleeper.py",
            f"launcher={launcher}",
            "launcher.num_workers=2",
            f"hydra.run.dir={run_dir}",
        ],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    processes: set[psutil.Process] = set()
    try:
        deadline = time.monotonic() + 300  # a hang guard, not a timing: the loop ends as soon as it can
        while len(_workers_of(run_dir)) < 2 and driver.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        workers = _workers_of(run_dir)
        assert len(workers) == 2, f"the script's workers did not start (driver exit {driver.poll()})"
        # Everything the driver started: torch elastic's workers, or the embedded Ray and its workers.
        processes = {*psutil.Process(driver.pid).children(recursive=True), *workers}
        driver.kill()
        driver.wait()

        # The script's processes go at once, and so does all of torch elastic. Ray's own agents give up on
        # the dead GCS only after about a minute: the end of the session checks that they are gone too.
        left = wait_gone(processes if launcher == "local" else workers, timeout_s=240)
        assert not left and not _workers_of(run_dir), left
        exit_by_session_end.extend(processes)
    except BaseException:  # nothing outlives a failed test
        driver.kill()
        for process in processes:
            with contextlib.suppress(psutil.Error):
                process.kill()
        raise


BAD_INPUT = {
    "no script": (["job.kind=script"], "job.kind=script needs job.script=PATH"),
    "missing script": (["job.kind=script", "job.script=nope.py"], "job.script=nope.py: no such file"),
    "not python": (["job.kind=script", "job.script=train.sh"], "job.script=train.sh is not a Python file (.py)"),
    "script without kind": (["job.script=train.py"], "apply to script jobs only: add job.kind=script"),
    "contract variable in env": (
        ["job.kind=script", "job.script=train.py", "+job.env.RANK=3"],
        "job.env.RANK: set by the launcher",
    ),
}


@pytest.mark.parametrize("overrides, message", BAD_INPUT.values(), ids=BAD_INPUT.keys())
def test_bad_script_input_fails_in_one_line_before_any_worker(
    tmp_path: Path, overrides: list[str], message: str
) -> None:
    (tmp_path / "train.sh").write_text("exit 0\n")
    (tmp_path / "train.py").write_text("")
    result = run_cli("train", *overrides, "launcher=ray", cwd=tmp_path, timeout=120)

    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ") and message in result.stderr
    assert not (tmp_path / "outputs").exists()
