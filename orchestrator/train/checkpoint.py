"""Atomic, exact checkpoints: one protocol around whatever the strategy writes.

Save: rank 0 makes ``step-N.tmp/``; every rank writes its share (strategy state, its RNG state),
hashing each file's bytes as it writes them (``hashing``), and fsyncs the files; rank 0 gathers the
hashes, writes the manifest, renames the directory to ``step-N/``, replaces ``latest`` and prunes to
the newest ``keep``. A process killed at any point leaves the previous checkpoints and possibly a
complete new one; ``.tmp`` directories are never loaded and are removed on the next start.
Verification on resume is shared out across ranks.

In the background (``trainer.checkpoint.async_save``), a save takes step N's state into host memory
(``Strategy.snapshot``) with its RNG and trainer state and returns; a thread per rank writes, hashes
and fsyncs the files while training goes on, and ``commit`` completes the same protocol on the main
thread, at the first step boundary where every rank's files are written. The thread performs no
collective on the training group, so the two never interleave.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable

import torch

from orchestrator.checkpoints import hashing, manifest
from orchestrator.config.schema import Resume
from orchestrator.distributed import DistContext
from orchestrator.errors import TrainingError, UserError
from orchestrator.fsutil import fsync_path, write_atomic
from orchestrator.models.recipe import shape_mismatch
from orchestrator.strategies.base import PendingWrite, Strategy

log = logging.getLogger(__name__)

TRAINER_STATE = "trainer_state.json"
RNG_DIR = "rng"
HOLD_ENV = "ORCHESTRATOR_TEST_HOLD_CHECKPOINT"  # see _hold_for_test


class Checkpointer:
    """Saves and restores training state under ``root`` (the run dir's ``checkpoints/``).

    Args:
        root: directory holding ``step-XXXXXXXX/`` checkpoints and ``latest``.
        dist: ranks.
        strategy: writes and reads model and optimizer state.
        strategy_name: recorded in the manifest.
        keep: how many of the newest checkpoints to keep (>= 2).
        model_shapes: the model's state-dict shapes, recorded in the manifest and checked on restore.
        background: a save waits only for a copy of the state in host memory; its files are written by a
            background thread and ``commit`` completes it (``trainer.checkpoint.async_save``).
    """

    def __init__(
        self,
        root: Path,
        *,
        dist: DistContext,
        strategy: Strategy,
        strategy_name: str,
        keep: int,
        model_shapes: dict[str, list[int]],
        background: bool = False,
    ) -> None:
        self.root = root
        self.dist = dist
        self.strategy = strategy
        self.strategy_name = strategy_name
        self.keep = keep
        self.model_shapes = model_shapes
        self.background = background
        self._pending: _BackgroundWrite | None = None

    # -------------------------------------------------------------------------------------- resume

    def find_resume(self, resume: Resume, *, restarted: bool) -> Path | None:
        """The checkpoint to resume from, the same on every rank.

        Args:
            resume: ``trainer.resume``: ``auto`` (this run's newest valid checkpoint, or none), ``never``,
                or a path (a checkpoint, a ``checkpoints/`` dir or a run dir, which must hold a valid checkpoint).
            restarted: the launcher restarted the workers: this run's own newest checkpoint comes
                first, and ``resume`` only applies when the run has saved none yet.
        """
        if self.dist.is_main:
            manifest.recover_replaced(self.root)
        if restarted:
            own = first_valid(self._own_checkpoints, dist=self.dist)
            if own is not None:
                return own
        if resume.never:
            return None
        if resume.path is None:
            return first_valid(self._own_checkpoints, dist=self.dist)
        path = resume.path
        found = first_valid(lambda: manifest.candidates(path, key="trainer.resume"), dist=self.dist)
        if found is None:
            raise UserError(f"trainer.resume={path}: no valid checkpoint there")
        return found

    def _own_checkpoints(self) -> list[Path]:
        return manifest.checkpoint_dirs(self.root)

    def prepare(self, *, start_step: int) -> None:
        """Removes leftovers before training resumes (or starts) at ``start_step``, on rank 0.

        ``.tmp`` directories are unfinished saves. Checkpoints past ``start_step`` belong to a timeline
        this run no longer follows (they were damaged, or the run resumed from an older checkpoint):
        left in place, a later restart would resume from them.
        """
        if self.dist.is_main and self.root.is_dir():
            for leftover in self.root.glob("*.tmp"):
                log.warning("removing an unfinished checkpoint save: %s", leftover)
                shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
            for directory in manifest.checkpoint_dirs(self.root):
                if manifest.checkpoint_step(directory) > start_step:
                    log.warning("removing %s: training continues from step %d", directory, start_step)
                    shutil.rmtree(directory)
        self.dist.barrier()

    def restore(self, directory: Path) -> dict[str, Any]:
        """Loads model, optimizer and this rank's RNG state from ``directory``; returns the trainer state."""
        saved = manifest.read_manifest(directory)
        if saved.model_shapes is not None:
            problem = shape_mismatch(self.model_shapes, saved.model_shapes)
            if problem is not None:
                raise UserError(f"checkpoint {directory} was written for another model ({problem})")
        self.strategy.load(directory)
        rng_file = directory / RNG_DIR / f"rank-{self.dist.rank:05d}.pt"
        if saved.world_size == self.dist.world_size and rng_file.exists():
            _set_rng_state(torch.load(rng_file, weights_only=True))
        elif self.dist.is_main:
            log.warning(
                "checkpoint was written by %d ranks, resuming on %d: random streams (dropout) restart "
                "from the seed, so losses will not match an uninterrupted run bit for bit",
                saved.world_size,
                self.dist.world_size,
            )
        return json.loads((directory / TRAINER_STATE).read_text())

    # ---------------------------------------------------------------------------------------- save

    def save(self, step: int, trainer_state: dict[str, Any]) -> Path | None:
        """Saves ``step`` (collective: every rank calls it); returns the checkpoint once it is complete.

        Synchronous: it is complete when this returns. In the background: this returns once the state
        is copied to host memory, and ``commit`` completes it later; None. A save still in flight must be
        committed first (at most one at a time).
        """
        assert self._pending is None, "commit the save in flight before starting another"
        final = self.root / manifest.step_dir_name(step)
        tmp = final.with_name(final.name + ".tmp")
        if self.dist.is_main:
            if tmp.exists():
                shutil.rmtree(tmp)
            (tmp / RNG_DIR).mkdir(parents=True)
        self.dist.barrier()
        # Everything of step N is taken now, while training waits: the RNG, the trainer state, the model.
        rng_state = _rng_state()
        trainer_json = (json.dumps(trainer_state, indent=1) + "\n").encode() if self.dist.is_main else None
        if not self.background:
            written = self._write(tmp, partial(self.strategy.save, tmp), rng_state=rng_state, trainer_json=trainer_json)
            return self._complete(step, tmp, self.dist.all_gather_objects((written, None)))
        write = self.strategy.snapshot(tmp)
        self._pending = _BackgroundWrite(
            step, tmp, partial(self._write, tmp, write, rng_state=rng_state, trainer_json=trainer_json)
        )
        return None

    def commit(self, *, wait: bool) -> Path | None:
        """Completes the save written in the background once every rank has written its files (collective);
        returns its checkpoint, or None if there is none in flight or (``wait`` false) it is not written yet.

        ``TrainingError`` if a rank failed to write its files: the save is abandoned (its ``.tmp``
        directory is removed on the next start) and the previous checkpoints are intact.
        """
        pending = self._pending
        if pending is None:  # the same on every rank: saves start at the same steps everywhere
            return None
        if wait:
            pending.join()
        elif not self._written_everywhere(pending):
            return None
        self._pending = None
        outcomes = self.dist.all_gather_objects((pending.entries, pending.error))
        failures = [f"rank {rank}: {error}" for rank, (_, error) in enumerate(outcomes) if error is not None]
        if failures:
            raise TrainingError(
                f"checkpoint {manifest.step_dir_name(pending.step)} could not be written in the "
                f"background ({failures[0]}); the previous checkpoints are intact"
            )
        return self._complete(pending.step, pending.tmp, outcomes)

    def _written_everywhere(self, pending: _BackgroundWrite) -> bool:
        writing = torch.tensor([0.0 if pending.done() else 1.0], device=self.dist.device)
        return float(self.dist.all_reduce_sum(writing)) == 0.0

    def _write(
        self, tmp: Path, write: PendingWrite, *, rng_state: dict[str, Any], trainer_json: bytes | None
    ) -> dict[str, dict]:
        """This rank's files of the checkpoint in ``tmp``, written, hashed and fsynced; their manifest entries."""
        written = write()
        _hold_for_test(tmp, rank=self.dist.rank)
        rng_file = tmp / RNG_DIR / f"rank-{self.dist.rank:05d}.pt"
        written[rng_file] = hashing.save_hashed(rng_state, rng_file)
        if trainer_json is not None:
            written[tmp / TRAINER_STATE] = hashing.write_hashed(tmp / TRAINER_STATE, trainer_json)
        for path in written:
            fsync_path(path)
        for directory in {path.parent for path in written}:
            fsync_path(directory)
        return {str(path.relative_to(tmp)): digest.entry() for path, digest in written.items()}

    def _complete(self, step: int, tmp: Path, outcomes: list[tuple[dict[str, dict], str | None]]) -> Path:
        """Rank 0 writes the manifest of every rank's files, renames ``tmp`` to its final name, replaces
        ``latest`` and prunes to ``keep``; every rank returns once that is done."""
        final = self.root / manifest.step_dir_name(step)
        if self.dist.is_main:
            files = {name: entry for entries, _ in outcomes for name, entry in entries.items()}
            manifest.write_manifest(
                tmp,
                files=files,
                step=step,
                world_size=self.dist.world_size,
                strategy=self.strategy_name,
                model_shapes=self.model_shapes,
            )
            _replace_dir(tmp, final)
            fsync_path(self.root)
            write_atomic(self.root / manifest.LATEST, final.name + "\n")
            older = [d for d in manifest.checkpoint_dirs(self.root) if manifest.checkpoint_step(d) < step]
            for old in older[self.keep - 1 :]:
                shutil.rmtree(old)
        self.dist.barrier()
        return final


class _BackgroundWrite:
    """One rank's files of a checkpoint, being written by a thread of their own.

    A daemon thread: a process that dies or exits mid-write leaves a ``.tmp`` directory, as a killed
    synchronous save does, and never waits for it.
    """

    def __init__(self, step: int, tmp: Path, write: Callable[[], dict[str, dict]]) -> None:
        self.step, self.tmp = step, tmp
        self.entries: dict[str, dict] = {}
        self.error: str | None = None
        self._thread = threading.Thread(target=self._run, args=(write,), name=f"checkpoint-{step}", daemon=True)
        self._thread.start()

    def _run(self, write: Callable[[], dict[str, dict]]) -> None:
        try:
            self.entries = write()
        except BaseException as exc:  # reported by commit, on every rank
            log.exception("writing checkpoint %s failed", self.tmp.name)
            self.error = f"{type(exc).__name__}: {exc}"

    def done(self) -> bool:
        return not self._thread.is_alive()

    def join(self) -> None:
        self._thread.join()


def _hold_for_test(tmp: Path, *, rank: int) -> None:
    """Test hook, for the kill drills: with ``ORCHESTRATOR_TEST_HOLD_CHECKPOINT=DIR`` and a file ``DIR/step-N``,
    each rank writing checkpoint step-N stops after its model and optimizer files, creates
    ``DIR/step-N.rank-<R>`` and waits until ``DIR/step-N`` is removed."""
    hold_dir = os.environ.get(HOLD_ENV)
    if not hold_dir:
        return
    hold = Path(hold_dir) / tmp.name.removesuffix(".tmp")
    if hold.exists():
        hold.with_name(f"{hold.name}.rank-{rank}").touch()
        while hold.exists():
            time.sleep(0.01)


def _replace_dir(new: Path, final: Path) -> None:
    """Renames ``new`` to ``final``. A re-save of the same step (a resumed run that had nothing left to do)
    moves the old copy aside first and deletes it last, so a complete copy is on disk at every moment;
    ``manifest.recover_replaced`` puts it back if the process dies between the two renames."""
    if not final.exists():
        new.rename(final)
        return
    aside = final.with_name(final.name + manifest.REPLACED_SUFFIX)
    if aside.exists():
        shutil.rmtree(aside)
    final.rename(aside)
    new.rename(final)
    fsync_path(final.parent)
    shutil.rmtree(aside)


def first_valid(list_candidates: Callable[[], list[Path]], *, dist: DistContext) -> Path | None:
    """The first of rank 0's candidate checkpoints that verifies, the same on every rank.

    Rank 0 lists the candidates and every rank gets the list or rank 0's error, so no rank is left
    waiting in a collective; then each rank hashes its share of each candidate's files.
    """
    listing: tuple[list[str], str | None] = ([], None)
    if dist.is_main:
        try:
            listing = ([str(p) for p in list_candidates()], None)
        except UserError as exc:
            listing = ([], str(exc))
    paths, error = dist.broadcast_object(listing)
    if error is not None:
        raise UserError(error)
    for directory in map(Path, paths):
        problem = None
        try:
            manifest.verify(directory, hash_share=(dist.rank, dist.world_size))
        except manifest.CheckpointError as exc:
            problem = str(exc)
        problems = [p for p in dist.all_gather_objects(problem) if p is not None]
        if not problems:
            return directory
        if dist.is_main:
            log.warning("skipping a damaged checkpoint: %s", problems[0])
    return None


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
