"""A run dir has one owner: an exclusive lock on ``RUN_DIR/.lock``, held for the whole run.

The lock is ``flock``'s: the kernel drops it when its holder exits, however it exits, so a lock left by
a dead process is never mistaken for a live one, and nothing has to clean it up. The file stays (removing
it would let two processes lock two different files of the same name); it records who holds it, for the
error a second run gets.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Iterator

from orchestrator.errors import UserError
from orchestrator.rundir import RunDir


@contextlib.contextmanager
def own_run_dir(run_dir: Path, *, key: str = "hydra.run.dir") -> Iterator[None]:
    """Holds ``run_dir`` (created if need be) for the duration; ``UserError`` naming the holder when
    another process holds it. ``key`` is the setting that names the directory (a search's is search.output_dir)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(RunDir(run_dir).lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(fd)
        os.close(fd)
        raise UserError(
            f"{key}={run_dir} is in use by another run ({holder}); wait for it to end or choose another {key}"
        ) from None
    try:
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S %z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _holder(fd: int) -> str:
    try:
        record = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f"pid {record['pid']} on {record['host']}, started {record['started']}"
    except (ValueError, KeyError, TypeError):
        return "a process that is starting"
