"""``trainer.storage``: a run's twin at a URI (``s3://``, ``gs://``, ``abfs://``, ``hdfs://``, ``file://``).

A run dir on one machine's disk is lost with the machine. With ``trainer.storage`` set, rank 0 copies
each checkpoint there once it is complete, with the run's records (metrics, resources) beside it, and
the driver adds ``config.yaml`` at the start, ``summary.json`` and ``report.html`` at the end. A
worker group whose run dir has no checkpoint as new as the storage's newest (a new machine, a node
that replaced a lost one) fetches that one first, with the records, and resumes as from its own.

Object stores have no rename: a checkpoint's files go first and its manifest last, so a copy cut
short has no manifest and is never fetched; the fetched copy is verified like any other checkpoint.

Filesystems come from pyarrow (what Ray Train uses for its own storage), configured the usual way
for each store: AWS's environment variables and config files (``AWS_ENDPOINT_URL`` for MinIO and
other S3-compatible stores), Google's application default credentials, and so on.

Copies run in a child process (``Uploads``), off the training loop's path: a store that hangs must
not stall rank 0 while the other ranks wait for it at the next collective. A process, not a thread,
because a pyarrow call cannot be interrupted, and a process with one in flight cannot even exit
until the call gives up; a process can be killed. The end of a run waits ``trainer.storage_timeout_s``
for the last copies, then stops them with a warning.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import uuid
from pathlib import Path
from typing import Any, Callable

from orchestrator.checkpoints import manifest
from orchestrator.errors import UserError, first_line
from orchestrator.rundir import CHECKPOINTS_DIR, DRIVER_RECORDS, WORKER_RECORDS, RunDir

CHECK_TIMEOUT_S = 20.0

log = logging.getLogger("orchestrator.train.storage")  # not __name__: the uploader runs this file as __main__


class RunStorage:
    """The run's twin at ``uri``: a pyarrow filesystem and the path in it.

    Raises:
        UserError: ``uri`` names no filesystem pyarrow knows, or is malformed.
    """

    def __init__(self, uri: str) -> None:
        import pyarrow.fs as pafs

        self.uri = uri
        try:
            self.fs, path = pafs.FileSystem.from_uri(uri)
        except Exception as exc:  # pyarrow: ArrowInvalid for a bad URI, ArrowNotImplemented for an unknown scheme
            raise UserError(f"trainer.storage={uri}: {first_line(exc)}") from None
        self.root = path.rstrip("/")
        self._local = pafs.LocalFileSystem()

    # ------------------------------------------------------------------------------------ driver

    def check(self) -> None:
        """Writes, reads and deletes a probe file, within CHECK_TIMEOUT_S: bad credentials, a missing
        bucket or a store that does not answer fail here, in the driver, before any worker starts."""
        probe = f"{self.root}/.orchestrator-probe-{uuid.uuid4().hex[:8]}"

        def round_trip() -> None:
            self.fs.create_dir(self.root, recursive=True)
            with self.fs.open_output_stream(probe) as out:
                out.write(b"ok")
            with self.fs.open_input_stream(probe) as stream:
                assert stream.read() == b"ok"
            self.fs.delete_file(probe)

        _within(round_trip, CHECK_TIMEOUT_S, what=f"trainer.storage={self.uri}")

    # ---------------------------------------------------------------------- the uploader process

    def put_records(self, run_dir: Path, names: list[str]) -> None:
        """Copies those of the record files ``names`` that ``run_dir`` has."""
        for name in names:
            if (run_dir / name).exists():
                self._copy(str(run_dir / name), f"{self.root}/{name}", upload=True)

    def put_checkpoint(self, directory: Path, *, keep: list[str]) -> None:
        """Copies a complete checkpoint, manifest last, then deletes the storage's checkpoints not in ``keep``."""
        target = f"{self.root}/{CHECKPOINTS_DIR}/{directory.name}"
        self.fs.delete_dir_contents(target, missing_dir_ok=True)
        files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != manifest.MANIFEST)
        folders = {target} | {
            f"{target}/{p.parent.relative_to(directory).as_posix()}" for p in files if p.parent != directory
        }
        for folder in sorted(folders):
            self.fs.create_dir(folder, recursive=True)  # a local store (file://) has no implicit directories
        for path in [*files, directory / manifest.MANIFEST]:
            self._copy(str(path), f"{target}/{path.relative_to(directory).as_posix()}", upload=True)
        for name in self.checkpoint_names():
            if name not in keep:
                self.fs.delete_dir(f"{self.root}/{CHECKPOINTS_DIR}/{name}")

    def checkpoint_names(self) -> list[str]:
        """The storage's complete checkpoints (those with a manifest), newest first."""
        import pyarrow.fs as pafs

        listing = self.fs.get_file_info(
            pafs.FileSelector(f"{self.root}/{CHECKPOINTS_DIR}", allow_not_found=True, recursive=True)
        )
        names = {Path(info.path).parent.name for info in listing if Path(info.path).name == manifest.MANIFEST}
        stepped = [(manifest.step_of(Path(name)), name) for name in names]
        return [name for step, name in sorted((s for s in stepped if s[0] is not None), reverse=True)]

    def fetch_newer(self, run_dir: Path) -> str | None:
        """Fetches the storage's newest checkpoint, with the records, when ``run_dir`` has none as new.

        Returns:
            The fetched checkpoint's name, or None when the run dir's own are as new.
        """
        checkpoints = RunDir(run_dir).checkpoints
        names = self.checkpoint_names()
        if not names:
            return None
        local = [
            manifest.checkpoint_step(d)
            for d in manifest.checkpoint_dirs(checkpoints)
            if (d / manifest.MANIFEST).exists()
        ]
        if local and max(local) >= manifest.checkpoint_step(Path(names[0])):
            return None
        tmp = checkpoints / f"{names[0]}.fetch-{uuid.uuid4().hex[:8]}.tmp"  # removed by prepare() if cut short
        self._copy(f"{self.root}/{CHECKPOINTS_DIR}/{names[0]}", str(tmp), upload=False)
        final = checkpoints / names[0]
        if final.exists():  # a damaged copy of the same step
            shutil.rmtree(final)
        tmp.rename(final)
        for name in WORKER_RECORDS:
            remote = f"{self.root}/{name}"
            if not (run_dir / name).exists() and self._exists(remote):
                self._copy(remote, str(run_dir / name), upload=False)
        return names[0]

    # ------------------------------------------------------------------------------------ helpers

    def _exists(self, path: str) -> bool:
        import pyarrow.fs as pafs

        return self.fs.get_file_info(path).type != pafs.FileType.NotFound

    def _copy(self, source: str, destination: str, *, upload: bool) -> None:
        import pyarrow.fs as pafs

        if not upload:
            Path(destination).parent.mkdir(parents=True, exist_ok=True)
        pafs.copy_files(
            source,
            destination,
            source_filesystem=self._local if upload else self.fs,
            destination_filesystem=self.fs if upload else self._local,
        )


def _within(function: Callable[[], Any], timeout_s: float, *, what: str) -> None:
    """Runs ``function`` in a thread; UserError naming ``what`` if it fails or takes over ``timeout_s``."""
    outcome: list[BaseException | None] = []

    def target() -> None:
        try:
            function()
            outcome.append(None)
        except BaseException as exc:  # reported to the caller below
            outcome.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout_s)
    if not outcome:
        raise UserError(f"{what}: no answer within {timeout_s:g} s")
    if outcome[0] is not None:
        raise UserError(f"{what}: {first_line(outcome[0])}")


# ------------------------------------------------------------------------------------------ uploads


class Uploads:
    """Copies of a run dir's checkpoints and records to ``uri``, made by a child process, one at a time.

    ``submit`` returns at once. A copy submitted while another runs waits for it; a newer checkpoint
    submitted meanwhile supersedes a waiting one (the storage wants the newest). The child is started
    by the first ``submit``; its own warnings (a failed copy) go to this process's stderr.
    """

    def __init__(self, uri: str, run_dir: Path) -> None:
        self.uri, self.run_dir = uri, run_dir
        self._process: subprocess.Popen[str] | None = None

    def submit(
        self,
        checkpoint: Path | None = None,
        *,
        keep: list[str] | None = None,
        records: tuple[str, ...] = WORKER_RECORDS,
    ) -> None:
        """Queues a copy of ``checkpoint`` (then deleting the storage's checkpoints not in ``keep``) and ``records``."""
        if self._process is None:
            # The child imports orchestrator from where this process did (a Ray worker may have it on sys.path only).
            path = os.pathsep.join(
                filter(None, [str(Path(__file__).resolve().parents[2]), os.environ.get("PYTHONPATH")])
            )
            self._process = subprocess.Popen(
                [sys.executable, "-m", "orchestrator.train.storage", self.uri, str(self.run_dir)],
                stdin=subprocess.PIPE,
                text=True,
                env={**os.environ, "PYTHONPATH": path},
            )
        assert self._process.stdin is not None  # opened with stdin=PIPE
        job = {"checkpoint": str(checkpoint) if checkpoint else None, "keep": keep or [], "records": list(records)}
        try:
            self._process.stdin.write(json.dumps(job) + "\n")
            self._process.stdin.flush()
        except OSError as exc:  # the child is gone: training goes on, the run dir has everything
            log.warning(
                "trainer.storage=%s: the uploader stopped (%s); nothing more is copied", self.uri, first_line(exc)
            )

    def close(self, *, timeout_s: float) -> bool:
        """Waits up to ``timeout_s`` for the submitted copies, then kills what is left.

        Returns:
            True when every copy finished (or failed with its own warning), False when some were stopped.
        """
        if self._process is None:
            return True
        assert self._process.stdin is not None  # opened with stdin=PIPE
        with contextlib.suppress(OSError):  # a child that already died has no pipe to close
            self._process.stdin.close()  # the child finishes what it holds, then exits
        try:
            self._process.wait(timeout_s)
            return True
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
            return False


def put_driver_records(uri: str, run_dir: Path, *, timeout_s: float) -> None:
    """Copies the driver's records (``config.yaml``, ``summary.json``, ``report.html``), waiting up to ``timeout_s``.

    Raises:
        TimeoutError: the copy did not finish in time (it was stopped).
    """
    uploads = Uploads(uri, run_dir)
    uploads.submit(records=DRIVER_RECORDS)
    if not uploads.close(timeout_s=timeout_s):
        raise TimeoutError(f"not done within trainer.storage_timeout_s={timeout_s:g} s; stopped")


def _merge(waiting: dict[str, Any] | None, job: dict[str, Any]) -> dict[str, Any]:
    """Two queued copies as one: the newer checkpoint (with its ``keep``), the records of both."""
    if waiting is None:
        return job
    newer = job if job["checkpoint"] else waiting
    return {**newer, "records": sorted({*waiting["records"], *job["records"]})}


def _serve(uri: str, run_dir: Path) -> None:
    """The uploader process: copies the jobs read from stdin, merged while one runs, until stdin closes."""
    storage = RunStorage(uri)
    waiting: dict[str, Any] | None = None
    closed = False
    changed = threading.Condition()

    def read() -> None:  # a thread, so that the parent's writes never block on a copy in progress
        nonlocal waiting, closed
        for line in sys.stdin:
            with changed:
                waiting = _merge(waiting, json.loads(line))
                changed.notify()
        with changed:
            closed = True
            changed.notify()

    threading.Thread(target=read, daemon=True).start()
    while True:
        with changed:
            changed.wait_for(lambda: waiting is not None or closed)  # noqa: B023 (the shared slot, read live)
            if waiting is None:
                return
            job, waiting = waiting, None
        try:
            # Records first: a checkpoint complete in the storage then always has records reaching its step.
            storage.put_records(run_dir, job["records"])
            if job["checkpoint"]:
                storage.put_checkpoint(Path(job["checkpoint"]), keep=job["keep"])
        except Exception as exc:  # a store that is down must not stop training: the run dir has it all
            log.warning("trainer.storage=%s: copy failed (%s); the next checkpoint tries again", uri, first_line(exc))


if __name__ == "__main__":
    from orchestrator.logs import configure_logging

    configure_logging()
    _serve(sys.argv[1], Path(sys.argv[2]))
