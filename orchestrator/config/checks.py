"""Checks that need the machine, run by the CLI after the schema's own checks and before any worker.

Nothing here imports torch: a bad path or an impossible worker count is reported within a second.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from orchestrator.checkpoints.manifest import candidates
from orchestrator.config.paths import check_data_paths
from orchestrator.config.schema import Config, JobConfig, JobKind
from orchestrator.errors import UserError
from orchestrator.launchers import launcher_spec


def check_environment(config: Config) -> None:
    """Raises UserError for input this machine cannot serve: paths, checkpoints, workers, extras."""
    if config.job.kind is JobKind.script:
        _check_script(config.job)
    else:
        _check_training_inputs(config)
    launcher_spec(config.launcher.name).check(config)  # the launcher's own: capacity, a cluster that answers


def _check_script(job: JobConfig) -> None:
    assert job.script is not None  # the schema requires it for script jobs
    path = Path(job.script).expanduser()
    if not path.is_file():
        reason = "a directory, not a file" if path.is_dir() else "no such file"
        where = "" if path.is_absolute() else f" (relative to the current directory, {Path.cwd()})"
        raise UserError(f"job.script={job.script}: {reason}{where}")


def _check_training_inputs(config: Config) -> None:
    check_data_paths(config.data)
    # Existence only: verifying (hashing) a checkpoint and matching it to the model is the preflight's job.
    if (resume := config.trainer.resume_from.path) is not None:
        candidates(resume, key="trainer.resume")
    if config.trainer.init_from:
        if getattr(config.model, "pretrained", None):
            raise UserError("trainer.init_from and model.pretrained both name the initial weights; set one")
        candidates(config.trainer.init_from, key="trainer.init_from")
    if config.model.name == "hf" and importlib.util.find_spec("transformers") is None:
        raise UserError("model=hf needs transformers: pip install 'orchestrator[hf]'")
