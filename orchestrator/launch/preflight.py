"""The driver's checks that need torch, the data, or the run dir, made before any worker starts."""

from __future__ import annotations

from pathlib import Path

import torch

from orchestrator.config.schema import Config
from orchestrator.data import prepare_data
from orchestrator.errors import UserError
from orchestrator.models import build_model
from orchestrator.models.recipe import freeze_modules, shape_mismatch, state_shapes
from orchestrator.strategies.formats import resume_problem, weights_problem
from orchestrator.train import manifest


def preflight(config: Config) -> None:
    """Prepares the data (cached), builds the model on the meta device, and checks named checkpoints.

    Catches, in the driver and in seconds, what only the built model can tell: a model that does not
    fit the data, a ``trainer.freeze`` name that is not a module, a ``trainer.resume`` or
    ``trainer.init_from`` checkpoint that is damaged, of another model, or of an unreadable format.
    """
    shapes = _model_shapes(config)
    trainer = config.trainer
    if trainer.resume not in ("auto", "never"):
        directory = manifest.resolve_checkpoint(trainer.resume, key="trainer.resume")
        _check_fits(directory, shapes, key=f"trainer.resume={trainer.resume}",
                    problem=resume_problem(written_by=manifest.read_manifest(directory).strategy,
                                           resuming_with=config.strategy.name))
    if trainer.init_from:
        directory = manifest.resolve_checkpoint(trainer.init_from, key="trainer.init_from")
        _check_fits(directory, shapes, key=f"trainer.init_from={trainer.init_from}",
                    problem=weights_problem(written_by=manifest.read_manifest(directory).strategy))


def check_run_dir(config: Config, run_dir: Path) -> None:
    """Refuses to start in a run dir whose checkpoints this job would overwrite or cannot continue."""
    existing = manifest.checkpoint_dirs(run_dir / "checkpoints")
    resume = config.trainer.resume
    if not existing or resume not in ("auto", "never"):
        return
    if resume == "never":
        raise UserError(f"trainer.resume=never but hydra.run.dir={run_dir} already holds checkpoints "
                        f"(newest {existing[0].name}); continue it with trainer.resume=auto or use another "
                        f"hydra.run.dir")
    for directory in existing:
        try:
            written_by = manifest.read_manifest(directory).strategy
        except manifest.CheckpointError:
            continue  # damaged: the workers skip it
        _check_fits(directory, _model_shapes(config), key=f"hydra.run.dir={run_dir}",
                    problem=resume_problem(written_by=written_by, resuming_with=config.strategy.name))
        return


def _model_shapes(config: Config) -> dict[str, list[int]]:
    spec = prepare_data(config.data)  # a cache hit after the first call
    with torch.device("meta"):
        model = build_model(config.model, spec)
    freeze_modules(model, config.trainer.freeze)
    return state_shapes(model)


def _check_fits(directory: Path, shapes: dict[str, list[int]], *, key: str, problem: str | None) -> None:
    saved = manifest.read_manifest(directory)
    if problem is None and saved.model_shapes is not None:
        mismatch = shape_mismatch(shapes, saved.model_shapes)
        problem = f"it was written for another model ({mismatch})" if mismatch else None
    if problem is not None:
        raise UserError(f"{key}: cannot use checkpoint {directory.name}: {problem}")
