"""MLP: a fully connected classifier or regressor over flattened images or feature vectors."""

from __future__ import annotations

import math

import torch
from torch import nn

from orchestrator.config.schema import MLPConfig
from orchestrator.data.spec import DataSpec


class MLP(nn.Module):
    """Maps samples (B, *input_shape) to (B, num_outputs): class logits, or one value per float target."""

    def __init__(self, cfg: MLPConfig, *, in_features: int, num_outputs: int) -> None:
        super().__init__()
        widths = [in_features, *cfg.hidden_sizes]
        self.hidden = nn.ModuleList(
            nn.Sequential(nn.Linear(width_in, width_out), nn.GELU(), nn.Dropout(cfg.dropout))
            for width_in, width_out in zip(widths[:-1], widths[1:])
        )
        self.head = nn.Linear(widths[-1], num_outputs)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        x = inputs.flatten(1)
        for layer in self.hidden:
            x = layer(x)
        return self.head(x)

    @torch.no_grad()
    def init_weights(self) -> None:
        """torch's default Linear initialization, drawn from torch's global RNG."""
        for layer in self.hidden:
            layer[0].reset_parameters()
        self.head.reset_parameters()


def build_mlp(cfg: MLPConfig, data: DataSpec) -> MLP:
    """An MLP over ``data``'s samples, whatever their shape.

    Args:
        cfg: the model settings.
        data: the image or feature-vector data it trains on; its targets set the outputs.
    """
    assert data.input_shape is not None  # image and feature-vector data have one (DataSpec)
    return MLP(cfg, in_features=math.prod(data.input_shape), num_outputs=data.num_outputs)


def mlp_blocks(model: MLP) -> list[nn.Module]:
    """The hidden layers, each a Linear, its activation and its dropout."""
    return list(model.hidden)


def mlp_flops_per_token(cfg: MLPConfig, data: DataSpec, model: MLP, *, non_embedding_params: int) -> float:
    """Training FLOPs per sample: 6 per parameter, since every weight does one multiply-add forward and two
    backward; activations and biases are a rounding error next to the matmuls.

    Args:
        cfg: the model settings.
        data: the data it trains on.
        model: the built model.
        non_embedding_params: all its parameters (an MLP has no embeddings).
    """
    return 6 * non_embedding_params
