"""What every strategy does to the model's repeated blocks before wrapping or sharding it.

The order is fixed: activation checkpointing, then ``torch.compile``, then the strategy's own
wrapping. Checkpointing a compiled block would recompute through the compiled graph's saved
tensors; compiling a sharded block would trace FSDP's hooks; this order avoids both.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    CheckpointImpl,
    checkpoint_wrapper,
)


def prepare_blocks(
    model: nn.Module, blocks: list[nn.Module], *, activation_checkpointing: bool, compile: bool
) -> list[nn.Module]:
    """Applies activation checkpointing and compile to each block, in place in ``model``.

    Args:
        model: the model holding the blocks.
        blocks: its repeated blocks (the model registry's ``model_blocks``).
        activation_checkpointing: keep only each block's input during forward and recompute the rest in
            backward (the wrapper keeps state-dict keys and RNG streams unchanged, so results are too).
        compile: ``torch.compile`` each block (in place: parameter names do not change).

    Returns:
        The blocks as they now sit in the model (checkpoint wrappers when checkpointing), which is
        what a sharding strategy must wrap.
    """
    if activation_checkpointing:
        parents = {id(child): (parent, name) for parent in model.modules() for name, child in parent.named_children()}
        wrapped = []
        for block in blocks:
            parent, name = parents[id(block)]
            checkpointed = checkpoint_wrapper(block, checkpoint_impl=CheckpointImpl.NO_REENTRANT)
            setattr(parent, name, checkpointed)
            wrapped.append(checkpointed)
        blocks = wrapped
    if compile:
        for block in blocks:
            block.compile()
    return blocks
