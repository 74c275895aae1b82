"""Script jobs (``job.kind=script``): the user's own training script, run unchanged on every worker.

Each worker runs ``python -u SCRIPT ARGS...`` from the directory ``orchestrator`` was started in,
with torchrun's variables set (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR,
MASTER_PORT) and ORCHESTRATOR_RUN_DIR, so a script that calls ``dist.init_process_group()`` or
``Accelerator()`` finds its peers as it would under torchrun.

- ``launcher=local``: torch elastic starts the script itself, as torchrun does; the processes share
  this console.
- ``launcher=ray``: each Ray Train worker runs the script as a child process and forwards its output
  (lines of ranks other than 0 start with ``[rankN]``). Ray Train's own process group already holds
  MASTER_PORT on rank 0's node, so rank 0 picks a free port for the script's group and Ray Train
  sends it to the other workers.

A script that exits non-zero fails its worker: the launcher restarts all workers up to
``trainer.max_restarts`` times, and the script starts over (resuming is the script's own business).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Iterator, TextIO

from orchestrator.config.schema import Config
from orchestrator.errors import LaunchError
from orchestrator.fsutil import write_atomic
from orchestrator.launch.ray import run_on_ray
from orchestrator.launchers import launcher_spec
from orchestrator.launchers.spec import uses_gpu
from orchestrator.rundir import RunDir, RunSummary
from orchestrator.tracking.console import format_duration, format_summary

# Runs first in each script process, then execs the script in its place (same pid, the script's own
# sys.argv). The kernel kills the process when the thread that started it ends, even by SIGKILL: under
# launcher=local that is the driver (torch elastic's agent runs in it), under launcher=ray the Ray
# worker. Without it a SIGKILLed driver leaves its script workers running, each in its own session.
# Linux only (prctl); elsewhere the script just runs.
_DIE_WITH_PARENT = """
import ctypes, os, signal, sys
parent_pid, *argv = sys.argv[1:]
if sys.platform.startswith("linux"):
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != int(parent_pid):  # the parent died before prctl: no signal will come
        os.kill(os.getpid(), signal.SIGKILL)
os.execv(sys.executable, [sys.executable, *argv])
"""


@dataclass(frozen=True, kw_only=True)
class ScriptCommand:
    """What every worker runs: ``script`` with ``args`` from ``cwd``, ``env`` added to its environment."""

    script: str
    args: list[str]
    cwd: str
    env: dict[str, str]

    @classmethod
    def from_config(cls, config: Config, *, run_dir: Path) -> ScriptCommand:
        job = config.job
        assert job.script is not None  # the schema requires it for script jobs
        # Accelerate runs each process alone on CPUs unless told to use them (`accelerate launch` tells it).
        on_cpu = {} if uses_gpu(config) else {"ACCELERATE_USE_CPU": "true"}
        # The script's own name as the user gave it (its sys.argv[0], as under torchrun), found from cwd.
        return cls(
            script=job.script,
            args=list(job.args),
            cwd=os.getcwd(),
            env={**on_cpu, **job.env, "ORCHESTRATOR_RUN_DIR": str(run_dir.resolve())},
        )

    @property
    def argv(self) -> list[str]:
        """``python -u SCRIPT ARGS...`` with the interpreter of the process that asks (on a cluster, a
        Ray worker's Python need not be where the driver's is), started through ``_DIE_WITH_PARENT``:
        the script dies with the process that asks, which must start it from a thread that outlives it."""
        return [sys.executable, "-S", "-c", _DIE_WITH_PARENT, str(os.getpid()), "-u", self.script, *self.args]


def run_script_job(
    config: Config, *, run_dir: Path, resolved_yaml: str, job_name: str | None, print_summary: bool = True
) -> RunSummary:
    """Runs ``config.job.script`` on the job's workers; writes ``config.yaml`` and ``summary.json``.

    Args:
        config: the validated script job (the CLI has checked that the script exists).
        run_dir: the run directory, ORCHESTRATOR_RUN_DIR for the script.
        resolved_yaml: the resolved config, saved as ``config.yaml``.
        job_name: the ``job=`` choice, if any.
        print_summary: print the summary table (or the error) at the end.
    """
    files = RunDir(run_dir)
    started = time.perf_counter()
    run_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(files.config, resolved_yaml)
    command = ScriptCommand.from_config(config, run_dir=run_dir)
    try:
        launcher_spec(config.launcher.name).run_script(config, run_dir, command)
        status, error = "completed", None
    except LaunchError as exc:
        status, error = "failed", str(exc)
    summary = RunSummary(
        status=status,
        error=error,
        kind="script",
        script=command.script,
        args=list(command.args),
        job=job_name,
        launcher=config.launcher.name,
        world_size=config.launcher.num_workers,
        wall_s=time.perf_counter() - started,
        run_dir=str(run_dir),
    )
    summary.write(files.summary)
    if print_summary:
        _print_summary(summary)
    return summary


def _print_summary(summary: RunSummary) -> None:
    if not summary.completed:
        print(f"error: {summary.error}", file=sys.stderr)
        print(f"run dir: {summary.run_dir}", file=sys.stderr)
        return
    rows = [
        ("status", summary.status),
        ("script", " ".join([summary.script or "", *(summary.args or [])])),
        ("workers", f"{summary.world_size} (launcher={summary.launcher})"),
        ("wall time", format_duration(summary.wall_s or 0.0)),
        ("run dir", summary.run_dir),
    ]
    print(format_summary(rows), flush=True)


# ------------------------------------------------------------------------------------ launcher=local


def run_local(config: Config, run_dir: Path, command: ScriptCommand) -> None:
    """``launcher=local``'s script runner: the script on N processes through torch elastic."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import elastic_launch

    from orchestrator.launch.local import first_failure, launch_config  # lazy: imports torch

    # Threads as the training workers get them (trainer.threads_per_worker, 0 = cores / workers) unless
    # OMP_NUM_THREADS is set: N processes must not oversubscribe the cores.
    threads = config.trainer.threads_per_worker or max(1, (os.cpu_count() or 1) // config.launcher.num_workers)
    env = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(threads)), **command.env}
    executable, *args = command.argv
    # torch elastic gives a binary's processes the agent's own environment plus the torchrun variables.
    with _environment(env):
        try:
            elastic_launch(launch_config(config), executable)(*args)
        except ChildFailedError as exc:
            raise LaunchError(first_failure(exc, config.trainer.max_restarts)) from None


@contextlib.contextmanager
def _environment(extra: dict[str, str]) -> Iterator[None]:
    """``extra`` in this process's environment for the block (a sweep runs several jobs in one process)."""
    saved = {key: os.environ.get(key) for key in extra}
    os.environ.update(extra)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# -------------------------------------------------------------------------------------- launcher=ray


def run_ray(config: Config, run_dir: Path, command: ScriptCommand) -> None:
    """``launcher=ray``'s script runner: the script as a child of each Ray Train worker."""
    run_on_ray(config, run_dir, worker=_ray_worker, loop_config={"command": command})


def _ray_worker(loop_config: dict[str, Any]) -> None:
    """Runs in every Ray Train worker: the script as a child process, with the torchrun variables."""
    import ray.train

    command: ScriptCommand = loop_config["command"]
    context = ray.train.get_context()
    rank = context.get_world_rank()
    if not os.path.isdir(command.cwd):
        raise RuntimeError(
            f"{command.cwd}, the directory orchestrator was started in, does not exist on this "
            f"node: a script job needs it, and the script, on every node (a shared file system)"
        )
    # MASTER_ADDR is Ray Train's: rank 0's node.
    env = {
        **os.environ,
        **command.env,
        "RANK": str(rank),
        "WORLD_SIZE": str(context.get_world_size()),
        "LOCAL_RANK": str(context.get_local_rank()),
        "LOCAL_WORLD_SIZE": str(context.get_local_world_size()),
        "MASTER_PORT": str(_script_master_port(rank)),
    }
    exit_code = _run_forwarding_output(
        command.argv, cwd=command.cwd, env=env, prefix="" if rank == 0 else f"[rank{rank}] "
    )
    if exit_code != 0:
        raise ScriptExitError(f"{command.script} ended with {_describe_exit(exit_code)}")


class ScriptExitError(RuntimeError):
    """The script exited non-zero: its worker fails, and Ray Train restarts the group or gives up."""


def _describe_exit(exit_code: int) -> str:
    """``exit code 3``, or ``signal SIGKILL`` for a process a signal ended."""
    if exit_code < 0:
        with contextlib.suppress(ValueError):
            return f"signal {signal.Signals(-exit_code).name}"
        return f"signal {-exit_code}"
    return f"exit code {exit_code}"


def _script_master_port(rank: int) -> int:
    """A free port on rank 0's node for the script's process group, the same on every rank."""
    # Through Ray (actor calls), not a torch collective: on GPUs one would build an NCCL communicator,
    # and take GPU memory, in this process, beside the script's own.
    from ray.train.collective import broadcast_from_rank_zero

    port = broadcast_from_rank_zero(_free_port() if rank == 0 else None)
    assert isinstance(port, int)
    return port


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("", 0))
        return probe.getsockname()[1]


def _run_forwarding_output(argv: list[str], *, cwd: str, env: dict[str, str], prefix: str) -> int:
    """Runs ``argv`` to its end, copying its stdout and stderr to this process's, each line prefixed."""
    process = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert process.stdout is not None and process.stderr is not None
    pumps = [
        threading.Thread(target=_copy_lines, args=(source, sink, prefix), daemon=True)
        for source, sink in ((process.stdout, sys.stdout), (process.stderr, sys.stderr))
    ]
    for pump in pumps:
        pump.start()
    try:
        exit_code = process.wait()
    finally:
        if process.poll() is None:  # this worker is being torn down: the script goes with it
            process.kill()
            process.wait()
    for pump in pumps:
        # A process the script left behind may hold the pipes open: do not wait for it.
        pump.join(timeout=5)
    return exit_code


def _copy_lines(source: IO[bytes], sink: TextIO, prefix: str) -> None:
    for line in iter(source.readline, b""):
        sink.write(prefix + line.decode(errors="replace"))
        sink.flush()
