"""Which checkpoints a strategy can read, decided from the manifest alone (no torch import)."""

from __future__ import annotations

# The files each strategy writes. Replicated strategies write plain state dicts from rank 0; FSDP2
# writes torch.distributed.checkpoint shards; each ZeRO stage partitions its state its own way.
_FORMAT = {
    "none": "replicated",
    "ddp": "replicated",
    "fsdp2": "dcp",
    "zero0": "deepspeed-zero0",
    "zero1": "deepspeed-zero1",
    "zero2": "deepspeed-zero2",
    "zero3": "deepspeed-zero3",
}
# Formats whose optimizer state reshards when the number of ranks changes.
_RESHARDABLE = {"replicated", "dcp"}


def checkpoint_format(strategy: str) -> str | None:
    """The on-disk format ``strategy`` writes, or None for a strategy this orchestrator does not know."""
    return _FORMAT.get(strategy)


def resume_problem(*, written_by: str, world_size: int, resuming_with: str, num_workers: int) -> str | None:
    """Why a checkpoint cannot resume this job, or None when it can."""
    format_ = checkpoint_format(written_by)
    if format_ is None or format_ != checkpoint_format(resuming_with):
        return f"it was written by strategy={written_by}, which strategy={resuming_with} cannot resume from"
    if format_ not in _RESHARDABLE and world_size != num_workers:
        return (
            f"strategy={written_by} checkpoints resume at the world size they were written at "
            f"({world_size}), not launcher.num_workers={num_workers}"
        )
    return None


def weights_problem(*, written_by: str) -> str | None:
    """Why the model weights of a checkpoint cannot be read, or None when they can."""
    if checkpoint_format(written_by) is None:
        return f"it was written by strategy={written_by}, whose checkpoints this orchestrator cannot read"
    return None
