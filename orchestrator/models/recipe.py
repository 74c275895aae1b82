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

    @abstractmethod
    def dtypes(self) -> dict[str, torch.dtype]:
        """Every tensor's dtype, by name, without reading any tensor."""

    def fresh(self, name: str) -> bool:
        """Whether the model's own initial value of ``name`` stands (a new adapter): not read from here."""
        return False


class Adapters(ABC):
    """Trainable adapters added to a built model (``model.lora``), everything else frozen."""

    @abstractmethod
    def add(self, model: nn.Module, *, blocks: list[nn.Module]) -> None:
        """Adds the adapters, initialized from torch's global RNG, and freezes every other parameter."""

    @abstractmethod
    def reset(self, model: nn.Module) -> None:
        """The adapters' initial values again, after ``to_empty`` and the model's ``init_weights``."""

    @abstractmethod
    def cast_frozen(self, model: nn.Module) -> None:
        """Casts the frozen parameters to the dtype they are kept in."""

    @abstractmethod
    def under_adapters(self, source: WeightSource, *, names: list[str]) -> WeightSource:
        """``source``'s weights of the model without adapters, under the adapted model's ``names``."""


class InMemoryWeights(WeightSource):
    """A state dict already in memory (a checkpoint's consolidated weights)."""

    def __init__(self, state: Mapping[str, torch.Tensor], *, key: str) -> None:
        self.state = state
        self.key = key

    def shapes(self) -> dict[str, list[int]]:
        return {name: list(tensor.shape) for name, tensor in self.state.items()}

    def dtypes(self) -> dict[str, torch.dtype]:
        return {name: tensor.dtype for name, tensor in self.state.items()}

    def read(self, name: str, *, rows: tuple[int, int] | None = None) -> torch.Tensor:
        tensor = self.state[name]
        return tensor if rows is None else tensor[rows[0] : rows[1]]


@dataclass(frozen=True, kw_only=True)
class ModelRecipe:
    """Args:
    build: builds and initializes the model on the current default device (``torch.device`` context).
    blocks: the model's repeated blocks, which sharding, activation checkpointing and compile wrap.
    initial_state: the weights to start from (``trainer.init_from``, ``model.pretrained``), opened on
        demand; a strategy reads each tensor, or each rank's rows of it, as it loads it. They are the
        model's without adapters.
    freeze: names of modules whose parameters do not train.
    adapters: trainable adapters (LoRA) added after the weights are loaded; the rest is then frozen.
    """

    build: Callable[[], nn.Module]
    blocks: Callable[[nn.Module], list[nn.Module]]
    initial_state: Callable[[], WeightSource] | None = None
    freeze: tuple[str, ...] = ()
    adapters: Adapters | None = None

    def build_complete(self, *, cast_frozen: bool = True) -> nn.Module:
        """The model on the current default device with initial weights loaded, adapters added and modules
        frozen; the frozen parameters cast to their dtype unless ``cast_frozen`` is False (a strategy that
        casts the whole model itself)."""
        model = self.build()
        if self.initial_state is not None:
            load_weights(model, self.initial_state())
        self.finish(model, cast_frozen=cast_frozen)
        return model

    def finish(self, model: nn.Module, *, cast_frozen: bool = True) -> None:
        """Adds the adapters and freezes, on a model whose base weights are in place."""
        if self.adapters is not None:
            self.adapters.add(model, blocks=self.blocks(model))
            if cast_frozen:
                self.adapters.cast_frozen(model)
        freeze_modules(model, self.freeze)


def state_shapes(model: nn.Module) -> dict[str, list[int]]:
    """Every state-dict entry's shape: what a checkpoint must match to load into ``model``."""
    return {name: list(tensor.shape) for name, tensor in model.state_dict().items()}


def shape_mismatch(expected: Mapping[str, list[int]], found: Mapping[str, list[int]]) -> str | None:
    """A one-line description of how two state-dict layouts differ, or None when they agree."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing or unexpected:
        return (
            f"missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
            f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}"
        )
    for name, shape in expected.items():
        if list(found[name]) != list(shape):
            return f"{name} is {list(found[name])} in the checkpoint, {list(shape)} in this model"
    return None


@torch.no_grad()
def load_weights(model: nn.Module, source: WeightSource) -> None:
    """Copies ``source`` into ``model`` one tensor at a time; UserError when it does not fit."""
    check_weights_fit(state_shapes(model), source)
    for name, tensor in model.state_dict(keep_vars=True).items():
        if not source.fresh(name):
            tensor.copy_(source.read(name))


def check_weights_fit(shapes: Mapping[str, list[int]], source: WeightSource) -> None:
    """UserError when ``source`` does not have the model's state-dict ``shapes`` (less its ``fresh`` ones)."""
    problem = shape_mismatch({name: shape for name, shape in shapes.items() if not source.fresh(name)}, source.shapes())
    if problem is not None:
        raise UserError(f"{source.key}: the weights do not fit this model ({problem})")


def freeze_modules(model: nn.Module, names: tuple[str, ...] | list[str]) -> None:
    """Sets ``requires_grad=False`` on every parameter of the named modules; UserError for an unknown name."""
    modules = dict(model.named_modules())
    for name in names:
        if name not in modules:
            top_level = ", ".join(n for n, _ in model.named_children())
            raise UserError(
                f"trainer.freeze: {name!r} is not a module of this model; top-level modules are: {top_level}"
            )
        modules[name].requires_grad_(False)
