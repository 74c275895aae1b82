"""Peak host memory per rank while a ~1B-parameter GPT is set up, and through its first step, at 2 CPU ranks.

    python bench/sharded_init.py                          # ddp, fsdp2, zero3; setup, then one SGD step
    python bench/sharded_init.py --strategies fsdp2,zero3 --steps 0
    python bench/sharded_init.py --lora 16                # LoRA adapters (rank 16) on every block linear, Adam

Each strategy runs in fresh processes (2 gloo ranks, forked as launcher=local does), so each peak is
its own. Per rank: resident memory before setup, the peak after ``strategy.setup`` (model built,
sharded, optimizer created) and after the first optimizer step, against the model's full fp32 size.
The step uses SGD without momentum: Adam's 8 bytes per parameter would take a 1B model past this
machine's 24 GiB at 2 ranks under ddp, and the point here is what the build costs. With ``--lora`` the
step uses AdamW: only the adapters have optimizer state.
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import sys
from functools import partial
from pathlib import Path

import psutil

MODEL = [
    "model=gpt_tiny",
    "model.n_layer=20",
    "model.n_embd=2048",
    "model.n_head=16",
    "data=synthetic_tokens",
    "data.vocab_size=4096",
    "data.seq_len=128",
]
GIB = 2**30


def _measure(dist, strategy_name: str, steps: int, lora_rank: int) -> dict[str, float]:
    import torch
    import torch.nn.functional as F

    from orchestrator.config.compose import compose, to_config
    from orchestrator.data import load_data
    from orchestrator.models import build_model, model_blocks
    from orchestrator.models.lora import lora_for
    from orchestrator.models.recipe import ModelRecipe
    from orchestrator.strategies import build_strategy
    from orchestrator.train.optim import build_optimizer

    os.environ["DS_ACCELERATOR"] = "cpu"
    optim = [f"model.lora.rank={lora_rank}", "optim=adamw"] if lora_rank else ["optim=sgd"]
    config = to_config(
        compose(
            [
                *MODEL,
                *optim,
                f"strategy={strategy_name}",
                "scheduler.warmup_steps=0",
                "trainer.global_batch_size=2",
                "trainer.micro_batch_size=1",
            ]
        )
    )
    data = load_data(config.data)
    recipe = ModelRecipe(
        build=partial(build_model, config.model, data.spec),
        blocks=partial(model_blocks, config.model),
        adapters=lora_for(config.model),
    )
    torch.manual_seed(0)
    strategy = build_strategy(config, dist=dist)
    before = psutil.Process().memory_info().rss
    strategy.setup(recipe, build_optimizer=partial(build_optimizer, config.optim))
    setup_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    for _ in range(steps):
        inputs, targets = data.train.get_batch(torch.arange(dist.rank, dist.rank + 1).numpy())
        with strategy.accumulate(sync=True), strategy.autocast():
            loss = F.cross_entropy(strategy.model(inputs).flatten(0, 1).float(), targets.flatten())
        strategy.backward(loss)
        strategy.step(lr=1e-3, max_norm=1.0, guard=math.isfinite)
    step_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"before": before, "setup_peak": setup_peak, "step_peak": step_peak if steps else math.nan}


def main() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository: tests/ holds the rank runner
    from tests.distributed.ranks import run_ranks

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--strategies", default="ddp,fsdp2,zero3")
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--lora", type=int, default=0, metavar="RANK", help="LoRA adapters of this rank (0: none)")
    args = parser.parse_args()
    full = 4 * (20 * 12 * 2048 * 2048 + 20 * 13 * 2048 + 4096 * 2048 + 128 * 2048 + 2 * 2048)  # fp32 bytes, ~1.02B
    lora = f", LoRA rank {args.lora}" if args.lora else ""
    print(f"model: GPT 20 x 2048, {full / 4 / 1e9:.2f}B parameters, {full / GIB:.2f} GiB in fp32; 2 ranks{lora}\n")
    print("| strategy | rank | RSS before | peak after setup | (growth / full model) | peak after step |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in args.strategies.split(","):
        for rank, m in enumerate(run_ranks(_measure, name, args.steps, args.lora)):
            growth = (m["setup_peak"] - m["before"]) / full
            step = "-" if math.isnan(m["step_peak"]) else f"{m['step_peak'] / GIB:.2f} GiB"
            print(
                f"| {name} | {rank} | {m['before'] / GIB:.2f} GiB | {m['setup_peak'] / GIB:.2f} GiB | {growth:.2f} "
                f"| {step} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
