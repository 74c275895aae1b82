"""HF: any transformers causal language model (llama, qwen2, mistral, gpt2, ...) built from a config dict.

Weights are always initialized here, never downloaded: the model is made with ``from_config``, which reads no
files and opens no connections. transformers is an optional extra, imported only when a model is built.
"""

from __future__ import annotations

from itertools import chain
from typing import Any

import torch
from torch import nn

from orchestrator.config.schema import HFConfig
from orchestrator.data.spec import DataSpec
from orchestrator.errors import UserError
from orchestrator.models.pretrained import SafetensorsWeights, pretrained_dir, read_config


class HFCausalLM(nn.Module):
    """Maps token ids (B, T) to next-token logits (B, T, vocab_size), like every other token model here."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        # No labels: the training loop computes the loss. No cache: it only serves generation.
        return self.model(input_ids=inputs, use_cache=False).logits

    @torch.no_grad()
    def init_weights(self) -> None:
        """The model's own initialization (its ``_init_weights``), weights tied, from torch's global RNG."""
        # transformers flags each module and tensor it has initialized and skips it on later calls; clearing the
        # flags makes this a real re-initialization (after model.to_empty(), say).
        for item in chain(self.model.modules(), self.model.parameters(), self.model.buffers()):
            item.__dict__.pop("_is_hf_initialized", None)
        # model.to_empty() unties the head from the embedding; tie them again before drawing any weights, so that
        # the draws happen in the same order as in a fresh build and give the same weights.
        self.model.tie_weights()
        self.model.init_weights()


def build_hf(cfg: HFConfig, data: DataSpec) -> HFCausalLM:
    """A transformers causal LM from ``cfg.config``, with the data's vocabulary and sequence length filled in.

    Args:
        cfg: the model settings; ``cfg.config`` is what ``transformers.AutoConfig.for_model`` takes.
        data: the token data it trains on.
    """
    try:
        import transformers
    except ImportError as error:
        raise UserError("model=hf needs transformers: pip install 'orchestrator[hf]'") from error

    settings = _pretrained_settings(cfg, cfg.pretrained) if cfg.pretrained else dict(cfg.config)
    model_type = settings.pop("model_type", None)
    if model_type not in transformers.CONFIG_MAPPING:
        key = "model.pretrained's config.json: model_type" if cfg.pretrained else "model.config.model_type"
        raise UserError(f"{key}={model_type!r} is not a transformers model type")
    # A config class may call a standard field by its own name (gpt2: n_positions for max_position_embeddings).
    aliases = transformers.CONFIG_MAPPING[model_type].attribute_map
    for name, value in (("vocab_size", data.vocab_size), ("max_position_embeddings", data.seq_len)):
        if name not in settings and aliases.get(name, name) not in settings:
            settings[aliases.get(name, name)] = value
    try:
        config = transformers.AutoConfig.for_model(model_type, **settings)
    except Exception as error:  # its validators raise TypeError, ValueError or huggingface_hub's own errors
        raise UserError(f"model.config is not a valid {model_type} config: {error}") from error

    if type(config) not in transformers.MODEL_FOR_CAUSAL_LM_MAPPING:
        raise UserError(f"model.config.model_type={model_type!r} has no causal language model in transformers")
    data.model_vocab_size(config.vocab_size, key="model.config.vocab_size")
    max_positions = getattr(config, "max_position_embeddings", None)
    if max_positions is not None and max_positions < data.seq_len:
        raise UserError(
            f"model.config.max_position_embeddings={max_positions} is shorter than data.seq_len={data.seq_len}"
        )
    try:
        model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=cfg.attn_implementation)
    except ValueError as error:  # e.g. a model type without an sdpa implementation
        raise UserError(f"model=hf cannot build {model_type}: {error}") from error
    return HFCausalLM(model)


# config.json entries that describe the file, not the architecture (the weights are loaded into fp32).
_FILE_FIELDS = ("architectures", "transformers_version", "torch_dtype", "dtype", "_name_or_path")


def _pretrained_settings(cfg: HFConfig, pretrained: str) -> dict[str, Any]:
    """The architecture of ``model.pretrained``: its config.json, which ``model.config`` may repeat, not change."""
    directory = pretrained_dir(pretrained)
    settings = {k: v for k, v in read_config(directory).items() if k not in _FILE_FIELDS}
    for name, value in cfg.config.items():
        if settings.get(name, value) != value or name not in settings:
            found = f"{settings[name]!r} there" if name in settings else "absent there"
            raise UserError(
                f"model.config.{name}={value!r} contradicts model.pretrained={cfg.pretrained} "
                f"(config.json: {found}); leave model.config out to use the pretrained architecture"
            )
    return settings


def hf_pretrained_weights(cfg: HFConfig, model: HFCausalLM) -> SafetensorsWeights | None:
    """The weights of ``model.pretrained`` under this wrapper's state-dict names (``model.`` + the file's), or
    None without one. ``model`` may be a meta-device build: only names and tied parameters are read."""
    if not cfg.pretrained:
        return None
    names = {name: name.removeprefix("model.") for name in model.state_dict()}
    # A tied head is stored once (save_pretrained leaves lm_head.weight out): each alias reads its partner.
    first_name: dict[int, str] = {}
    aliases = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        aliases.update({name: first_name[id(parameter)]} if id(parameter) in first_name else {})
        first_name.setdefault(id(parameter), name)
    return SafetensorsWeights(pretrained_dir(cfg.pretrained), names=names, aliases=aliases)


def hf_blocks(model: HFCausalLM) -> list[nn.Module]:
    """The decoder layers: the largest ``nn.ModuleList`` whose entries are all of one class.

    That is ``model.layers`` for llama, qwen2 and mistral and ``transformer.h`` for gpt2, found without a table
    of architectures; "largest" by parameter count, so a longer list of small modules does not win.
    """
    candidates = [
        module
        for module in model.modules()
        if isinstance(module, nn.ModuleList) and len(module) > 0 and len({type(layer) for layer in module}) == 1
    ]
    if not candidates:
        raise UserError(f"model=hf: found no list of repeated layers in {type(model.model).__name__}")
    largest = max(candidates, key=lambda layers: sum(p.numel() for p in layers.parameters()))
    return list(largest)


def hf_flops_per_token(cfg: HFConfig, data: DataSpec, model: HFCausalLM, *, non_embedding_params: int) -> float:
    """Training FLOPs per token: 6N for the weights plus 12 L H Q T for attention (PaLM, appendix B).

    N counts the head once when it is tied to the token embedding (a lookup going in, a matmul coming out).
    For mixture-of-experts models N counts every expert, so this overestimates by the share left idle.

    Args:
        cfg: the model settings.
        data: the token data, for its sequence length.
        model: the built model; its config has every field filled in.
        non_embedding_params: parameters less token and learned position embeddings.
    """
    config = model.model.config
    head = model.model.get_output_embeddings()
    tied_head = head is not None and head.weight is model.model.get_input_embeddings().weight
    head_params = head.weight.numel() if tied_head else 0
    num_heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
    attention = 12 * config.num_hidden_layers * num_heads * head_dim * data.seq_len
    return 6 * (non_embedding_params + head_params) + attention
