"""LSTM: a recurrent language model, token embedding -> stacked LSTM -> linear head.

The stack is a list of single-layer ``nn.LSTM`` modules rather than one multi-layer ``nn.LSTM``. That makes
each layer a block that FSDP2 can shard on its own (one layer's weights gathered at a time, the next one's
prefetched while this one runs) and that activation checkpointing can wrap on its own; one multi-layer module
would be a single unit for both. The price is cuDNN's fused multi-layer kernel, which can overlap layers
within one call; for the few layers a language model this size has, that is small.
"""

from __future__ import annotations

import torch
from torch import nn

from orchestrator.config.schema import LSTMConfig
from orchestrator.data.spec import DataSpec


class LSTMLanguageModel(nn.Module):
    """Maps token ids (B, T) to next-token logits (B, T, vocab_size)."""

    def __init__(self, cfg: LSTMConfig, *, vocab_size: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, cfg.n_embd)
        widths = [cfg.n_embd] + [cfg.hidden_size] * (cfg.n_layer - 1)
        self.layers = nn.ModuleList(nn.LSTM(width, cfg.hidden_size, batch_first=True) for width in widths)
        self.dropout = nn.Dropout(cfg.dropout)  # between layers, where nn.LSTM(dropout=...) puts it
        self.head = nn.Linear(cfg.hidden_size, vocab_size)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        # Every sequence starts from a zero state: samples are independent windows of the corpus.
        x, _ = self.layers[0](self.embedding(inputs))
        for layer in self.layers[1:]:
            x, _ = layer(self.dropout(x))
        return self.head(x)

    @torch.no_grad()
    def init_weights(self) -> None:
        """torch's default initialization for every module, drawn from torch's global RNG."""
        self.embedding.reset_parameters()
        for layer in self.layers:
            layer.reset_parameters()
        self.head.reset_parameters()


def build_lstm(cfg: LSTMConfig, data: DataSpec) -> LSTMLanguageModel:
    """An LSTM language model over ``data``'s vocabulary unless ``cfg`` sets one.

    Args:
        cfg: the model settings.
        data: the token data it trains on.
    """
    vocab_size = data.model_vocab_size(cfg.vocab_size, key="model.vocab_size")
    return LSTMLanguageModel(cfg, vocab_size=vocab_size)


def lstm_blocks(model: LSTMLanguageModel) -> list[nn.Module]:
    """The LSTM layers, in order."""
    return list(model.layers)


def lstm_flops_per_token(
    cfg: LSTMConfig, data: DataSpec, model: LSTMLanguageModel, *, non_embedding_params: int
) -> float:
    """Training FLOPs per token: 6 per non-embedding parameter.

    Each LSTM step multiplies its input and its previous hidden state by the four gates' weights once per
    token, and the head multiplies once: every weight does one multiply-add per token forward (2 FLOPs) and
    two backward (4 FLOPs, for the input and the weight gradients). The gates' elementwise work is O(hidden)
    per token against O(hidden^2) for the matmuls, and the embedding is a lookup.

    Args:
        cfg: the model settings.
        data: the token data.
        model: the built model.
        non_embedding_params: parameters less the token embedding.
    """
    return 6 * non_embedding_params
