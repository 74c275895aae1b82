"""How to make a job's model, handed to the strategy so that it decides where and how.

A replicated strategy builds the model on CPU and moves it; FSDP2 builds it on the meta device and
materializes only its shards (``strategy.init_device``); ZeRO-3 builds it inside ``deepspeed.zero.Init``. Whichever way, the
recipe gives the same model: the same architecture, initialized from torch's global RNG, then the
fine-tuning weights if there are any, then the frozen modules.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from orchestrator.errors import UserError


class WeightSource(ABC):
    """Weights to load, under the model's state-dict names, read a tensor at a time."""

    key: str  # the setting they come from, named in errors

    @abstractmethod
    def shapes(self) -> dict[str, list[int]]:
        """Every tensor's shape, by name, without reading any tensor."""

    @abstractmethod
    def read(self, name: str, *, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """The tensor ``name``, or its rows ``[start, stop)`` along the first dimension."""


class InMemoryWeights(WeightSource):
    """A state dict already in memory (a checkpoint's consolidated weights)."""

    def __init__(self, state: Mapping[str, torch.Tensor], *, key: str) -> None:
        self.state = state
        self.key = key

    def shapes(self) -> dict[str, list[int]]:
        return {name: list(tensor.shape) for name, tensor in self.state.items()}

    def read(self, name: str, *, rows: tuple[int, int] | None = None) -> torch.Tensor:
        tensor = self.state[name]
        return tensor if rows is None else tensor[rows[0]:rows[1]]


@dataclass(frozen=True, kw_only=True)
class ModelRecipe:
    """Args:
    build: builds and initializes the model on the current default device (``torch.device`` context).
    blocks: the model's repeated blocks, which sharding, activation checkpointing and compile wrap.
    initial_state: the weights to start from (``trainer.init_from``, ``model.pretrained``), opened on
        demand; a strategy reads each tensor, or each rank's rows of it, as it loads it.
    freeze: names of modules whose parameters do not train.
    """

    build: Callable[[], nn.Module]
    blocks: Callable[[nn.Module], list[nn.Module]]
    initial_state: Callable[[], WeightSource] | None = None
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


@torch.no_grad()
def load_weights(model: nn.Module, source: WeightSource) -> None:
    """Copies ``source`` into ``model`` one tensor at a time; UserError when it does not fit."""
    check_weights_fit(state_shapes(model), source)
    for name, tensor in model.state_dict(keep_vars=True).items():
        tensor.copy_(source.read(name))


def check_weights_fit(shapes: Mapping[str, list[int]], source: WeightSource) -> None:
    """UserError when ``source`` does not have the model's state-dict ``shapes``."""
    problem = shape_mismatch(shapes, source.shapes())
    if problem is not None:
        raise UserError(f"{source.key}: the weights do not fit this model ({problem})")


def freeze_modules(model: nn.Module, names: tuple[str, ...] | list[str]) -> None:
    """Sets ``requires_grad=False`` on every parameter of the named modules; UserError for an unknown name."""
    modules = dict(model.named_modules())
    for name in names:
        if name not in modules:
            top_level = ", ".join(n for n, _ in model.named_children())
            raise UserError(f"trainer.freeze: {name!r} is not a module of this model; "
                            f"top-level modules are: {top_level}")
        modules[name].requires_grad_(False)
