"""GPT: a decoder-only transformer in the shape of GPT-2, written the way nanoGPT writes it.

Token and learned position embeddings, pre-LayerNorm blocks of causal self-attention and a 4x GELU MLP, a final
LayerNorm and a language-model head that shares its weight with the token embedding. The blocks sit in one
``nn.ModuleList`` so that sharding, activation checkpointing and compilation can wrap them one at a time.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from orchestrator.config.schema import GPTConfig
from orchestrator.data.spec import DataSpec
from orchestrator.errors import UserError
from orchestrator.models.gpt2_format import gpt2_weights, gpt_pretrained_config
from orchestrator.models.pretrained import SafetensorsWeights

INIT_STD = 0.02  # GPT-2's


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.dropout = cfg.dropout
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq_len, n_embd = x.shape
        # (B, T, 3C) -> three (B, n_head, T, head_dim), the layout scaled_dot_product_attention expects.
        q, k, v = self.qkv(x).view(batch, seq_len, 3, self.n_head, n_embd // self.n_head).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        y = y.transpose(1, 2).reshape(batch, seq_len, n_embd)
        return self.resid_dropout(self.proj(y))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))

    def init_weights(self, *, residual_std: float) -> None:
        self.ln_1.reset_parameters()
        self.ln_2.reset_parameters()
        _init_linear(self.attn.qkv, std=INIT_STD)
        _init_linear(self.mlp.fc, std=INIT_STD)
        _init_linear(self.attn.proj, std=residual_std)
        _init_linear(self.mlp.proj, std=residual_std)


class GPT(nn.Module):
    """Maps token ids (B, T) to next-token logits (B, T, vocab_size)."""

    def __init__(self, cfg: GPTConfig, *, vocab_size: int, block_size: int) -> None:
        super().__init__()
        self.block_size = block_size
        self.tok_emb = nn.Embedding(vocab_size, cfg.n_embd)
        self.pos_emb = nn.Embedding(block_size, cfg.n_embd)
        self.dropout = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.lm_head = nn.Linear(cfg.n_embd, vocab_size, bias=False)
        # Weight tying (Press & Wolf 2017): the head scores each token against its own embedding. It saves
        # vocab_size x n_embd parameters, a third of GPT-2 124M, and trains as well or better.
        self.lm_head.weight = self.tok_emb.weight

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        seq_len = inputs.shape[1]
        if seq_len > self.block_size:
            raise ValueError(f"sequence of length {seq_len} is longer than the model's block_size={self.block_size}")
        positions = torch.arange(seq_len, device=inputs.device)
        x = self.dropout(self.tok_emb(inputs) + self.pos_emb(positions))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))

    @torch.no_grad()
    def init_weights(self) -> None:
        """GPT-2's initialization, drawn from torch's global RNG.

        Residual projections get a std scaled by 1/sqrt(2 * n_layer): each block adds two of them to the
        residual stream, and the scaling keeps its variance from growing with depth.
        """
        # model.to_empty() gives every module its own new tensor, which unties the head from the embedding.
        self.lm_head.weight = self.tok_emb.weight
        nn.init.normal_(self.tok_emb.weight, std=INIT_STD)
        nn.init.normal_(self.pos_emb.weight, std=INIT_STD)
        residual_std = INIT_STD / math.sqrt(2 * len(self.blocks))
        for block in self.blocks:
            block.init_weights(residual_std=residual_std)
        self.ln_f.reset_parameters()


def _init_linear(linear: nn.Linear, *, std: float) -> None:
    nn.init.normal_(linear.weight, std=std)
    if linear.bias is not None:
        nn.init.zeros_(linear.bias)


def build_gpt(cfg: GPTConfig, data: DataSpec) -> GPT:
    """A GPT sized for ``data``: its vocabulary and sequence length unless ``cfg`` sets them, or
    ``model.pretrained``'s config.json does.

    Args:
        cfg: the model settings.
        data: the token data it trains on.
    """
    vocab_key, block_key = "model.vocab_size", "model.block_size"
    if cfg.pretrained:
        cfg = gpt_pretrained_config(cfg)
        vocab_key = f"model.pretrained={cfg.pretrained}: config.json's vocab_size"
        block_key = f"model.pretrained={cfg.pretrained}: config.json's n_positions"
    assert data.seq_len is not None  # token data has one (DataSpec)
    vocab_size = data.model_vocab_size(cfg.vocab_size, key=vocab_key)
    block_size = cfg.block_size or data.seq_len
    if data.seq_len > block_size:
        raise UserError(f"{block_key}={block_size} is shorter than data.seq_len={data.seq_len}")
    return GPT(cfg, vocab_size=vocab_size, block_size=block_size)


def gpt_pretrained_weights(cfg: GPTConfig, model: GPT) -> SafetensorsWeights | None:
    """The weights of ``model.pretrained`` (a GPT-2 directory) under GPT's names, or None without one.
    ``model`` may be a meta-device build: only names and shapes are read (and, without biases, the file's)."""
    return gpt2_weights(cfg, model) if cfg.pretrained else None


def gpt_blocks(model: GPT) -> list[nn.Module]:
    """The transformer blocks, in order."""
    return list(model.blocks)


def gpt_flops_per_token(cfg: GPTConfig, data: DataSpec, model: GPT, *, non_embedding_params: int) -> float:
    """Training FLOPs per token: 6N for the weights plus 12 L H Q T for attention (PaLM, appendix B).

    A weight costs 2 FLOPs per token forward and 4 backward. The tied token embedding is free as a lookup but
    does a full matmul as the head, so it counts here once, as nanoGPT's estimate_mfu counts it.

    Args:
        cfg: the model settings.
        data: the token data, for its sequence length.
        model: the built model.
        non_embedding_params: parameters less token and position embeddings.
    """
    assert data.seq_len is not None  # token data has one (DataSpec)
    head_params = model.lm_head.weight.numel()
    head_dim = cfg.n_embd // cfg.n_head
    return 6 * (non_embedding_params + head_params) + 12 * cfg.n_layer * cfg.n_head * head_dim * data.seq_len
