"""Step time: orchestrator's DDP training loop against a hand-written PyTorch DDP loop and the same loop
driven by Accelerate, on the same model, data, batch and seed.

    python bench/overhead.py                       # 3 interleaved rounds of 60 steps, 2 CPU workers
    python bench/overhead.py --rounds 5 --append bench/RESULTS.md

The model is the default job's GPT, on its data (the token cache ``orchestrator train`` builds), with
its batch (8 sequences x 2 accumulation steps x 2 workers), AdamW with its parameter groups, and its
gradient clipping. Each variant is a fresh 2-process run. The step time is the interval between the
ends of consecutive optimizer steps, so it holds everything a loop does between steps (logging,
resource sampling, W&B), and its median after ``--warmup`` steps is compared. Variants:

- ``orchestrator``: ``orchestrator train strategy=ddp launcher=local`` as it comes (a W&B run, offline
  without a key; eval and checkpoints off, as in the others);
- ``orchestrator logger=jsonl``: the same without W&B;
- ``raw DDP``: a minimal loop under ``torchrun``: random windows of the token file, forward, backward
  (``no_sync`` on all but the last micro-batch), clip, step;
- ``Accelerate``: that loop with ``Accelerator(gradient_accumulation_steps=2)``, ``accelerate``,
  ``backward`` and ``clip_grad_norm_``, under ``torchrun``.

Goal: orchestrator / raw <= 1.02, and no slower than Accelerate.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MICRO, ACCUM, CLIP = 8, 2, 1.0
VARIANTS = ["orchestrator", "orchestrator logger=jsonl", "raw DDP", "Accelerate"]


def default_job():
    from orchestrator.config.compose import compose, to_config

    return to_config(compose(["strategy=ddp", "launcher=local", "trainer.device=cpu"]))


def hand_written(out: str, steps: int, *, accelerate: bool) -> None:
    """The minimal loop, one rank of it; rank 0 writes each step's end time."""
    import numpy as np
    import torch
    import torch.distributed as dist

    from orchestrator.data import prepare_data
    from orchestrator.data.text import cache_dir_for, find_corpus_files
    from orchestrator.models import build_model
    from orchestrator.train.optim import build_optimizer

    config = default_job()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["LOCAL_WORLD_SIZE"])))
    spec = prepare_data(config.data)
    tokens = np.memmap(
        cache_dir_for(config.data, find_corpus_files(config.data)) / "train.bin", dtype=np.uint16, mode="r"
    )
    seq = config.data.seq_len
    torch.manual_seed(config.seed)
    model = build_model(config.model, spec)
    optimizer = build_optimizer(config.optim, model)
    if accelerate:
        from accelerate import Accelerator

        accelerator = Accelerator(cpu=True, gradient_accumulation_steps=ACCUM)
        model, optimizer = accelerator.prepare(model, optimizer)
        rank = accelerator.process_index
    else:
        dist.init_process_group("gloo")
        rank = dist.get_rank()
        model = torch.nn.parallel.DistributedDataParallel(model)
    generator = np.random.default_rng(config.seed + rank)
    ends = []
    for _ in range(steps):
        for micro in range(ACCUM):
            starts = generator.integers(0, len(tokens) - seq - 1, size=MICRO)
            windows = torch.from_numpy(np.stack([tokens[s : s + seq + 1] for s in starts]).astype(np.int64))
            inputs, targets = windows[:, :-1], windows[:, 1:]
            if accelerate:
                with accelerator.accumulate(model):
                    loss = torch.nn.functional.cross_entropy(model(inputs).flatten(0, 1), targets.flatten())
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        accelerator.clip_grad_norm_(model.parameters(), CLIP)
                    optimizer.step()
                    optimizer.zero_grad()
            else:
                last = micro == ACCUM - 1
                with model.no_sync() if not last else contextlib.nullcontext():
                    loss = torch.nn.functional.cross_entropy(model(inputs).flatten(0, 1), targets.flatten())
                    (loss / ACCUM).backward()
        if not accelerate:
            torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        loss.item()  # what a loop that prints its loss waits for
        ends.append(time.time())
    if rank == 0:
        Path(out).write_text(json.dumps(ends))
    if not accelerate:
        dist.barrier()
        dist.destroy_process_group()


def step_ends(variant: str, out: Path) -> list[float]:
    if variant.startswith("orchestrator"):
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return [record["time"] for record in records if "loss" in record]
    return json.loads(out.read_text())


def run(variant: str, tmp: Path, steps: int) -> list[float]:
    """The variant's step times (s), each the interval between consecutive step ends."""
    out = tmp / f"{re.sub(r'[^A-Za-z0-9]+', '-', variant)}-{time.monotonic_ns()}"
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": os.environ.get("WANDB_MODE", "offline")}
    if variant.startswith("orchestrator"):
        command = [
            sys.executable,
            "-m",
            "orchestrator",
            "train",
            "strategy=ddp",
            "launcher=local",
            "trainer.device=cpu",
            f"trainer.max_steps={steps}",
            "trainer.eval_every=0",
            "trainer.checkpoint.every=0",
            "trainer.checkpoint.at_end=false",
            "logger.progress=false",
            f"hydra.run.dir={out}",
            *(["logger=jsonl"] if "jsonl" in variant else []),
        ]
    else:
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node=2",
            __file__,
            "--loop",
            "accelerate" if variant == "Accelerate" else "ddp",
            "--out",
            str(out),
            "--steps",
            str(steps),
        ]
    result = subprocess.run(command, cwd=tmp, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{variant} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    ends = step_ends(variant, out)
    return [b - a for a, b in zip(ends, ends[1:])]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--append", type=Path, default=None, help="append the table to this markdown file")
    parser.add_argument("--loop", choices=["ddp", "accelerate"], help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.loop:
        hand_written(args.out, args.steps, accelerate=args.loop == "accelerate")
        return 0

    medians: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        from orchestrator.data import prepare_data

        prepare_data(default_job().data)  # the token cache, before any timing
        for round_ in range(args.rounds):
            for variant in VARIANTS[round_ % len(VARIANTS) :] + VARIANTS[: round_ % len(VARIANTS)]:
                times = run(variant, tmp, args.steps)[args.warmup :]
                medians[variant].append(statistics.median(times))
                print(
                    f"round {round_ + 1}/{args.rounds} {variant}: {medians[variant][-1] * 1000:.1f} ms",
                    file=sys.stderr,
                    flush=True,
                )
    median = {variant: statistics.median(values) for variant, values in medians.items()}
    raw = median["raw DDP"]
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
    ).stdout.strip()
    lines = [
        f"### Overhead: step time against raw DDP and Accelerate ({date.today()}, {platform.node() or 'host'}, "
        f"{os.cpu_count()} CPUs, commit {commit}, 2 workers, {args.steps} steps, {args.warmup} warm-up, "
        f"{args.rounds} rounds interleaved)",
        "",
        "| variant | step time (ms, median of rounds) | / raw DDP | rounds (ms) |",
        "|---|---:|---:|---|",
        *(
            f"| {v} | {median[v] * 1000:.1f} | {median[v] / raw:.3f} | "
            f"{', '.join(f'{t * 1000:.1f}' for t in medians[v])} |"
            for v in VARIANTS
        ),
        "",
        f"Goal: orchestrator / raw DDP <= 1.02 (measured {median['orchestrator'] / raw:.3f}; "
        f"{median['orchestrator logger=jsonl'] / raw:.3f} without W&B), and no slower than Accelerate "
        f"(orchestrator / Accelerate = {median['orchestrator'] / median['Accelerate']:.3f}).",
        "",
    ]
    print("\n".join(lines))
    if args.append:
        with open(args.append, "a") as f:
            f.write("\n" + "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
