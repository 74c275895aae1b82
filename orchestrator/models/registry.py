"""Models by name: how to build each, which of its modules repeat, and what a token of training costs.

The rest of the package sees models only through these three functions. Strategies get the block list and
wrap each block (activation checkpointing, compile, FSDP2); throughput and estimates get ``ModelInfo``.

Every model built here maps ``inputs`` to logits (token models: (B, T) int64 to (B, T, vocab); image models:
(B, *input_shape) float32 to (B, num_classes)) and has ``init_weights()``, which initializes every parameter
and buffer from torch's global RNG. That makes the large-model path work: build under
``meta_device()`` (nothing allocated), shard, ``model.to_empty(device=...)``, ``model.init_weights()``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from orchestrator.config.schema import ModelConfig
from orchestrator.data.spec import DataSpec
from orchestrator.errors import UserError
from orchestrator.models import cnn, gpt, hf, lstm, mlp
from orchestrator.models.recipe import WeightSource


@dataclass(frozen=True, kw_only=True)
class ModelInfo:
    """Sizes and costs of one model, for throughput (MFU) and memory estimates."""

    num_params: int  # all parameters, trainable and frozen, tied weights counted once
    num_trainable_params: int  # those that get gradients (the adapters alone under LoRA)
    num_non_embedding_params: int  # less token and learned position embeddings; == num_params for image models
    flops_per_token: float  # training FLOPs (forward + backward) per token; per sample for image models
    tokens_per_sample: int  # seq_len for language models, 1 for image models


@dataclass(frozen=True, kw_only=True)
class _ModelSpec:
    build: Callable[[Any, DataSpec], nn.Module]
    blocks: Callable[[Any], list[nn.Module]]
    flops_per_token: Callable[..., float]  # (cfg, data, model, *, non_embedding_params) -> FLOPs
    pretrained: Callable[[Any, nn.Module], WeightSource | None] | None = None  # model.pretrained's weights


_MODELS: dict[str, _ModelSpec] = {
    "cnn": _ModelSpec(build=cnn.build_cnn, blocks=cnn.cnn_blocks, flops_per_token=cnn.cnn_flops_per_token),
    "gpt": _ModelSpec(
        build=gpt.build_gpt,
        blocks=gpt.gpt_blocks,
        flops_per_token=gpt.gpt_flops_per_token,
        pretrained=gpt.gpt_pretrained_weights,
    ),
    "hf": _ModelSpec(
        build=hf.build_hf,
        blocks=hf.hf_blocks,
        flops_per_token=hf.hf_flops_per_token,
        pretrained=hf.hf_pretrained_weights,
    ),
    "lstm": _ModelSpec(build=lstm.build_lstm, blocks=lstm.lstm_blocks, flops_per_token=lstm.lstm_flops_per_token),
    "mlp": _ModelSpec(build=mlp.build_mlp, blocks=mlp.mlp_blocks, flops_per_token=mlp.mlp_flops_per_token),
}


def _spec(cfg: ModelConfig) -> _ModelSpec:
    if cfg.name not in _MODELS:
        raise UserError(f"model.name={cfg.name!r} is not a model; choose one of: {', '.join(sorted(_MODELS))}")
    return _MODELS[cfg.name]


def build_model(cfg: ModelConfig, data: DataSpec) -> nn.Module:
    """Builds the model ``cfg`` names, sized for ``data``, and initializes it from torch's global RNG.

    Builds on whatever device is current: under ``with meta_device():`` nothing is allocated, which
    is how a 70B model's parameters are counted in seconds. Two builds under the same ``torch.manual_seed``
    give identical weights.

    Args:
        cfg: the model settings; ``cfg.name`` picks the model.
        data: what the dataset yields.

    Raises:
        UserError: the name is unknown, or the model cannot train on this data.
    """
    spec = _spec(cfg)
    if data.kind is not cfg.input_kind:
        raise UserError(f"model={cfg.name} trains on {cfg.input_kind.value} but the data yields {data.kind.value}")
    model = spec.build(cfg, data)
    model.init_weights()
    return model


def pretrained_weights(cfg: ModelConfig, model: nn.Module) -> WeightSource | None:
    """The weights ``model.pretrained`` names, under ``model``'s state-dict names, or None without one.

    Args:
        cfg: the model settings.
        model: the model ``build_model`` returned (a meta-device build will do: nothing is read yet).
    """
    loader = _spec(cfg).pretrained
    return loader(cfg, model) if loader is not None else None


def model_blocks(cfg: ModelConfig, model: nn.Module) -> list[nn.Module]:
    """The repeated blocks that sharding, activation checkpointing and compilation wrap one by one.

    GPT's transformer blocks, the decoder layers of a transformers model, the CNN's residual blocks, the LSTM
    layers, the MLP's hidden layers; in forward order.

    Args:
        cfg: the settings the model was built from.
        model: the model ``build_model`` returned, before any wrapping.
    """
    return _spec(cfg).blocks(model)


def describe_model(cfg: ModelConfig, data: DataSpec, model: nn.Module) -> ModelInfo:
    """Parameter counts and training FLOPs per token of a built model (on any device, meta included).

    Args:
        cfg: the settings the model was built from.
        data: what the dataset yields (the sequence length sets attention's cost).
        model: the model ``build_model`` returned.
    """
    num_params = sum(p.numel() for p in model.parameters())  # parameters() yields a tied tensor once
    embeddings = {module.weight for module in model.modules() if isinstance(module, nn.Embedding)}
    non_embedding_params = num_params - sum(weight.numel() for weight in embeddings)
    flops = _spec(cfg).flops_per_token(cfg, data, model, non_embedding_params=non_embedding_params)
    return ModelInfo(
        num_params=num_params,
        num_trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
        num_non_embedding_params=non_embedding_params,
        flops_per_token=float(flops),
        tokens_per_sample=data.tokens_per_sample,
    )
