"""The driver's checks that need torch, the data, or the run dir, made before any worker starts."""

from __future__ import annotations

from pathlib import Path

from orchestrator.checkpoints import manifest
from orchestrator.config.schema import Config, JobKind
from orchestrator.data import prepare_data
from orchestrator.errors import UserError
from orchestrator.launchers.spec import uses_gpu
from orchestrator.models import build_model, meta_device, model_blocks, pretrained_weights
from orchestrator.models.lora import is_adapter, lora_for
from orchestrator.models.recipe import check_weights_fit, freeze_modules, shape_mismatch, state_shapes
from orchestrator.rundir import RunDir
from orchestrator.strategies import (
    TrainingSettings,
    check_checkpoint,
    resume_problem,
    strategy_spec,
    weights_problem,
)
from orchestrator.train.storage import RunStorage


def preflight(config: Config) -> dict[str, list[int]] | None:
    """Prepares the data (cached), builds the model on the meta device (once), and checks named checkpoints.

    Catches, in the driver and in seconds, what only the built model can tell: a model that does not
    fit the data, a ``trainer.freeze`` name that is not a module, a ``trainer.resume`` or
    ``trainer.init_from`` checkpoint that is damaged, of another model, or of an unreadable format, a
    ``trainer.storage`` that cannot be written. A script job brings its own model, data and checkpoints:
    nothing here applies to it.

    Returns:
        The model's state-dict shapes as it trains (with its LoRA adapters); None for a script job.
    """
    if config.job.kind is JobKind.script:
        if config.trainer.storage:
            raise UserError(
                "trainer.storage mirrors orchestrator's own checkpoints; a script job (job.kind=script) keeps its own"
            )
        return None
    if config.trainer.storage:
        RunStorage(config.trainer.storage).check()
    strategy_spec(config.strategy.name).check(config.strategy, TrainingSettings.of(config), on_gpu=uses_gpu(config))
    shapes, base_shapes = _model_shapes(config)
    trainer = config.trainer
    if (resume := trainer.resume_from.path) is not None:
        directory = manifest.resolve_checkpoint(resume, key="trainer.resume")
        _check_fits(
            directory,
            shapes,
            key=f"trainer.resume={resume}",
            problem=_resume_problem(config, manifest.read_manifest(directory)),
        )
        _check_safe(directory, key=f"trainer.resume={resume}")
    if trainer.init_from:
        directory = manifest.resolve_checkpoint(trainer.init_from, key="trainer.init_from")
        saved = manifest.read_manifest(directory)
        problem = weights_problem(written_by=saved.strategy)
        if problem is None and any(is_adapter(name) for name in saved.model_shapes or ()):
            problem = (
                "it holds LoRA adapters; `orchestrator export --merge-lora` writes the model they make, "
                "which model.pretrained=DIR starts from"
            )
        _check_fits(directory, base_shapes, key=f"trainer.init_from={trainer.init_from}", problem=problem)
        _check_safe(directory, key=f"trainer.init_from={trainer.init_from}")
    return shapes


def check_run_dir(config: Config, run_dir: Path, *, model_shapes: dict[str, list[int]]) -> None:
    """Refuses to start in a run dir whose checkpoints this job would overwrite or cannot continue.

    Args:
        config: the job.
        run_dir: where it runs.
        model_shapes: the model's state-dict shapes as it trains (``preflight``'s).
    """
    checkpoints = RunDir(run_dir).checkpoints
    manifest.recover_replaced(checkpoints)
    existing = manifest.checkpoint_dirs(checkpoints)
    resume = config.trainer.resume_from
    if resume.never and config.trainer.storage:
        stored = RunStorage(config.trainer.storage).checkpoint_names()
        if stored:
            raise UserError(
                f"trainer.resume=never but trainer.storage={config.trainer.storage} already holds "
                f"checkpoints (newest {stored[0]}); continue it with trainer.resume=auto or use another "
                f"trainer.storage"
            )
    if existing and resume.path is not None:
        _check_no_newer(config, run_dir, existing)
    if not existing or resume.path is not None:
        return
    if resume.never:
        raise UserError(
            f"trainer.resume=never but hydra.run.dir={run_dir} already holds checkpoints "
            f"(newest {existing[0].name}); continue it with trainer.resume=auto or use another "
            f"hydra.run.dir"
        )
    for directory in existing:
        try:
            saved = manifest.verify_in_driver(directory)
        except manifest.CheckpointError:
            continue  # damaged: the workers skip it
        _check_fits(directory, model_shapes, key=f"hydra.run.dir={run_dir}", problem=_resume_problem(config, saved))
        _check_safe(directory, key=f"hydra.run.dir={run_dir}")
        return


def _check_no_newer(config: Config, run_dir: Path, existing: list[Path]) -> None:
    """trainer.resume=PATH continues from PATH's step, and this run dir's checkpoints past it would be
    deleted (a later restart must not resume from them): only when the user says so."""
    resume = config.trainer.resume
    step = None
    for candidate in manifest.candidates(resume, key="trainer.resume"):
        try:
            step = manifest.read_manifest(candidate).step
            break
        except manifest.CheckpointError:
            continue
    newer = [d for d in existing if step is not None and manifest.checkpoint_step(d) > step]
    if newer and not config.trainer.discard_newer_checkpoints:
        raise UserError(
            f"trainer.resume={resume} continues from step {step}, but hydra.run.dir={run_dir} holds newer "
            f"checkpoints (newest {newer[0].name}) that resuming would delete; use another "
            f"hydra.run.dir, or trainer.discard_newer_checkpoints=true to delete them"
        )


def _resume_problem(config: Config, saved: manifest.Manifest) -> str | None:
    return resume_problem(
        written_by=saved.strategy,
        world_size=saved.world_size,
        resuming_with=config.strategy.name,
        num_workers=config.launcher.num_workers,
    )


def _model_shapes(config: Config) -> tuple[dict[str, list[int]], dict[str, list[int]]]:
    """The model built once on the meta device: its state-dict shapes as it trains (with its LoRA adapters),
    and without its adapters (what initial weights must have). Checks on the way that ``model.pretrained``'s
    files hold every tensor the model needs, in its shape (headers only: no tensor read), and that
    ``trainer.freeze`` and ``model.lora.target_modules`` name modules of the model."""
    spec = prepare_data(config.data)  # a cache hit after the first call
    with meta_device():
        model = build_model(config.model, spec)
        base = state_shapes(model)
        weights = pretrained_weights(config.model, model)  # None without model.pretrained
        if weights is not None:
            check_weights_fit(base, weights)
        lora = lora_for(config.model)
        if lora is not None:
            lora.add(model, blocks=model_blocks(config.model, model))
    freeze_modules(model, config.trainer.freeze)
    return state_shapes(model), base


def _check_safe(directory: Path, *, key: str) -> None:
    """Refuses a checkpoint that would run code when loaded (the workers check again as they load). After
    ``_check_fits``: a checkpoint this job cannot use is refused for that, before any pickle is read."""
    try:
        check_checkpoint(directory)
    except UserError as exc:
        raise UserError(f"{key}: {exc}") from None


def _check_fits(directory: Path, shapes: dict[str, list[int]], *, key: str, problem: str | None) -> None:
    saved = manifest.read_manifest(directory)
    if problem is None and saved.model_shapes is not None:
        mismatch = shape_mismatch(shapes, saved.model_shapes)
        problem = f"it was written for another model ({mismatch})" if mismatch else None
    if problem is not None:
        raise UserError(f"{key}: cannot use checkpoint {directory.name}: {problem}")
