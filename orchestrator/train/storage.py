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
"""

from __future__ import annotations

import shutil
import threading
import uuid
from pathlib import Path
from typing import Any, Callable

from orchestrator.errors import UserError, first_line
from orchestrator.train import manifest

# Written by rank 0 as it trains; config.yaml and summary.json are the driver's.
WORKER_RECORDS = ("metrics.jsonl", "resources.jsonl")
DRIVER_RECORDS = ("config.yaml", "summary.json", "report.html")
CHECK_TIMEOUT_S = 20.0


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

    def put_driver_records(self, run_dir: Path) -> None:
        self._put_records(run_dir, DRIVER_RECORDS)

    # ------------------------------------------------------------------------------------ rank 0

    def put_records(self, run_dir: Path) -> None:
        self._put_records(run_dir, WORKER_RECORDS)

    def put_checkpoint(self, directory: Path, *, keep: list[str]) -> None:
        """Copies a complete checkpoint, manifest last, then deletes the storage's checkpoints not in ``keep``."""
        target = f"{self.root}/checkpoints/{directory.name}"
        self.fs.delete_dir_contents(target, missing_dir_ok=True)
        files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != manifest.MANIFEST)
        for path in [*files, directory / manifest.MANIFEST]:
            self._copy(str(path), f"{target}/{path.relative_to(directory).as_posix()}", upload=True)
        for name in self.checkpoint_names():
            if name not in keep:
                self.fs.delete_dir(f"{self.root}/checkpoints/{name}")

    def checkpoint_names(self) -> list[str]:
        """The storage's complete checkpoints (those with a manifest), newest first."""
        import pyarrow.fs as pafs

        listing = self.fs.get_file_info(pafs.FileSelector(f"{self.root}/checkpoints", allow_not_found=True,
                                                         recursive=True))
        names = {Path(info.path).parent.name for info in listing if Path(info.path).name == manifest.MANIFEST}
        stepped = [(manifest.step_of(Path(name)), name) for name in names]
        return [name for step, name in sorted((s for s in stepped if s[0] is not None), reverse=True)]

    def fetch_newer(self, run_dir: Path) -> str | None:
        """Fetches the storage's newest checkpoint, with the records, when ``run_dir`` has none as new.

        Returns:
            The fetched checkpoint's name, or None when the run dir's own are as new.
        """
        checkpoints = run_dir / "checkpoints"
        names = self.checkpoint_names()
        if not names:
            return None
        local = [manifest.step_of(d) for d in manifest.checkpoint_dirs(checkpoints)
                 if (d / manifest.MANIFEST).exists()]
        if local and max(local) >= manifest.step_of(Path(names[0])):
            return None
        tmp = checkpoints / f"{names[0]}.fetch-{uuid.uuid4().hex[:8]}.tmp"  # removed by prepare() if cut short
        self._copy(f"{self.root}/checkpoints/{names[0]}", str(tmp), upload=False)
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

    def _put_records(self, run_dir: Path, names: tuple[str, ...]) -> None:
        for name in names:
            if (run_dir / name).exists():
                self._copy(str(run_dir / name), f"{self.root}/{name}", upload=True)

    def _exists(self, path: str) -> bool:
        import pyarrow.fs as pafs

        return self.fs.get_file_info(path).type != pafs.FileType.NotFound

    def _copy(self, source: str, destination: str, *, upload: bool) -> None:
        import pyarrow.fs as pafs

        if not upload:
            Path(destination).parent.mkdir(parents=True, exist_ok=True)
        pafs.copy_files(source, destination,
                        source_filesystem=self._local if upload else self.fs,
                        destination_filesystem=self.fs if upload else self._local)


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
