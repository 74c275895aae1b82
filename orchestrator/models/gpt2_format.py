"""model=gpt in transformers' GPT-2 layout (``GPT2LMHeadModel``, ``model_type: gpt2``), both ways.

The two are the same network: learned positions, pre-LayerNorm blocks (eps 1e-5), a fused q|k|v projection
split into heads in the same order, a 4x MLP, a final LayerNorm and a head tied to the token embedding. What
differs is spelling:
- names: ``blocks.{i}.attn.qkv`` is ``transformer.h.{i}.attn.c_attn``, ``tok_emb`` is ``transformer.wte``, ...;
- GPT-2's projections are ``Conv1D`` modules, whose weight is (in, out): the transpose of ``nn.Linear``'s;
- GPT's GELU is the exact (erf) one: ``activation_function: gelu``, not OpenAI's tanh approximation
  ``gelu_new``; one dropout rate is GPT-2's three (``resid_pdrop``, ``embd_pdrop``, ``attn_pdrop``);
- GPT-2 always has biases: a GPT built with ``bias=False`` (the default) gets zero biases, the same function;
- transformers ties ``lm_head.weight`` to ``transformer.wte.weight`` on load, so an export leaves it out.

``orchestrator export`` writes a GPT this way; ``model=gpt model.pretrained=DIR`` reads it back
(``gpt_pretrained_config`` for the sizes, ``gpt2_weights`` for the tensors, a rank's rows at a time).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from orchestrator.config.schema import GPTConfig
from orchestrator.errors import UserError
from orchestrator.models.pretrained import CONFIG_FILE, SafetensorsWeights, pretrained_dir, read_config
from orchestrator.models.recipe import state_shapes

LAYER_NORM_EPS = 1e-5  # nn.LayerNorm's default, which GPT uses
_TOP = {"tok_emb": "transformer.wte", "pos_emb": "transformer.wpe", "ln_f": "transformer.ln_f"}
_BLOCK = {
    "ln_1": "ln_1",
    "attn.qkv": "attn.c_attn",
    "attn.proj": "attn.c_proj",
    "ln_2": "ln_2",
    "mlp.fc": "mlp.c_fc",
    "mlp.proj": "mlp.c_proj",
}
_CONV1D = frozenset({"attn.qkv", "attn.proj", "mlp.fc", "mlp.proj"})
_HEAD = "lm_head.weight"
_GPT_BLOCK = re.compile(r"blocks\.(\d+)\.(.+)")
_GPT2_BLOCK = re.compile(r"transformer\.h\.(\d+)\.(.+)")
# Causal-mask buffers that older GPT-2 checkpoints (OpenAI's among them) carry; SDPA needs none.
_GPT2_MASK_BUFFER = re.compile(r"transformer\.h\.\d+\.attn\.(bias|masked_bias)")


@dataclass(frozen=True, kw_only=True)
class GPT2Tensor:
    """One tensor of a GPT-2 state dict, and where it comes from in GPT's."""

    name: str
    shape: tuple[int, ...]
    source: str | None  # GPT's name; None for a zero bias that a GPT with bias=False does not have
    transposed: bool  # a Conv1D weight: GPT's nn.Linear weight transposed


def gpt2_layout(shapes: Mapping[str, Sequence[int]]) -> list[GPT2Tensor]:
    """The GPT-2 tensors a GPT state dict with these names and shapes becomes, in GPT's order.

    Reads no tensor: an exporter plans its files from this and reads each tensor as it writes it.
    """
    layout = []
    for name, shape in shapes.items():
        if name == _HEAD:
            continue  # tied to the token embedding
        module, _, kind = name.rpartition(".")
        gpt2_module, conv1d = _gpt2_module(module)
        layout.append(
            GPT2Tensor(
                name=f"{gpt2_module}.{kind}",
                shape=tuple(reversed(shape)) if conv1d else tuple(shape),
                source=name,
                transposed=conv1d and kind == "weight",
            )
        )
        has_bias = module not in ("tok_emb", "pos_emb")
        if kind == "weight" and has_bias and f"{module}.bias" not in shapes:
            layout.append(GPT2Tensor(name=f"{gpt2_module}.bias", shape=(shape[0],), source=None, transposed=False))
    return layout


def gpt2_tensor(entry: GPT2Tensor, read: Callable[[str], torch.Tensor]) -> torch.Tensor:
    """The tensor ``entry`` names, from GPT's tensors (``read(name)``); a zero bias is float32."""
    if entry.source is None:
        return torch.zeros(entry.shape)
    tensor = read(entry.source)
    return tensor.t().contiguous() if entry.transposed else tensor


def gpt_to_gpt2(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A GPT state dict as ``GPT2LMHeadModel``'s, the tied ``lm_head.weight`` left out."""
    dtype = state["tok_emb.weight"].dtype
    layout = gpt2_layout({name: tensor.shape for name, tensor in state.items()})
    return {entry.name: gpt2_tensor(entry, state.__getitem__).to(dtype) for entry in layout}


def gpt2_to_gpt(state: Mapping[str, torch.Tensor], *, bias: bool, source: str) -> dict[str, torch.Tensor]:
    """A GPT-2 state dict (``transformer.*`` names, or ``GPT2Model``'s bare ones) as GPT's.

    Args:
        state: GPT-2's tensors; ``lm_head.weight``, if there, must equal the token embedding (GPT ties them).
        bias: the GPT's ``model.bias``; without biases, GPT-2's must be zero (an export of such a GPT).
        source: what ``state`` was read from, for errors.
    """
    named = {
        name if name.startswith(("transformer.", "lm_head.")) else f"transformer.{name}": tensor
        for name, tensor in state.items()
    }
    gpt: dict[str, torch.Tensor] = {}
    for name, tensor in named.items():
        if name == _HEAD or _GPT2_MASK_BUFFER.fullmatch(name):
            continue
        module, _, kind = name.rpartition(".")
        gpt_module, conv1d = _gpt_module(module, source=source)
        if kind == "bias" and not bias:
            if torch.count_nonzero(tensor):
                raise UserError(
                    f"{source}: {name} is not zero, and model.bias=false has no biases; use model.bias=true"
                )
            continue
        gpt[f"{gpt_module}.{kind}"] = tensor.t().contiguous() if conv1d and kind == "weight" else tensor
    if "tok_emb.weight" not in gpt:
        raise UserError(f"{source}: no transformer.wte.weight: not a GPT-2 state dict")
    head = named.get(_HEAD)
    if head is not None and not torch.equal(head, gpt["tok_emb.weight"]):
        raise UserError(f"{source}: lm_head.weight differs from transformer.wte.weight; model=gpt ties them")
    gpt[_HEAD] = gpt["tok_emb.weight"]
    return gpt


def gpt2_config(cfg: GPTConfig, *, vocab_size: int, block_size: int) -> dict[str, Any]:
    """GPT-2's ``config.json`` fields for a GPT (``vocab_size`` and ``block_size`` as built)."""
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": vocab_size,
        "n_positions": block_size,
        "n_embd": cfg.n_embd,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_inner": 4 * cfg.n_embd,
        "activation_function": "gelu",
        "layer_norm_epsilon": LAYER_NORM_EPS,
        "resid_pdrop": cfg.dropout,
        "embd_pdrop": cfg.dropout,
        "attn_pdrop": cfg.dropout,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": True,
        "bos_token_id": None,
        "eos_token_id": None,
    }


def gpt_config(gpt2: Mapping[str, Any], *, source: str) -> GPTConfig:
    """The GPT settings of a GPT-2 ``config.json`` (biases on); ``UserError`` naming the field GPT cannot express.

    Args:
        gpt2: the parsed ``config.json``.
        source: the file, for errors.
    """

    def field(name: str, default: Any) -> Any:
        return gpt2.get(name, default)

    if field("model_type", None) != "gpt2":
        raise UserError(f"{source}: model_type={field('model_type', None)!r}, not gpt2")
    n_embd = field("n_embd", 768)
    # GPT2Config's defaults where the file leaves a field out; the value GPT has, and why it matters.
    required = {
        "activation_function": (
            "gelu_new",
            "gelu",
            "model=gpt uses the exact GELU; OpenAI's GPT-2 weights use the tanh approximation: load them with model=hf",
        ),
        "n_inner": (None, 4 * n_embd, "model=gpt's MLP is 4 x n_embd wide"),
        "layer_norm_epsilon": (LAYER_NORM_EPS, LAYER_NORM_EPS, "model=gpt's LayerNorms use eps 1e-5"),
        "scale_attn_weights": (True, True, "model=gpt scales attention by 1/sqrt(head_dim)"),
        "scale_attn_by_inverse_layer_idx": (False, False, "model=gpt does not scale attention by layer"),
        "add_cross_attention": (False, False, "model=gpt has no cross-attention"),
        "tie_word_embeddings": (True, True, "model=gpt ties its head to the token embedding"),
    }
    for name, (default, allowed, why) in required.items():
        value = field(name, default)
        if name == "n_inner" and value is None:
            value = allowed
        if value != allowed:
            raise UserError(f"{source}: {name}={value!r} cannot be loaded as model=gpt ({why})")
    dropouts = {name: field(name, 0.1) for name in ("resid_pdrop", "embd_pdrop", "attn_pdrop")}
    if len(set(dropouts.values())) > 1:
        raise UserError(f"{source}: {dropouts} differ; model=gpt has one model.dropout for all three")
    try:
        return GPTConfig(
            n_layer=field("n_layer", 12),
            n_head=field("n_head", 12),
            n_embd=n_embd,
            dropout=float(dropouts["resid_pdrop"]),
            bias=True,
            vocab_size=field("vocab_size", 50257),
            block_size=field("n_positions", 1024),
        )
    except (TypeError, ValueError) as exc:  # a size that is not a positive integer, say
        raise UserError(f"{source}: not a GPT-2 config that model=gpt can load ({exc})") from None


# GPT's sizes, and what GPT-2's config.json calls them.
_SIZES = {
    "n_layer": "n_layer",
    "n_head": "n_head",
    "n_embd": "n_embd",
    "vocab_size": "vocab_size",
    "block_size": "n_positions",
}


def gpt_pretrained_config(cfg: GPTConfig) -> GPTConfig:
    """``cfg`` with the sizes of ``model.pretrained``'s config.json; ``UserError`` naming the key and the file
    where ``cfg`` sets one to something else (conf/model/gpt.yaml fills them in from the file)."""
    assert cfg.pretrained, "only a GPT with model.pretrained has a config.json"
    directory = pretrained_dir(cfg.pretrained)
    source = directory / CONFIG_FILE
    found = gpt_config(read_config(directory), source=f"model.pretrained: {source}")
    for key, gpt2_key in _SIZES.items():
        given, value = getattr(cfg, key), getattr(found, key)
        if given is not None and given != value:
            raise UserError(
                f"model.{key}={given} contradicts model.pretrained={cfg.pretrained} ({source}: "
                f"{gpt2_key}={value}); leave model.{key} out, or use model=gpt, which takes every size "
                f"from config.json"
            )
    return dataclasses.replace(cfg, **{key: getattr(found, key) for key in _SIZES})


def gpt2_weights(cfg: GPTConfig, model: nn.Module) -> SafetensorsWeights:
    """``model.pretrained``'s GPT-2 tensors under the names of ``model`` (a GPT; meta-device will do), Conv1D
    weights transposed as they are read.

    A GPT without biases (``model.bias=false``) takes the file's biases only if they are zero, as an export of
    such a GPT writes them; ``UserError`` naming the file otherwise. Reads those biases, and no other tensor.
    """
    assert cfg.pretrained, "only a GPT with model.pretrained has weights to read"
    layout = gpt2_layout(state_shapes(model))
    weights = SafetensorsWeights(
        pretrained_dir(cfg.pretrained),
        names={entry.source: entry.name for entry in layout if entry.source is not None},
        aliases={_HEAD: "tok_emb.weight"},  # transformers ties the head on load; so does GPT
        transposed=frozenset(entry.source for entry in layout if entry.transposed and entry.source is not None),
    )
    for entry in layout:
        bias = weights.read_stored(entry.name) if entry.source is None else None
        if bias is not None and torch.count_nonzero(bias):
            raise UserError(
                f"model.pretrained: {weights.file_of(entry.name)}: {entry.name} is not zero, and "
                f"model.bias=false has no biases; use model.bias=true"
            )
    return weights


def _gpt2_module(module: str) -> tuple[str, bool]:
    """GPT-2's name for a GPT module, and whether it is a Conv1D."""
    if module in _TOP:
        return _TOP[module], False
    match = _GPT_BLOCK.fullmatch(module)
    if match is None or match.group(2) not in _BLOCK:
        raise ValueError(f"{module} is not a module of model=gpt")
    index, inner = match.groups()
    return f"transformer.h.{index}.{_BLOCK[inner]}", inner in _CONV1D


def _gpt_module(module: str, *, source: str) -> tuple[str, bool]:
    """GPT's name for a GPT-2 module, and whether it is a Conv1D."""
    top = {gpt2: gpt for gpt, gpt2 in _TOP.items()}
    if module in top:
        return top[module], False
    block = {gpt2: gpt for gpt, gpt2 in _BLOCK.items()}
    match = _GPT2_BLOCK.fullmatch(module)
    if match is None or match.group(2) not in block:
        raise UserError(f"{source}: {module} is not a GPT-2 module that model=gpt has")
    index, inner = match.groups()
    return f"blocks.{index}.{block[inner]}", block[inner] in _CONV1D
