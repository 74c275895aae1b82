"""Sharded initialization: under fsdp2 and zero3 no rank ever holds the whole model while it is built.

A ~1B-parameter GPT (4.1 GB in fp32) on 2 ranks: each rank's peak resident memory while the strategy
builds and shards it grows by about its half of the weights (its shard, plus one parameter or block
at a time, and what the allocator keeps of freed blocks), never by the whole model, as it would if
every rank built the model and then sharded it (measured: about 0.5-0.66 of the model, against 1.0+).
"""

from __future__ import annotations

import os
import resource
from functools import partial

import psutil
import pytest
import torch

from orchestrator.config.compose import compose, to_config
from orchestrator.data import load_data
from orchestrator.distributed import DistContext
from orchestrator.models import build_model, model_blocks
from orchestrator.models.recipe import ModelRecipe
from orchestrator.strategies import build_strategy
from tests.distributed.ranks import run_ranks

ONE_BILLION = [
    "model=gpt_tiny",
    "model.n_layer=20",
    "model.n_embd=2048",
    "model.n_head=16",
    "data=synthetic_tokens",
    "data.vocab_size=4096",
    "data.seq_len=128",
]


def _build_peak(dist: DistContext, strategy_name: str) -> dict[str, int]:
    os.environ["DS_ACCELERATOR"] = "cpu"
    config = to_config(compose([*ONE_BILLION, f"strategy={strategy_name}", "scheduler.warmup_steps=0"]))
    data = load_data(config.data)
    recipe = ModelRecipe(
        build=partial(build_model, config.model, data.spec), blocks=partial(model_blocks, config.model)
    )
    torch.manual_seed(0)
    strategy = build_strategy(config, dist=dist)
    before = psutil.Process().memory_info().rss
    resource.getrusage(resource.RUSAGE_SELF)  # ru_maxrss is this process's peak so far
    model = strategy.build_model(recipe)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    full = (
        sum(p.numel() for p in model.parameters()) * 4
        if strategy_name != "zero3"
        else sum(p.ds_numel for p in model.parameters()) * 4
    )
    return {"before": before, "peak": peak, "full": full}


@pytest.mark.slow
@pytest.mark.parametrize("strategy_name", ["fsdp2", "zero3"])
def test_no_rank_builds_the_whole_model(strategy_name: str) -> None:
    for rank, measured in enumerate(run_ranks(_build_peak, strategy_name)):
        assert measured["full"] > 4e9  # the model really is ~1B parameters in fp32
        grown = measured["peak"] - measured["before"]
        assert grown < 0.75 * measured["full"], (
            f"rank {rank} grew by {grown / 2**30:.2f} GiB building a {measured['full'] / 2**30:.2f} GiB model"
        )
