"""Step time of one job under each strategy, in one invocation, runs interleaved.

    python bench/strategies.py                          # the default job, 2 CPU workers
    python bench/strategies.py --rounds 3 --steps 60 job=gpt_tiny_cpu
    python bench/strategies.py --strategies ddp,fsdp2,zero3 trainer.precision=bf16 trainer.device=cuda

Every round runs every strategy once, in a rotated order, so drift in the machine (thermal, other
load) spreads over all of them; the table reports the median over rounds of each run's median step
time, and each strategy's time relative to the first. Steps, not wall time: start-up (process
launch, DeepSpeed's first-run op build, model setup) is excluded.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

DEFAULT_STRATEGIES = "ddp,fsdp2,zero1,zero2,zero3"


def run_once(strategy: str, overrides: list[str], steps: int, run_dir: Path) -> dict:
    command = [
        sys.executable,
        "-m",
        "orchestrator",
        "train",
        *overrides,
        f"strategy={strategy}",
        f"trainer.max_steps={steps}",
        "trainer.eval_every=0",
        "trainer.checkpoint.every=0",
        "trainer.checkpoint.at_end=false",
        "trainer.resume=never",
        "logger.progress=false",
        f"scheduler.warmup_steps={min(10, steps)}",
        f"hydra.run.dir={run_dir}",
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{strategy} failed ({result.returncode}):\n{result.stderr[-2000:]}")
    return json.loads((run_dir / "summary.json").read_text())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--strategies", default=DEFAULT_STRATEGIES)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=40)
    args, overrides = parser.parse_known_args()
    strategies = args.strategies.split(",")
    times: dict[str, list[float]] = {name: [] for name in strategies}
    tokens: dict[str, list[float]] = {name: [] for name in strategies}
    memory: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            order = strategies[round_ % len(strategies) :] + strategies[: round_ % len(strategies)]
            for name in order:
                summary = run_once(name, overrides, args.steps, Path(tmp) / f"{name}-{round_}")
                times[name].append(summary["step_time_s_median"])
                tokens[name].append(summary.get("tokens_per_s") or 0.0)
                memory[name] = summary
                print(
                    f"round {round_ + 1}/{args.rounds} {name}: {summary['step_time_s_median'] * 1e3:.1f} ms/step",
                    file=sys.stderr,
                    flush=True,
                )
    reference = statistics.median(times[strategies[0]])
    print(f"| strategy | step time (ms, median) | vs {strategies[0]} | tokens/s | model states MiB/rank |")
    print("|---|---:|---:|---:|---:|")
    for name in strategies:
        step = statistics.median(times[name])
        summary = memory[name]
        states = sum(summary.get(k) or 0 for k in ("param_bytes", "grad_bytes", "optimizer_bytes", "master_bytes"))
        print(
            f"| {name} | {step * 1e3:.1f} | {step / reference:.2f}x | {statistics.median(tokens[name]):,.0f} | "
            f"{states / 2**20:.2f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
