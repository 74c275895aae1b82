"""Per-rank model-state memory of each strategy, measured, against ``orchestrator estimate``.

    python bench/memory.py                                        # the default job, 1 and 2 CPU workers
    python bench/memory.py --workers 1,2 --append bench/RESULTS.md
    python bench/memory.py --workers 1,2,4,8 trainer.device=cuda trainer.precision=bf16 job=gpt2_124m_1gpu

One ``orchestrator scale`` experiment (a few steps per point) measures every (strategy, workers)
point; each run's summary holds the bytes rank 0 keeps between steps (parameters, gradients,
optimizer state, fp32 master copy) counted from the tensors themselves. The estimate is
``orchestrator estimate``'s figure for the same strategy, precision and world size. Peak memory
per rank (peak RSS on CPU, peak allocated on a GPU) is the process's whole footprint, runtime
included, and is printed beside them.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
from datetime import date
from pathlib import Path

DEFAULT_STRATEGIES = "ddp,fsdp2,zero1,zero2,zero3"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--strategies", default=DEFAULT_STRATEGIES)
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--append", type=Path, default=None, help="append the table to this markdown file")
    args, overrides = parser.parse_known_args()

    from orchestrator.config.compose import compose, to_config
    from orchestrator.experiments.estimate import describe, model_states

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "memory"
        command = [
            sys.executable,
            "-m",
            "orchestrator",
            "scale",
            "launcher=local",
            "logger=jsonl",
            *overrides,
            f"scale.strategies=[{args.strategies}]",
            f"scale.workers=[{args.workers}]",
            f"scale.steps={args.steps}",
            "scale.warmup_steps=1",
            f"scale.output_dir={out}",
        ]
        result = subprocess.run(command, capture_output=True, text=True)
        if not (out / "scale.json").exists():
            raise SystemExit(f"orchestrator scale failed ({result.returncode}):\n{result.stderr[-2000:]}")
        points = json.loads((out / "scale.json").read_text())["points"]
        summaries = {
            (p["strategy"], p["workers"]): json.loads((out / p["run_dir"] / "summary.json").read_text())
            for p in points
            if p["status"] == "completed"
        }

    shape = describe(to_config(compose(overrides)))
    rows = []
    for point in points:
        summary = summaries.get((point["strategy"], point["workers"]))
        if summary is None:
            rows.append(
                f"| {point['strategy']} | {point['workers']} | {point['status']}: {point.get('error')} |" + " |" * 6
            )
            continue
        config = to_config(
            compose(
                [
                    *overrides,
                    f"strategy={point['strategy']}",
                    f"launcher.num_workers={point['workers']}",
                    f"trainer.global_batch_size={point['global_batch_size']}",
                ]
            )
        )
        offload = getattr(config.strategy, "offload_optimizer", "none")
        predicted = model_states(
            point["strategy"], getattr(offload, "value", offload), config.trainer.precision, shape, point["workers"]
        ).sharded
        parts = [summary[key] for key in ("param_bytes", "grad_bytes", "optimizer_bytes", "master_bytes")]
        measured = sum(parts)
        rows.append(
            f"| {point['strategy']} | {point['workers']} | "
            + " | ".join(f"{part / 2**20:.2f}" for part in parts)
            + f" | {measured / 2**20:.2f} | {predicted / 2**20:.2f} | {measured / predicted:.3f} | "
            f"{point['peak_mem_bytes'] / 2**20:.0f} |"
        )

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    title = (
        f"### Memory: model states per rank, measured against the estimate ({date.today()}, {platform.node()}, "
        f"{shape.num_params:,} parameters, {config.trainer.precision.value}, commit {commit})"
    )
    table = "\n".join(
        [
            title,
            "",
            "| strategy | workers | params MiB | grads MiB | optimizer MiB | master MiB | measured MiB | estimate MiB "
            "| measured / estimate | peak memory / rank MiB |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
            *rows,
        ]
    )
    print(table)
    if args.append:
        with open(args.append, "a") as f:
            f.write("\n" + table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
