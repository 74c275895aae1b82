"""LoRA (``model.lora``): low-rank adapters added to a built model through peft, and the views of its
weights that loading and exporting need.

peft's ``inject_adapter_in_model`` replaces each target ``nn.Linear`` in place by a LoRA layer that keeps
the original as ``base_layer`` and adds two small linears, A (rank x in) and B (out x rank), so the layer
computes ``base(x) + (alpha / rank) * B(A(dropout(x)))``. In the state dict an adapted weight is renamed
``<module>.base_layer.weight`` and the adapters are ``<module>.lora_A.default.weight`` and
``<module>.lora_B.default.weight``. peft initializes A like ``nn.Linear`` (Kaiming-uniform, from torch's
global RNG) and B to zero: a freshly adapted model computes exactly what its base does.

The model itself stays the project's model (no ``PeftModel`` wrapper): its ``init_weights`` and blocks
are unchanged, so every strategy builds, shards and checkpoints it as any other model.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import nn

from orchestrator.config.schema import LoRAConfig, ModelConfig, Precision
from orchestrator.errors import UserError
from orchestrator.models.recipe import Adapters, WeightSource

ADAPTER = "default"  # peft's adapter name; one adapter per model here
_ADAPTER_PARAM = re.compile(r"(?:^|\.)lora_[AB]\.")
_DTYPES = {Precision.fp32: torch.float32, Precision.bf16: torch.bfloat16}


def is_adapter(name: str) -> bool:
    """Whether a state-dict or parameter name is a LoRA adapter's (``...lora_A.default.weight``)."""
    return _ADAPTER_PARAM.search(name) is not None


def base_name(name: str) -> str:
    """The name a tensor of an adapted model has in the model without adapters."""
    return name.replace(".base_layer.", ".")


def adapter_names(module: str) -> tuple[str, str]:
    """The state-dict names of module ``module``'s A and B matrices."""
    return f"{module}.lora_A.{ADAPTER}.weight", f"{module}.lora_B.{ADAPTER}.weight"


def adapted_modules(names: list[str] | Mapping[str, object]) -> list[str]:
    """The modules that have adapters, from a state dict's names (``x.lora_A.default.weight`` -> ``x``)."""
    suffix = f".lora_A.{ADAPTER}.weight"
    return [name[: -len(suffix)] for name in names if name.endswith(suffix)]


def lora_for(cfg: ModelConfig) -> LoRA | None:
    """The adapters ``model.lora`` asks for, or None (``model.lora.rank=0``: the whole model trains)."""
    return LoRA(cfg.lora) if cfg.lora.enabled else None


class LoRA(Adapters):
    """``model.lora``: which modules get adapters, their rank and scale, and the frozen base's dtype."""

    def __init__(self, cfg: LoRAConfig) -> None:
        self.cfg = cfg

    @property
    def scale(self) -> float:
        return self.cfg.alpha / self.cfg.rank

    def add(self, model: nn.Module, *, blocks: list[nn.Module]) -> None:
        """Injects adapters into the target modules (on the model's device: nothing is allocated on the meta
        device) and freezes every other parameter."""
        from peft import LoraConfig, inject_adapter_in_model

        config = LoraConfig(
            r=self.cfg.rank,
            lora_alpha=self.cfg.alpha,
            lora_dropout=self.cfg.dropout,
            target_modules=self.targets(model, blocks=blocks),
            bias="none",
        )
        inject_adapter_in_model(config, model, adapter_name=ADAPTER)
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(is_adapter(name))

    def targets(self, model: nn.Module, *, blocks: list[nn.Module]) -> list[str]:
        """The full names of the modules to adapt; UserError for a target that names no linear layer.

        A target is a module name or a suffix of one (``q_proj``, ``attn.qkv``); none means every
        ``nn.Linear`` in the model's repeated blocks.
        """
        linears = {name for name, module in model.named_modules() if isinstance(module, nn.Linear)}
        if not self.cfg.target_modules:
            in_blocks = {id(module) for block in blocks for module in block.modules()}
            return sorted(name for name, module in model.named_modules() if name in linears and id(module) in in_blocks)
        found = []
        for target in self.cfg.target_modules:
            matches = sorted(name for name in linears if name == target or name.endswith(f".{target}"))
            if not matches:
                raise UserError(
                    f"model.lora.target_modules: {target!r} names no linear layer of this model; "
                    f"its block's linear layers are: {', '.join(_block_linears(blocks)) or 'none'}"
                )
            found.extend(matches)
        return sorted(set(found))

    def reset(self, model: nn.Module) -> None:
        """peft's initial values again (A Kaiming-uniform, B zero), for adapters whose tensors were just
        materialized (``to_empty``) and overwritten by the model's ``init_weights``."""
        from peft.tuners.lora import LoraLayer

        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, LoraLayer):
                    module.reset_lora_parameters(ADAPTER, True)

    def cast_frozen(self, model: nn.Module) -> None:
        """Keeps the frozen (base) parameters in ``model.lora.base_dtype``; the adapters stay fp32."""
        dtype = _DTYPES[self.cfg.base_dtype]
        for parameter in model.parameters():
            if not parameter.requires_grad and parameter.is_floating_point():
                parameter.data = parameter.data.to(dtype)

    def under_adapters(self, source: WeightSource, *, names: list[str]) -> WeightSource:
        return BaseWeights(source, names=names)


def _block_linears(blocks: list[nn.Module]) -> list[str]:
    if not blocks:
        return []
    return [name for name, module in blocks[0].named_modules() if isinstance(module, nn.Linear)]


class BaseWeights(WeightSource):
    """A source of the base model's weights, read under an adapted model's names: ``x.base_layer.weight``
    reads ``x.weight``, and the adapters are left to the model's own initialization (``fresh``).

    Args:
        source: the base model's weights.
        names: the adapted model's state-dict names.
    """

    def __init__(self, source: WeightSource, *, names: list[str]) -> None:
        self.source = source
        self.key = source.key
        self._names = {name: base_name(name) for name in names if not is_adapter(name)}

    def fresh(self, name: str) -> bool:
        return is_adapter(name)

    def shapes(self) -> dict[str, list[int]]:
        stored = self.source.shapes()
        mapped = {name: stored[base] for name, base in self._names.items() if base in stored}
        unused = {name: shape for name, shape in stored.items() if name not in set(self._names.values())}
        return {**mapped, **unused}  # an unused tensor is reported as unexpected under its own name

    def dtypes(self) -> dict[str, torch.dtype]:
        stored = self.source.dtypes()
        return {name: stored[base] for name, base in self._names.items() if base in stored}

    def read(self, name: str, *, rows: tuple[int, int] | None = None) -> torch.Tensor:
        return self.source.read(self._names[name], rows=rows)


class MergedWeights(WeightSource):
    """The weights of a LoRA-trained model under the base model's names.

    With ``merge``, each adapted weight is read as ``W + scale * B @ A`` (computed in fp32, returned in W's
    dtype); without, as the frozen W, and the adapters are not among the tensors.

    Args:
        source: the adapted model's weights (a checkpoint's).
        scale: ``alpha / rank`` of the run that trained them.
        merge: fold the adapters in.
    """

    def __init__(self, source: WeightSource, *, scale: float, merge: bool) -> None:
        self.source = source
        self.key = source.key
        self.scale = scale
        self.merge = merge
        shapes = source.shapes()
        self._adapted = {f"{module}.weight": module for module in adapted_modules(shapes)}
        self._names = {base_name(name): name for name in shapes if not is_adapter(name)}

    def shapes(self) -> dict[str, list[int]]:
        shapes = self.source.shapes()
        return {name: shapes[stored] for name, stored in self._names.items()}

    def dtypes(self) -> dict[str, torch.dtype]:
        dtypes = self.source.dtypes()
        return {name: dtypes[stored] for name, stored in self._names.items()}

    def read(self, name: str, *, rows: tuple[int, int] | None = None) -> torch.Tensor:
        weight = self.source.read(self._names[name])
        module = self._adapted.get(name)
        if self.merge and module is not None:
            a_name, b_name = adapter_names(module)
            delta = self.source.read(b_name).float() @ self.source.read(a_name).float()
            weight = (weight.float() + self.scale * delta).to(weight.dtype)
        return weight if rows is None else weight[rows[0] : rows[1]]

    def adapters(self) -> dict[str, tuple[str, str]]:
        """Each adapted module's base name -> the names of its A and B in the source."""
        return {module: adapter_names(module) for module in self._adapted.values()}
