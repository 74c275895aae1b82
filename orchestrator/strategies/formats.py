"""Which checkpoints a strategy can read, decided from the manifest alone (no torch import)."""

from __future__ import annotations

# Strategies that write the same files: replicated strategies write plain state dicts from rank 0.
_FORMAT = {"none": "replicated", "ddp": "replicated"}


def checkpoint_format(strategy: str) -> str | None:
    """The on-disk format ``strategy`` writes, or None for a strategy this orchestrator does not know."""
    return _FORMAT.get(strategy)


def resume_problem(*, written_by: str, resuming_with: str) -> str | None:
    """Why a checkpoint written by one strategy cannot resume under another, or None when it can."""
    if checkpoint_format(written_by) is not None and checkpoint_format(written_by) == checkpoint_format(resuming_with):
        return None
    return f"it was written by strategy={written_by}, which strategy={resuming_with} cannot resume from"


def weights_problem(*, written_by: str) -> str | None:
    """Why the model weights of a checkpoint cannot be read, or None when they can."""
    if checkpoint_format(written_by) is None:
        return f"it was written by strategy={written_by}, whose checkpoints this orchestrator cannot read"
    return None
