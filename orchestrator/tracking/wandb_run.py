"""Rank 0's Weights & Biases run (``logger=wandb``): the same records as the JSONL files, named by prefix.

Online when a W&B key is configured (``WANDB_API_KEY``, or ``wandb login``'s netrc entry), otherwise
offline under the run dir (``wandb sync`` uploads it later); ``logger.wandb.mode`` or ``WANDB_MODE``
overrides. W&B is a view of the run, never a condition of it: the first W&B error is printed once,
the W&B run is dropped, and training goes on with the JSONL files, which always hold everything.

Metric names: ``train/`` (loss, lr, grad_norm), ``perf/`` (tokens/s, samples/s, step and data time,
MFU), ``memory/``, ``eval/loss``, ``resources/rank{R}/`` (every rank's CPU, RSS, GPU), all against
the training step. The run id is kept in the checkpoint, so a restarted or resumed run continues
the same W&B run; steps it had already logged past the checkpoint are recomputed identically and
not sent twice (W&B needs steps that only go up).
"""

from __future__ import annotations

import netrc
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from orchestrator.errors import first_line

# metrics.jsonl key -> W&B name
_NAMES = {
    "loss": "train/loss",
    "lr": "train/lr",
    "grad_norm": "train/grad_norm",
    "epoch": "train/epoch",
    "tokens": "train/tokens",
    "skipped": "train/skipped",
    "tokens_per_s": "perf/tokens_per_s",
    "samples_per_s": "perf/samples_per_s",
    "step_time_s": "perf/step_time_s",
    "data_time_s": "perf/data_time_s",
    "mfu": "perf/mfu",
    "tokens_per_s_per_worker": "perf/tokens_per_s_per_worker",
    "mem_peak_bytes": "memory/peak_bytes",
}
_SUMMARY_KEYS = (
    "status",
    "steps",
    "final_loss",
    "first_eval_loss",
    "final_eval_loss",
    "best_eval_loss",
    "tokens_per_s",
    "step_time_s_median",
    "mfu",
    "peak_mem_bytes",
    "num_params",
    "restarts",
    "error",
    "final_eval_accuracy",
    "num_trainable_params",
)
PROJECT_DIR = Path(__file__).resolve().parents[2]
# Where W&B's PyTorch-profiler integration (wandb.profiler.torch_trace_handler) keeps traces in a run's files.
TRACES_DIR = "pytorch_traces"
TRACE_SUFFIX = ".pt.trace.json"


def wandb_name(key: str) -> str:
    return _NAMES.get(key, f"train/{key}")


def has_api_key() -> bool:
    """A W&B key is configured: ``WANDB_API_KEY``, or a netrc entry for the W&B host (``wandb login``)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def resolve_mode(mode: str) -> str:
    """online, offline or disabled: ``WANDB_MODE`` if set, else ``mode``; ``auto`` is online with a key."""
    chosen = os.environ.get("WANDB_MODE") or mode
    if chosen == "auto":
        return "online" if has_api_key() else "offline"
    return "offline" if chosen == "dryrun" else chosen


class WandbRun:
    """Args:
    run_dir: the run dir; W&B writes under ``run_dir/wandb``.
    run_id: the W&B run id (from the checkpoint on a resume).
    settings: the job's ``logger`` config (``group``, ``job_type``, ``wandb``).
    config: the W&B run config (the resolved job and what it ran on).
    name: the W&B run name.
    """

    def __init__(self, run_dir: Path, *, run_id: str, settings: Any, config: dict[str, Any], name: str) -> None:
        self.run: Any = None
        wandb_settings = settings.wandb
        self.mode = resolve_mode(wandb_settings.mode.value)
        self._next_step = 0
        if self.mode == "disabled":
            return
        try:
            import wandb

            self.run = wandb.init(
                project=wandb_settings.project,
                entity=wandb_settings.entity,
                group=settings.group,
                job_type=settings.job_type,
                tags=list(wandb_settings.tags) or None,
                name=name,
                id=run_id,
                resume="allow",
                dir=str(run_dir),
                config=config,
                mode=self.mode,  # type: ignore[arg-type]  # WANDB_MODE passes through as set: wandb refuses a bad one
                settings=wandb.Settings(
                    console="off", init_timeout=wandb_settings.init_timeout_s, silent=True, x_disable_stats=True
                ),
            )
            for prefix in ("train", "perf", "memory", "eval", "resources"):
                self.run.define_metric(f"{prefix}/*", step_metric="trainer/step")
            self._next_step = int(self.run.step or 0)  # an online resume: what W&B already has
        except Exception as exc:  # noqa: BLE001 - any W&B failure: warn, go on without it
            self._fail(exc)

    @property
    def location(self) -> str | None:
        """Where to see the run: its URL online, the ``wandb sync`` command offline."""
        if self.run is None:
            return None
        if self.mode == "online":
            return self.run.url
        return f"wandb sync {Path(self.run.dir).parent}"

    def log(self, step: int, values: dict[str, Any]) -> None:
        if self.run is None or step < self._next_step:
            return
        try:
            self.run.log({"trainer/step": step, **values}, step=step)
            self._next_step = step
        except Exception as exc:  # noqa: BLE001
            self._fail(exc)

    def save_traces(self, traces: list[Path]) -> None:
        """Profiler traces into the W&B run's files, where W&B's own PyTorch-profiler integration puts them
        (``pytorch_traces/*.pt.trace.json``: the run page shows them); uploaded with the run, or by ``wandb sync``."""
        if self.run is None or not traces:
            return
        try:
            target = Path(self.run.dir) / TRACES_DIR
            target.mkdir(exist_ok=True)
            for trace in traces:
                shutil.copyfile(trace, target / f"{trace.stem}{TRACE_SUFFIX}")
        except Exception as exc:  # noqa: BLE001
            self._fail(exc)

    def finish(self, summary: dict[str, Any] | None) -> bool:
        """Finishes the W&B run with the run's summary (None: it crashed); False if there was none to finish."""
        if self.run is None:
            return False
        try:
            if summary is not None:
                self.run.summary.update(
                    {f"final/{key}": summary[key] for key in _SUMMARY_KEYS if summary.get(key) is not None}
                )
            self.run.finish(exit_code=0 if summary and summary.get("status") == "completed" else 1)
        except Exception as exc:  # noqa: BLE001
            self._fail(exc)
            return False
        self.run = None
        return True

    def _fail(self, exc: BaseException) -> None:
        print(
            f"warning: W&B: {first_line(exc)}; going on without it (metrics.jsonl has every record)",
            file=sys.stderr,
            flush=True,
        )
        run, self.run = self.run, None
        if run is not None:
            try:
                run.finish(exit_code=1, quiet=True)
            except Exception:  # noqa: BLE001 - already reported
                pass


def run_metadata(*, world_size: int, strategy: str, launcher: str, device: Any) -> dict[str, Any]:
    """What the run ran on, for the W&B config: commit, world size, strategy, launcher, hardware."""
    import torch

    hardware: dict[str, Any] = {
        "device": device.type,
        "cpu_count": os.cpu_count(),
        "host": platform.node(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    if device.type == "cuda":
        hardware.update(gpu=torch.cuda.get_device_name(device), gpus_per_node=torch.cuda.device_count())
    return {
        "git_commit": git_commit(),
        "world_size": world_size,
        "strategy": strategy,
        "launcher": launcher,
        "hardware": hardware,
    }


def git_commit() -> str | None:
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=PROJECT_DIR, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() or None if result.returncode == 0 else None


def log_experiment(
    out_dir: Path,
    *,
    settings: Any,
    group: str,
    name: str,
    rows: list[dict[str, Any]],
    columns: list[str],
    meta: dict[str, Any],
) -> str | None:
    """An experiment's summary run in its W&B group (``orchestrator scale``): the points as a table (``points``), and
    ``scale/<strategy>/<metric>`` against ``scale/workers`` for W&B's line plots. Returns where to see it;
    None when W&B is off or failed (warned once, like a training run's W&B)."""
    mode = resolve_mode(settings.wandb.mode.value)
    if mode == "disabled":
        return None
    try:
        import wandb

        run = wandb.init(
            project=settings.wandb.project,
            entity=settings.wandb.entity,
            group=group,
            job_type="scale",
            name=name,
            dir=str(out_dir),
            config={**meta, "git_commit": git_commit()},
            mode=mode,  # type: ignore[arg-type]  # WANDB_MODE passes through as set: wandb refuses a bad one
            tags=list(settings.wandb.tags) or None,
            settings=wandb.Settings(
                console="off", init_timeout=settings.wandb.init_timeout_s, silent=True, x_disable_stats=True
            ),
        )
    except Exception as exc:  # noqa: BLE001
        print(f"warning: W&B: {first_line(exc)}; the experiment's tables are in {out_dir}", file=sys.stderr, flush=True)
        return None
    try:
        run.define_metric("scale/*", step_metric="scale/workers")
        run.log({"points": wandb.Table(columns=columns, data=[[row.get(c) for c in columns] for row in rows])})
        for workers in sorted({row["workers"] for row in rows}):
            values = {
                f"scale/{row['strategy']}/{key}": row[key]
                for row in rows
                if row["workers"] == workers
                for key in (
                    "tokens_per_s",
                    "tokens_per_s_per_worker",
                    "efficiency",
                    "mfu",
                    "peak_mem_bytes",
                    "step_time_s",
                )
                if row.get(key) is not None
            }
            if values:
                run.log({"scale/workers": workers, **values})
        location = run.url if mode == "online" else f"wandb sync {Path(run.dir).parent}"
        run.finish()
        return location
    except Exception as exc:  # noqa: BLE001
        print(f"warning: W&B: {first_line(exc)}; the experiment's tables are in {out_dir}", file=sys.stderr, flush=True)
        try:
            run.finish(exit_code=1, quiet=True)
        except Exception:  # noqa: BLE001 - already reported
            pass
        return None
