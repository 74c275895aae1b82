"""Wall time of ``orchestrator search``: trials one at a time against two at a time, and the steps ASHA saves.

    python bench/search.py                      # 8 trials of a tiny job, each variant once
    python bench/search.py --rounds 2 --append bench/RESULTS.md

Three variants of the same search, each a fresh ``orchestrator search`` process on an embedded Ray
(its start-up included): 8 trials of a tiny GPT (one Ray Train worker each, ``trainer.max_steps``
100, an eval every 10 steps), learning rates drawn log-uniformly from [1e-5, 1e-2] by a seeded
random search, so every variant trains the same 8 configurations, in the same order:

- ``max_concurrent=1, scheduler=none``: one trial after another, each to its last step (the serial
  path; the retired Optuna sweeper ran trials this way);
- ``max_concurrent=2, scheduler=none``: two at a time, each to its last step;
- ``max_concurrent=2, scheduler=asha``: two at a time, the worse stopped at ASHA's rungs.

Rounds run the variants in a rotated order. The table gives the median wall time, the training steps
run over all trials (8 x 100 without stopping) and the best eval loss found.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CLI = Path(sys.executable).with_name("orchestrator")
TRIALS, MAX_STEPS = 8, 100
VARIANTS = {
    "max_concurrent=1, scheduler=none": ["search.max_concurrent=1", "search.scheduler=none"],
    "max_concurrent=2, scheduler=none": ["search.max_concurrent=2", "search.scheduler=none"],
    "max_concurrent=2, scheduler=asha": ["search.max_concurrent=2", "search.scheduler=asha"],
}


def search_args(cache_dir: str, search_dir: Path) -> list[str]:
    return [
        "search",
        "job=gpt_tiny_cpu",
        f"data.cache_dir={cache_dir}",
        "data.max_bytes=400000",
        "data.seq_len=32",
        f"trainer.max_steps={MAX_STEPS}",
        "trainer.global_batch_size=8",
        "trainer.micro_batch_size=8",
        "trainer.eval_every=10",
        "trainer.eval_batches=2",
        "trainer.checkpoint.every=0",
        "scheduler.warmup_steps=2",
        "logger=jsonl",
        "launcher.num_workers=1",
        "strategy=none",
        "search.algorithm=random",
        f"search.num_samples={TRIALS}",
        "optim.lr=tag(log,interval(1e-5,1e-2))",
        f"search.output_dir={search_dir}",
    ]


def run(variant: str, tmp: Path, cache_dir: str, round_: int) -> dict[str, float]:
    """One search: wall time, steps run over all trials, best eval loss."""
    search_dir = tmp / f"{round_}-{variant.replace(', ', '-').replace('=', '')}"
    started = time.perf_counter()
    result = subprocess.run(
        [str(CLI), *search_args(cache_dir, search_dir), *VARIANTS[variant]], cwd=tmp, capture_output=True, text=True
    )
    wall_s = time.perf_counter() - started
    if result.returncode != 0:
        sys.exit(f"{variant}: exit {result.returncode}\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    trials = json.loads((search_dir / "search.json").read_text())["trials"]
    return {
        "wall_s": wall_s,
        "steps": sum(t["steps"] or 0 for t in trials),
        "stopped": sum(t["status"] == "stopped_early_by_search" for t in trials),
        "best": min(t["value"] for t in trials if t["value"] is not None),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--append", type=Path, default=None, help="append the table to this markdown file")
    args = parser.parse_args()

    variants = list(VARIANTS)
    results: dict[str, list[dict[str, float]]] = {variant: [] for variant in variants}
    cache_dir = os.path.expanduser("~/.cache/orchestrator")
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        subprocess.run(
            [
                str(CLI),
                "train",
                *search_args(cache_dir, tmp / "warm")[1:-2],
                "trainer.max_steps=2",
                "launcher=local",
                f"hydra.run.dir={tmp / 'warm'}",
            ],
            cwd=tmp,
            check=True,
            capture_output=True,
        )  # the data cache, built once before any timing
        for round_ in range(args.rounds):
            for variant in variants[round_ % len(variants) :] + variants[: round_ % len(variants)]:
                results[variant].append(run(variant, tmp, cache_dir, round_))
                print(
                    f"round {round_ + 1}/{args.rounds} {variant}: {results[variant][-1]}", file=sys.stderr, flush=True
                )
    wall = {variant: statistics.median(r["wall_s"] for r in rows) for variant, rows in results.items()}
    serial = wall[variants[0]]
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
    ).stdout.strip()
    lines = [
        f"### Search: {TRIALS} trials of a tiny job ({date.today()}, {platform.node() or 'host'}, {os.cpu_count()} CPUs, "
        f"commit {commit}, {args.rounds} round(s))",
        "",
        "| variant | wall s (median) | vs one at a time | steps run | trials stopped | best eval loss | all rounds (s) |",
        "|---|---:|---:|---:|---:|---:|---|",
        *(
            f"| {v} | {wall[v]:.1f} | {serial / wall[v]:.2f}x | {results[v][-1]['steps']:.0f} of {TRIALS * MAX_STEPS} | "
            f"{results[v][-1]['stopped']:.0f} | {results[v][-1]['best']:.4f} | "
            f"{', '.join(format(r['wall_s'], '.1f') for r in results[v])} |"
            for v in variants
        ),
        "",
    ]
    print("\n".join(lines))
    if args.append:
        with open(args.append, "a") as f:
            f.write("\n" + "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
