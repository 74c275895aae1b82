"""What each model exports as: the transformers class that loads it, its ``config.json`` and its tensors.

- ``model=gpt``: GPT-2 (``GPT2LMHeadModel``), through ``models.gpt2_format``;
- ``model=hf``: the transformers model it wraps (``HFCausalLM.model``), names less the wrapper's ``model.``.

Both leave out the weights transformers ties on load (the head, when tied to the token embedding): a file
holding them too would load, but ``save_pretrained`` writes them once and so does this.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any, Iterator

import torch
from torch import nn

from orchestrator.config.schema import Config, GPTConfig, HFConfig, SampleKind
from orchestrator.data.spec import DataSpec
from orchestrator.errors import UserError
from orchestrator.export.safetensors_files import OutTensor
from orchestrator.models import build_model, meta_device
from orchestrator.models.gpt2_format import gpt2_config, gpt2_layout, gpt2_tensor
from orchestrator.models.recipe import WeightSource, shape_mismatch, state_shapes


@dataclass(frozen=True, kw_only=True)
class ModelExport:
    """A run's model as transformers will load it."""

    architecture: str  # the transformers class
    config: dict[str, Any]  # config.json; bos/eos token ids None where the tokenizer decides them
    tensors: list[OutTensor]  # in the checkpoint's dtypes
    max_length: int  # the longest sequence it was built for
    module_names: dict[str, str]  # the run's module name -> transformers' (for LoRA adapters)
    conv1d: bool = False  # its linear layers are GPT-2's Conv1D (weights stored transposed)


def gpt_export(config: Config, weights: WeightSource, *, source: str) -> ModelExport:
    """``model=gpt`` as ``GPT2LMHeadModel``."""
    assert isinstance(config.model, GPTConfig)  # EXPORTS["gpt"]
    rows = _shape(weights, "tok_emb.weight", source=source)[0]
    model = _built(config, vocab_size=rows)
    shapes = _in_model_order(model, weights, source=source)
    dtypes = weights.dtypes()
    layout = gpt2_layout(shapes)
    tensors = [
        OutTensor(
            name=entry.name,
            shape=entry.shape,
            read=partial(gpt2_tensor, entry, weights.read),
            dtype=dtypes[entry.source] if entry.source else torch.float32,
        )
        for entry in layout
    ]
    modules = {
        entry.source.removesuffix(".weight"): entry.name.removesuffix(".weight")
        for entry in layout
        if entry.source and entry.source.endswith(".weight")
    }
    return ModelExport(
        architecture="GPT2LMHeadModel",
        tensors=tensors,
        max_length=model.block_size,
        config=gpt2_config(config.model, vocab_size=rows, block_size=model.block_size),
        module_names=modules,
        conv1d=True,
    )


def hf_export(config: Config, weights: WeightSource, *, source: str) -> ModelExport:
    """``model=hf`` as the transformers model it wraps."""
    assert isinstance(config.model, HFConfig)  # EXPORTS["hf"]
    with _quiet_transformers():  # a stand-in vocabulary of 1 makes configs warn about their token ids
        stand_in = _built(config, vocab_size=1)
    embedding = stand_in.model.get_input_embeddings().weight
    embedding_name = next(name for name, param in stand_in.named_parameters() if param is embedding)
    model = _built(config, vocab_size=_shape(weights, embedding_name, source=source)[0])
    shapes = _in_model_order(model, weights, source=source)
    hf_model = model.model
    tied = set(getattr(hf_model, "all_tied_weights_keys", None) or {})  # {tied name: the name it is tied to}
    prefix = "model."
    dtypes = weights.dtypes()
    tensors = [
        OutTensor(name=name[len(prefix) :], shape=tuple(shape), dtype=dtypes[name], read=partial(weights.read, name))
        for name, shape in shapes.items()
        if name[len(prefix) :] not in tied
    ]
    architecture = type(hf_model).__name__
    hf_config = json.loads(hf_model.config.to_json_string())  # as save_pretrained writes it: what differs from defaults
    hf_config["architectures"] = [architecture]
    for key in ("bos_token_id", "eos_token_id"):
        # Ids set in model.config, or by model.pretrained's config.json (with its tokenizer), stay; the model
        # type's defaults are not the run's tokenizer's.
        if key not in config.model.config and not config.model.pretrained:
            hf_config[key] = None
    max_length = getattr(hf_model.config, "max_position_embeddings", None) or config.data.seq_len_or_none
    assert max_length is not None  # model=hf trains on token data, which has a seq_len
    modules = {name: name[len(prefix) :] for name, _ in model.named_modules() if name.startswith(prefix)}
    return ModelExport(
        architecture=architecture, config=hf_config, tensors=tensors, max_length=max_length, module_names=modules
    )


EXPORTS: dict[str, Callable[..., ModelExport]] = {"gpt": gpt_export, "hf": hf_export}


def _built(config: Config, *, vocab_size: int) -> nn.Module:
    """The run's model on the meta device, for data of ``vocab_size`` tokens and the run's sequence length."""
    data = DataSpec(kind=SampleKind.tokens, vocab_size=vocab_size, seq_len=config.data.seq_len_or_none)
    with meta_device():
        return build_model(config.model, data)


def _shape(weights: WeightSource, name: str, *, source: str) -> list[int]:
    shapes = weights.shapes()
    if name not in shapes:
        raise UserError(f"{source}: the checkpoint has no {name}: it is not of the model in its run's config.yaml")
    return shapes[name]


def _in_model_order(model: nn.Module, weights: WeightSource, *, source: str) -> dict[str, list[int]]:
    """The checkpoint's tensor shapes in the model's state-dict order (every strategy's export is then the
    same files); ``UserError`` when they are not the model's."""
    shapes = state_shapes(model)
    mismatch = shape_mismatch(shapes, weights.shapes())
    if mismatch:
        raise UserError(f"{source}: the checkpoint is not of the model in its run's config.yaml ({mismatch})")
    return shapes


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    from transformers.utils import logging as hf_logging  # model=hf needs transformers; the rest does not

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
