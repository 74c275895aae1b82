"""Atomic, exact checkpoints: the protocol of DESIGN.md decision 6 around whatever the strategy writes.

Save: rank 0 makes ``step-N.tmp/``; every rank writes its share (strategy state, its RNG state) and
fsyncs; barrier; rank 0 writes the manifest, renames the directory to ``step-N/``, replaces ``latest``
and prunes to the newest ``keep``. A process killed at any point leaves either the previous checkpoints
or a new complete one: ``.tmp`` directories are never loaded and are removed on the next start.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch

from orchestrator.distributed import DistContext
from orchestrator.strategies import Strategy
from orchestrator.fsutil import fsync_path, write_atomic
from orchestrator.train import manifest

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
    """

    def __init__(self, root: Path, *, dist: DistContext, strategy: Strategy, strategy_name: str, keep: int) -> None:
        self.root = root
        self.dist = dist
        self.strategy = strategy
        self.strategy_name = strategy_name
        self.keep = keep

    def remove_partial(self) -> None:
        """Deletes ``.tmp`` leftovers of saves that were killed (rank 0, before training)."""
        if self.dist.is_main and self.root.is_dir():
            for leftover in self.root.glob("*.tmp"):
                log.warning("removing an unfinished checkpoint save: %s", leftover)
                shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
        self.dist.barrier()

    def find_resume(self, resume: str) -> Path | None:
        """The checkpoint to resume from, decided by rank 0 and the same on every rank.

        Args:
            resume: ``auto`` (the newest valid checkpoint of this run, or none), ``never``, or a path
                (a checkpoint, a ``checkpoints/`` dir or a run dir; it must hold a valid checkpoint).
        """
        chosen: Path | None = None
        if self.dist.is_main and resume != "never":
            if resume == "auto":
                chosen, skipped = manifest.latest_valid(self.root)
                for reason in skipped:
                    log.warning("skipping a damaged checkpoint: %s", reason)
            else:
                chosen = manifest.resolve_checkpoint(resume, key="trainer.resume")
        chosen = self.dist.broadcast_object(str(chosen) if chosen else None)
        return Path(chosen) if chosen else None

    def save(self, step: int, trainer_state: dict[str, Any]) -> Path:
        """Writes a complete checkpoint of ``step`` (collective: every rank calls it)."""
        final = self.root / manifest.step_dir_name(step)
        tmp = final.with_name(final.name + ".tmp")
        if self.dist.is_main:
            for stale in (tmp, final):  # a re-save of the same step replaces the old one
                if stale.exists():
                    shutil.rmtree(stale)
            (tmp / RNG_DIR).mkdir(parents=True)
        self.dist.barrier()

        self.strategy.save(tmp)
        torch.save(_rng_state(), tmp / RNG_DIR / f"rank-{self.dist.rank:05d}.pt")
        if self.dist.is_main:
            (tmp / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=1) + "\n")
        for path in manifest.data_files(tmp):
            fsync_path(path)
        self.dist.barrier()

        if self.dist.is_main:
            manifest.write_manifest(tmp, step=step, world_size=self.dist.world_size, strategy=self.strategy_name)
            fsync_path(tmp)
            tmp.rename(final)
            fsync_path(self.root)
            write_atomic(self.root / manifest.LATEST, final.name + "\n")
            for old in manifest.checkpoint_dirs(self.root)[self.keep:]:
                shutil.rmtree(old)
        self.dist.barrier()
        return final

    def restore(self, directory: Path) -> dict[str, Any]:
        """Loads model, optimizer and this rank's RNG state from ``directory``; returns the trainer state."""
        saved = json.loads((directory / manifest.MANIFEST).read_text())
        self.strategy.load(directory)
        rng_file = directory / RNG_DIR / f"rank-{self.dist.rank:05d}.pt"
        if saved["world_size"] == self.dist.world_size and rng_file.exists():
            _set_rng_state(torch.load(rng_file, weights_only=True))
        elif self.dist.is_main:
            log.warning("checkpoint was written by %d ranks, resuming on %d: random streams (dropout) restart "
                        "from the seed, so losses will not match an uninterrupted run bit for bit",
                        saved["world_size"], self.dist.world_size)
        return json.loads((directory / TRAINER_STATE).read_text())


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
