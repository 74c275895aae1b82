"""The function every launcher runs in every worker process (torch elastic today, Ray Train next)."""

from __future__ import annotations

import io
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, TextIO

import torch

from orchestrator.config.schema import Config
from orchestrator.distributed import DistContext
from orchestrator.errors import TrainingError, UserError
from orchestrator.logs import configure_logging
from orchestrator.strategies import strategy_spec
from orchestrator.train.loop import Trainer


def run_worker(
    config: Config,
    run_dir: str,
    *,
    restarts: int | None = None,
    on_checkpoint: Callable[[Path, int], None] | None = None,
    on_eval: Callable[[int, dict[str, float]], bool] | None = None,
) -> dict[str, Any]:
    """Trains ``config`` as one rank of the job; returns the run summary (the same on every rank).

    Errors that a restart cannot fix (a non-finite loss, weights that do not fit) come back as a
    ``failed`` summary instead of an exception, so the launcher does not burn restarts on them; a
    crash (a killed process, an out-of-memory) raises, and the launcher restarts or fails the job.

    Args:
        config: the job.
        run_dir: the run directory, shared by all ranks.
        restarts: how many times the workers were restarted (torch elastic's count when None).
        on_checkpoint, on_eval: see ``Trainer``.
    """
    dist = DistContext.from_env(config.trainer.device)
    _setup_process(config, dist)
    dist.init_process_group()
    if restarts is None:
        restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))
    try:
        return Trainer(
            config, run_dir=Path(run_dir), dist=dist, restarts=restarts, on_checkpoint=on_checkpoint, on_eval=on_eval
        ).fit()
    except (TrainingError, UserError) as exc:
        return {"status": "failed", "error": str(exc), "restarts": restarts}
    finally:
        dist.destroy_process_group()


def _setup_process(config: Config, dist: DistContext) -> None:
    os.environ.update(strategy_spec(config.strategy.name).worker_env(on_gpu=dist.device.type == "cuda"))
    # torch.distributed warns about deprecated collectives DeepSpeed calls, once per call.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
    threads = config.trainer.threads_per_worker or max(1, (os.cpu_count() or 1) // dist.local_world_size)
    torch.set_num_threads(threads)
    if not dist.is_main:
        # Rank 0 owns the console; anything another rank prints carries its rank.
        prefix = f"[rank{dist.rank}] "
        sys.stdout = _LinePrefixer(sys.stdout, prefix)
        sys.stderr = _LinePrefixer(sys.stderr, prefix)
    configure_logging()


class _LinePrefixer(io.TextIOBase):
    """A text stream that starts every line with ``prefix``."""

    def __init__(self, stream: TextIO, prefix: str) -> None:
        self.stream = stream
        self.prefix = prefix
        self._at_line_start = True

    def write(self, text: str) -> int:
        out = []
        for piece in text.splitlines(keepends=True):
            if self._at_line_start:
                out.append(self.prefix)
            out.append(piece)
            self._at_line_start = piece.endswith("\n")
        self.stream.write("".join(out))
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        return self.stream.fileno()
