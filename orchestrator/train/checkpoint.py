"""Atomic, exact checkpoints: one protocol around whatever the strategy writes.

Save: rank 0 makes ``step-N.tmp/``; every rank writes its share (strategy state, its RNG state),
hashing each file's bytes as it writes them (``hashing``), and fsyncs the files; rank 0 gathers the hashes, writes the manifest, renames the
directory to ``step-N/``, replaces ``latest`` and prunes to the newest ``keep``. A process killed at
any point leaves the previous checkpoints and possibly a complete new one; ``.tmp`` directories are
never loaded and are removed on the next start. Verification on resume is shared out across ranks.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any, Callable

import torch

from orchestrator.checkpoints import hashing, manifest
from orchestrator.config.schema import Resume
from orchestrator.distributed import DistContext
from orchestrator.errors import UserError
from orchestrator.fsutil import fsync_path, write_atomic
from orchestrator.models.recipe import shape_mismatch
from orchestrator.strategies import Strategy

log = logging.getLogger(__name__)

TRAINER_STATE = "trainer_state.json"
RNG_DIR = "rng"


class Checkpointer:
    """Saves and restores training state under ``root`` (the run dir's ``checkpoints/``).

    Args:
        root: directory holding ``step-XXXXXXXX/`` checkpoints and ``latest``.
        dist: ranks.
        strategy: writes and reads model and optimizer state.
        strategy_name: recorded in the manifest.
        keep: how many of the newest checkpoints to keep (>= 2).
        model_shapes: the model's state-dict shapes, recorded in the manifest and checked on restore.
    """

    def __init__(self, root: Path, *, dist: DistContext, strategy: Strategy, strategy_name: str, keep: int,
                 model_shapes: dict[str, list[int]]) -> None:
        self.root = root
        self.dist = dist
        self.strategy = strategy
        self.strategy_name = strategy_name
        self.keep = keep
        self.model_shapes = model_shapes

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
                if manifest.step_of(directory) > start_step:
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
            log.warning("checkpoint was written by %d ranks, resuming on %d: random streams (dropout) restart "
                        "from the seed, so losses will not match an uninterrupted run bit for bit",
                        saved.world_size, self.dist.world_size)
        return json.loads((directory / TRAINER_STATE).read_text())

    # ---------------------------------------------------------------------------------------- save

    def save(self, step: int, trainer_state: dict[str, Any]) -> Path:
        """Writes a complete checkpoint of ``step`` (collective: every rank calls it)."""
        final = self.root / manifest.step_dir_name(step)
        tmp = final.with_name(final.name + ".tmp")
        if self.dist.is_main:
            if tmp.exists():
                shutil.rmtree(tmp)
            (tmp / RNG_DIR).mkdir(parents=True)
        self.dist.barrier()

        written = self.strategy.save(tmp)
        rng_file = tmp / RNG_DIR / f"rank-{self.dist.rank:05d}.pt"
        written[rng_file] = hashing.save_hashed(_rng_state(), rng_file)
        if self.dist.is_main:
            written[tmp / TRAINER_STATE] = hashing.write_hashed(
                tmp / TRAINER_STATE, (json.dumps(trainer_state, indent=1) + "\n").encode())
        for path in written:
            fsync_path(path)
        for directory in {path.parent for path in written}:
            fsync_path(directory)
        entries = {str(path.relative_to(tmp)): digest.entry() for path, digest in written.items()}
        per_rank = self.dist.gather_objects(entries)  # also: every rank has finished writing

        if self.dist.is_main:
            files = {name: entry for rank_entries in per_rank for name, entry in rank_entries.items()}
            manifest.write_manifest(tmp, files=files, step=step, world_size=self.dist.world_size,
                                    strategy=self.strategy_name, model_shapes=self.model_shapes)
            _replace_dir(tmp, final)
            fsync_path(self.root)
            write_atomic(self.root / manifest.LATEST, final.name + "\n")
            older = [d for d in manifest.checkpoint_dirs(self.root) if manifest.step_of(d) < step]
            for old in older[self.keep - 1:]:
                shutil.rmtree(old)
        self.dist.barrier()
        return final


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
