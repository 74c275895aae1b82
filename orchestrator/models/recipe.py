"""How to make a job's model, handed to the strategy so that it decides where and how.

A replicated strategy builds the model on CPU and moves it; FSDP2 builds it on the meta device and
materializes only its shards (``strategy.init_device``); ZeRO-3 builds it inside ``deepspeed.zero.Init``. Whichever way, the
recipe gives the same model: the same architecture, initialized from torch's global RNG, then the
fine-tuning weights if there are any, then the frozen modules.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from orchestrator.errors import UserError


@dataclass(frozen=True, kw_only=True)
class ModelRecipe:
    """Args:
    build: builds and initializes the model on the current default device (``torch.device`` context).
    blocks: the model's repeated blocks, which sharding, activation checkpointing and compile wrap.
    initial_state: the full weights to start from (``trainer.init_from``), read on demand.
    freeze: names of modules whose parameters do not train.
    """

    build: Callable[[], nn.Module]
    blocks: Callable[[nn.Module], list[nn.Module]]
    initial_state: Callable[[], Mapping[str, torch.Tensor]] | None = None
    freeze: tuple[str, ...] = ()

    def build_complete(self) -> nn.Module:
        """The model on the current default device with initial weights loaded and modules frozen."""
        model = self.build()
        if self.initial_state is not None:
            load_weights(model, self.initial_state())
        freeze_modules(model, self.freeze)
        return model


def state_shapes(model: nn.Module) -> dict[str, list[int]]:
    """Every state-dict entry's shape: what a checkpoint must match to load into ``model``."""
    return {name: list(tensor.shape) for name, tensor in model.state_dict().items()}


def shape_mismatch(expected: Mapping[str, list[int]], found: Mapping[str, list[int]]) -> str | None:
    """A one-line description of how two state-dict layouts differ, or None when they agree."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing or unexpected:
        return f"missing {missing[:3]}{'...' if len(missing) > 3 else ''}, " \
               f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}"
    for name, shape in expected.items():
        if list(found[name]) != list(shape):
            return f"{name} is {list(found[name])} in the checkpoint, {list(shape)} in this model"
    return None


def load_weights(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Loads a full state dict into ``model``; UserError naming trainer.init_from when it does not fit."""
    check_weights_fit(state_shapes(model), state)
    model.load_state_dict(state)


def check_weights_fit(shapes: Mapping[str, list[int]], state: Mapping[str, torch.Tensor]) -> None:
    """UserError naming trainer.init_from when ``state`` does not have the model's state-dict ``shapes``."""
    problem = shape_mismatch(shapes, {k: list(v.shape) for k, v in state.items()})
    if problem is not None:
        raise UserError(f"trainer.init_from: the checkpoint's weights do not fit this model ({problem})")


def freeze_modules(model: nn.Module, names: tuple[str, ...] | list[str]) -> None:
    """Sets ``requires_grad=False`` on every parameter of the named modules; UserError for an unknown name."""
    modules = dict(model.named_modules())
    for name in names:
        if name not in modules:
            top_level = ", ".join(n for n, _ in model.named_children())
            raise UserError(f"trainer.freeze: {name!r} is not a module of this model; "
                            f"top-level modules are: {top_level}")
        modules[name].requires_grad_(False)
