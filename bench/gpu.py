"""GPU throughput and MFU: GPT-2 124M and a 1.3B GPT under each strategy, eager and compiled.

    python bench/gpu.py --append bench/RESULTS.md                 # every visible GPU, bf16
    python bench/gpu.py --models gpt2_124m --strategies ddp,fsdp2 --steps 30
    python bench/gpu.py --smoke                                   # the same matrix at tiny size on the CPU

Each variant is one ``orchestrator train`` run (torch elastic, one worker per visible GPU, bf16,
activation checkpointing for the 1.3B model) on the standard library corpus with GPT-2's 50,304
token vocabulary, 1,024-token sequences. The table holds each run's median step time (the first
step, compilation included, left out), tokens/s and MFU against the device's dense bf16 peak
(``orchestrator/train/throughput.py``). Goal: 50% MFU for GPT-2 124M on one H100.
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

# model -> (micro batch per GPU, extra overrides)
MODELS = {
    "gpt2_124m": (16, []),
    "gpt_1p3b": (8, ["strategy.activation_checkpointing=true"]),
}


def run(model: str, strategy: str, compiled: bool, *, args: argparse.Namespace, gpus: int, tmp: Path) -> dict:
    micro, extra = MODELS[model]
    if args.smoke:
        micro, extra = 2, []
        device = ["model=gpt_tiny", "trainer.device=cpu", "trainer.precision=fp32", "data.seq_len=64",
                  "data.vocab_size=512", "data.max_bytes=300000"]
    else:
        device = [f"model={model}", "trainer.device=cuda", "trainer.precision=bf16", "data.seq_len=1024",
                  "data.vocab_size=50304"]
    run_dir = tmp / f"{model}-{strategy}-{'compiled' if compiled else 'eager'}"
    command = [sys.executable, "-m", "orchestrator", "train", "launcher=local", "logger=jsonl", *device,
               f"strategy={strategy}", *extra, f"strategy.compile={str(compiled).lower()}",
               f"launcher.num_workers={gpus}", f"trainer.micro_batch_size={micro}",
               f"trainer.global_batch_size={micro * gpus}", f"trainer.max_steps={args.steps}",
               f"scheduler.warmup_steps={min(10, args.steps)}", "trainer.eval_every=0", "trainer.checkpoint.every=0",
               "trainer.checkpoint.at_end=false", "trainer.resume=never", "logger.progress=false",
               f"hydra.run.dir={run_dir}", *args.overrides]
    result = subprocess.run(command, capture_output=True, text=True)
    summary_file = run_dir / "summary.json"
    if result.returncode != 0 or not summary_file.exists():
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        return {"status": "failed", "error": last[:160]}
    return json.loads(summary_file.read_text())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--strategies", default="ddp,fsdp2,zero1,zero3")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--smoke", action="store_true", help="tiny GPT on the CPU: checks the script, measures nothing")
    parser.add_argument("--append", type=Path, default=None, help="append the table to this markdown file")
    args, args.overrides = parser.parse_known_args()

    import torch

    if args.smoke:
        gpus, device = 2, "cpu (smoke)"
    elif torch.cuda.is_available():
        gpus, device = torch.cuda.device_count(), torch.cuda.get_device_name(0)
    else:
        raise SystemExit("no CUDA GPU: run on a GPU machine, or pass --smoke")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models.split(","):
            for strategy in args.strategies.split(","):
                for compiled in (False, True):
                    summary = run(model, strategy, compiled, args=args, gpus=gpus, tmp=Path(tmp))
                    rows.append(("gpt_tiny" if args.smoke else model, strategy, compiled, summary))
                    print(f"{model} {strategy} {'compiled' if compiled else 'eager'}: {summary['status']}",
                          file=sys.stderr, flush=True)

    lines = ["| model | strategy | compile | step time (ms) | tokens/s | MFU | peak memory / GPU (GiB) |",
             "|---|---|---|---:|---:|---:|---:|"]
    for model, strategy, compiled, s in rows:
        if s["status"] != "completed":
            lines.append(f"| {model} | {strategy} | {'yes' if compiled else 'no'} | failed: {s.get('error')} | | | |")
            continue
        mfu = f"{s['mfu']:.1%}" if s.get("mfu") is not None else "-"
        lines.append(f"| {model} | {strategy} | {'yes' if compiled else 'no'} | {s['step_time_s_median'] * 1e3:.1f} "
                     f"| {s['tokens_per_s']:,.0f} | {mfu} | {s['peak_mem_bytes'] / 2**30:.1f} |")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    title = (f"### GPU: tokens/s and MFU ({date.today()}, {platform.node()}, {gpus} x {device}, torch "
             f"{torch.__version__}, commit {commit}, {args.steps} steps per run)")
    table = "\n".join([title, "", *lines])
    print(table)
    if args.append:
        with open(args.append, "a") as f:
            f.write("\n" + table + "\n")
    return 0 if all(s["status"] == "completed" for *_, s in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
