"""Every strategy on 2 gloo ranks trains GPT and a Llama (transformers) to the same losses as DDP,
with activation checkpointing on or off, through the one Strategy protocol the loop uses."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F

from orchestrator.config.compose import compose, to_config
from orchestrator.data import load_data, prepare_data
from orchestrator.distributed import DistContext
from orchestrator.models import build_model, model_blocks
from orchestrator.models.recipe import ModelRecipe
from orchestrator.strategies import build_strategy
from orchestrator.train.optim import build_optimizer
from tests.distributed.ranks import run_ranks

STRATEGIES = ["ddp", "fsdp2", "zero0", "zero1", "zero2", "zero3"]
MODELS = {
    "gpt": ["model=gpt_tiny", "model.n_embd=32"],
    "llama": ["model=llama_tiny", "model.config.hidden_size=32", "model.config.intermediate_size=64",
              "model.config.num_attention_heads=2", "model.config.num_key_value_heads=1"],
}


def _losses(dist: DistContext, model: str, activation_checkpointing: bool) -> dict[str, list[float]]:
    import os

    os.environ["DS_ACCELERATOR"] = "cpu"
    out = {}
    for strategy_name in STRATEGIES:
        config = to_config(compose([*MODELS[model], "data=synthetic_tokens", "data.vocab_size=128",
                                    "data.seq_len=16", f"strategy={strategy_name}",
                                    f"strategy.activation_checkpointing={str(activation_checkpointing).lower()}",
                                    "trainer.global_batch_size=8", "trainer.micro_batch_size=2",
                                    "scheduler.warmup_steps=0"]))
        data = load_data(config.data)
        recipe = ModelRecipe(build=partial(build_model, config.model, data.spec),
                             blocks=partial(model_blocks, config.model))
        torch.manual_seed(0)
        strategy = build_strategy(config, dist=dist)
        strategy.setup(recipe, build_optimizer=partial(build_optimizer, config.optim))
        losses = []
        for _ in range(3):
            total = 0.0
            for micro in range(config.grad_accum_steps):  # 2 micro-batches per rank
                index = (dist.rank * 2 + micro) * 2  # the same global batch every step: the loss must fall
                inputs, targets = data.train.get_batch(torch.arange(index, index + 2).numpy())
                with strategy.accumulate(sync=micro == config.grad_accum_steps - 1):
                    with strategy.autocast():
                        loss = F.cross_entropy(strategy.model(inputs).flatten(0, 1).float(), targets.flatten())
                    strategy.backward(loss)
                total += loss.item()
            outcome = strategy.step(lr=1e-2, max_norm=1.0, guard=math.isfinite)
            assert outcome.applied
            losses.append(total)
        out[strategy_name] = losses
    return out


@pytest.mark.parametrize(("model", "activation_checkpointing"), [("gpt", False), ("llama", True)])
def test_every_strategy_trains_to_the_same_losses(model: str, activation_checkpointing: bool) -> None:
    prepare_data(to_config(compose(["data=synthetic_tokens", "data.vocab_size=128", "data.seq_len=16"])).data)
    per_rank = run_ranks(_losses, model, activation_checkpointing)
    for losses in per_rank:
        reference = losses["ddp"]
        assert reference[-1] < reference[0]  # it learns
        for name in STRATEGIES:
            assert losses[name] == pytest.approx(reference, rel=1e-5), name
