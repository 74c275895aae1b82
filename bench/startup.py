"""Time to the first training step: orchestrator's launchers against the bare tools they wrap.

    python bench/startup.py                 # 3 interleaved rounds, the default job's model, 2 CPU workers
    python bench/startup.py --rounds 5 --append bench/RESULTS.md

Five variants, each a fresh process, timed from its spawn to the wall-clock time at which the first
optimizer step finished:

- ``orchestrator train launcher=local``: config composition, checks, data preparation (cached),
  torch elastic, the training loop's setup (``logger=jsonl``: a W&B run's start is W&B's cost, not
  the launcher's);
- bare ``torchrun --standalone``: a minimal DDP script that builds the same GPT and takes one step
  on random tokens;
- ``orchestrator train launcher=ray``: the same as local, with an embedded Ray and Ray Train;
- a bare Ray ``TorchTrainer``: the same minimal step in a Ray Train worker group, with Ray started
  the same way (``ray.init(address="local")`` with the dashboard on 127.0.0.1);
- ``orchestrator train launcher=local`` with ``logger=wandb`` (offline): what starting a W&B run adds.

Each round runs all four in a rotated order; the table shows medians and the overhead of each
orchestrator launcher over its bare counterpart (goals: +1 s for local, +2 s for Ray).
"""

from __future__ import annotations

import argparse
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
# The default job's GPT (conf/model/gpt_small.yaml) on its data's shape (conf/data/stdlib.yaml).
N_LAYER, N_HEAD, N_EMBD, VOCAB, SEQ, MICRO, ACCUM = 4, 4, 128, 4096, 128, 8, 2


def bare_step(out: str) -> None:
    """One DDP step of the default job's GPT on random tokens; rank 0 writes when it finished."""
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from orchestrator.config.schema import GPTConfig
    from orchestrator.models.gpt import GPT

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    torch.manual_seed(0)
    model = DistributedDataParallel(
        GPT(GPTConfig(n_layer=N_LAYER, n_head=N_HEAD, n_embd=N_EMBD), vocab_size=VOCAB, block_size=SEQ)
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)
    for micro in range(ACCUM):
        tokens = torch.randint(VOCAB, (MICRO, SEQ + 1))
        logits = model(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        if micro < ACCUM - 1:
            with model.no_sync():
                (loss / ACCUM).backward()
        else:
            (loss / ACCUM).backward()
    optimizer.step()
    if dist.get_rank() == 0:
        Path(out).write_text(str(time.time()))


def bare_ray(out: str, workers: int) -> None:
    import logging

    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    ray.init(
        address="local",
        num_cpus=os.cpu_count(),
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        logging_level=logging.WARNING,
    )
    TorchTrainer(
        lambda config: bare_step(config["out"]),
        train_loop_config={"out": out},
        scaling_config=ScalingConfig(num_workers=workers, resources_per_worker={"CPU": 1}),
        torch_config=TorchConfig(backend="gloo"),
        run_config=RunConfig(storage_path=str(Path(out).parent / "ray")),
    ).fit()
    ray.shutdown()


def first_step_time(run_dir: Path) -> float:
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            return record["time"]
    raise RuntimeError(f"no training step in {run_dir}")


def run(variant: str, tmp: Path, workers: int, cache_dir: str) -> float:
    """Seconds from spawning the variant's process to the end of its first step."""
    out = tmp / f"{re.sub(r'[^A-Za-z0-9]+', '-', variant)}-{time.monotonic_ns()}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    if variant.startswith("orchestrator"):
        launcher = variant.split("launcher=")[1].split(",")[0]
        logger = "wandb" if variant.endswith("W&B offline") else "jsonl"
        env["WANDB_MODE"] = "offline"
        command = [
            sys.executable,
            "-m",
            "orchestrator",
            "train",
            f"launcher={launcher}",
            f"launcher.num_workers={workers}",
            "trainer.device=cpu",
            "trainer.max_steps=2",
            "trainer.eval_every=0",
            "trainer.checkpoint.every=0",
            "trainer.checkpoint.at_end=false",
            "scheduler.warmup_steps=0",
            f"logger={logger}",
            "logger.progress=false",
            f"data.cache_dir={cache_dir}",
            f"hydra.run.dir={out}",
        ]
    elif variant == "bare torchrun":
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={workers}",
            __file__,
            "--bare-step",
            str(out),
        ]
    else:
        command = [sys.executable, __file__, "--bare-ray", str(out), "--workers", str(workers)]
    started = time.time()
    result = subprocess.run(command, cwd=tmp, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{variant} failed ({result.returncode}): {command}\n{result.stderr[-3000:]}")
    finished = first_step_time(out) if variant.startswith("orchestrator") else float(out.read_text())
    return finished - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--append", type=Path, default=None, help="append the table to this markdown file")
    parser.add_argument("--bare-step", help=argparse.SUPPRESS)
    parser.add_argument("--bare-ray", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bare_step:
        bare_step(args.bare_step)
        return 0
    if args.bare_ray:
        bare_ray(args.bare_ray, args.workers)
        return 0

    variants = [
        "orchestrator launcher=local",
        "bare torchrun",
        "orchestrator launcher=ray",
        "bare Ray TorchTrainer",
        "orchestrator launcher=local, W&B offline",
    ]
    times: dict[str, list[float]] = {variant: [] for variant in variants}
    cache_dir = os.path.expanduser("~/.cache/orchestrator")
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        run(variants[0], tmp, args.workers, cache_dir)  # warm-up: data cache, page cache
        for round_ in range(args.rounds):
            for variant in variants[round_ % len(variants) :] + variants[: round_ % len(variants)]:
                times[variant].append(run(variant, tmp, args.workers, cache_dir))
                print(
                    f"round {round_ + 1}/{args.rounds} {variant}: {times[variant][-1]:.2f} s",
                    file=sys.stderr,
                    flush=True,
                )
    median = {variant: statistics.median(values) for variant, values in times.items()}
    local_gap = median[variants[0]] - median[variants[1]]
    ray_gap = median[variants[2]] - median[variants[3]]
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
    ).stdout.strip()
    lines = [
        f"### Start-up: time to the first step ({date.today()}, {platform.node() or 'host'}, "
        f"{os.cpu_count()} CPUs, commit {commit}, {args.workers} workers, {args.rounds} rounds interleaved)",
        "",
        "| variant | to first step (s, median) | all rounds (s) |",
        "|---|---:|---|",
        *(f"| {v} | {median[v]:.2f} | {', '.join(f'{t:.2f}' for t in times[v])} |" for v in variants),
        "",
        f"Overhead: launcher=local {local_gap:+.2f} s over bare torchrun (goal +1 s); "
        f"launcher=ray {ray_gap:+.2f} s over a bare TorchTrainer (goal +2 s); "
        f"a W&B run (offline) {median[variants[4]] - median[variants[0]]:+.2f} s.",
        "",
    ]
    print("\n".join(lines))
    if args.append:
        with open(args.append, "a") as f:
            f.write("\n" + "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
