"""Fine-tuning: start from another run's weights, optionally with some modules frozen."""

from __future__ import annotations

from torch import nn

from orchestrator.errors import UserError
from orchestrator.strategies import load_model_weights
from orchestrator.train.manifest import resolve_checkpoint


def load_initial_weights(model: nn.Module, path: str, *, freeze: list[str]) -> None:
    """Loads the model weights of the checkpoint at ``path`` into ``model`` and freezes ``freeze``.

    Only weights travel: the optimizer, schedule and data position start fresh, as fine-tuning expects.

    Args:
        model: the freshly built (unwrapped) model.
        path: a checkpoint dir, a ``checkpoints/`` dir or a run dir (``trainer.init_from``).
        freeze: module names (as in ``model.named_modules()``) whose parameters stop training.
    """
    directory = resolve_checkpoint(path, key="trainer.init_from")
    state = load_model_weights(directory)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[-1].strip()
        raise UserError(f"trainer.init_from={path}: the checkpoint's weights do not fit this model ({first})") from None
    if missing or unexpected:
        raise UserError(f"trainer.init_from={path}: the checkpoint's weights do not fit this model "
                        f"(missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]})")
    freeze_modules(model, freeze)


def freeze_modules(model: nn.Module, names: list[str]) -> None:
    """Sets ``requires_grad=False`` on every parameter of the named modules; UserError for an unknown name."""
    modules = dict(model.named_modules())
    for name in names:
        if name not in modules:
            top_level = ", ".join(n for n, _ in model.named_children())
            raise UserError(f"trainer.freeze: {name!r} is not a module of this model; "
                            f"top-level modules are: {top_level}")
        modules[name].requires_grad_(False)
