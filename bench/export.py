"""Memory and time of ``orchestrator export`` on a ~1B-parameter GPT checkpoint in the ddp format.

    python bench/export.py                  # builds the checkpoint (once, in --work), then one round
    python bench/export.py --rounds 3 --append bench/RESULTS.md

The checkpoint is written directly, no training: a run dir with ``config.yaml`` (a GPT of 18 layers x 2048,
vocabulary 50304, 1024 positions: 1.01B parameters, 4.0 GB in fp32, on synthetic data) and
``checkpoints/step-00000001/`` with ``model.pt`` and its manifest. Variants, each a fresh process:

- ``export fp32``: ``orchestrator export RUN -o OUT`` (the console script, start-up included);
- ``export bf16``: the same with ``--dtype bf16``;
- ``whole dict``: what export would cost without streaming: ``read_model_weights`` (the whole state dict
  in memory), then ``safetensors.torch.save_file`` of its GPT-2 form.

Peak RSS is the kernel's high-water mark of the process (its ``rusage``); it includes the pages of the
memory-mapped ``model.pt`` that were read, which are page cache (the kernel drops them under pressure).
Peak anonymous memory (RSS less file-backed pages, sampled every 10 ms) is what the process itself holds.
The checkpoint is in the page cache when the variants run (it was just written or read): disk speed is
not measured.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CLI = Path(sys.executable).with_name("orchestrator")
OVERRIDES = [
    "model=gpt_1p3b",
    "model.n_layer=18",
    "data=synthetic_tokens",
    "data.vocab_size=50304",
    "data.seq_len=1024",
    "strategy=ddp",
    "launcher=local",
    "launcher.num_workers=1",
    "trainer.device=cpu",
]
GB = 10**9


def build_checkpoint(run_dir: Path) -> Path:
    """A run dir holding a ddp checkpoint of the ~1B GPT (random weights), unless it is there already."""
    import torch
    from omegaconf import OmegaConf

    from orchestrator.checkpoints import manifest
    from orchestrator.config.compose import compose, load_resolved, without_hydra
    from orchestrator.data.spec import DataSpec
    from orchestrator.models import build_model
    from orchestrator.models.recipe import state_shapes

    checkpoint = run_dir / "checkpoints" / manifest.step_dir_name(1)
    if (checkpoint / manifest.MANIFEST).exists():
        return checkpoint
    shutil.rmtree(run_dir, ignore_errors=True)
    checkpoint.mkdir(parents=True)
    text = OmegaConf.to_yaml(without_hydra(compose(OVERRIDES)), resolve=True)
    (run_dir / "config.yaml").write_text(text)
    config = load_resolved(text)
    torch.manual_seed(0)
    model = build_model(config.model, DataSpec(kind=config.model.input_kind, vocab_size=50304, seq_len=1024))
    torch.save(model.state_dict(), checkpoint / "model.pt")
    files = {"model.pt": manifest.file_entry(checkpoint / "model.pt")}
    manifest.write_manifest(
        checkpoint, files=files, step=1, world_size=1, strategy="ddp", model_shapes=state_shapes(model)
    )
    return checkpoint


def whole_dict_export(run_dir: str, out: str) -> None:
    """The non-streaming way: every tensor in memory, then one save_file per shard (here one file)."""
    from safetensors.torch import save_file

    from orchestrator.checkpoints import manifest
    from orchestrator.models.gpt2_format import gpt_to_gpt2
    from orchestrator.strategies import read_model_weights

    checkpoint = manifest.resolve_checkpoint(run_dir, key="bench")
    state = gpt_to_gpt2(read_model_weights(checkpoint, written_by="ddp"))
    Path(out).mkdir()
    save_file(state, str(Path(out) / "model.safetensors"), metadata={"format": "pt"})


def measure(command: list[str]) -> dict[str, float]:
    """Runs ``command``; its wall time, peak RSS (its own rusage) and peak anonymous memory (sampled)."""
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL)
    peak_anon = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak_anon
        status = Path(f"/proc/{process.pid}/status")
        while not done.is_set():
            try:
                fields = dict(line.split(":", 1) for line in status.read_text().splitlines())
                peak_anon = max(peak_anon, int(fields["RssAnon"].split()[0]) * 1024)
            except (OSError, ValueError, KeyError):  # gone, or a zombie (no memory lines)
                return
            time.sleep(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, status, usage = os.wait4(process.pid, 0)  # this child's own rusage
    process.returncode = os.waitstatus_to_exitcode(status)
    wall_s = time.perf_counter() - start
    done.set()
    sampler.join()
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(command)} exited {process.returncode}")
    return {"wall_s": wall_s, "peak_rss_bytes": usage.ru_maxrss * 1024, "peak_anon_bytes": peak_anon}  # KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument(
        "--work",
        type=Path,
        default=Path("/tmp/orchestrator-bench-export"),
        help="where the checkpoint (kept between invocations) and the exports go",
    )
    parser.add_argument("--append", type=Path, default=None, help="append the table to this markdown file")
    parser.add_argument("--whole-dict", nargs=2, metavar=("RUN_DIR", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--build", type=Path, metavar="RUN_DIR", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.whole_dict:
        whole_dict_export(*args.whole_dict)
        return
    if args.build:
        build_checkpoint(args.build)
        return

    run_dir = args.work / "run"
    start = time.perf_counter()
    # In a child: a child's peak RSS counts its parent's at fork, so this process stays small.
    subprocess.run([sys.executable, __file__, "--build", str(run_dir)], check=True)
    checkpoint = run_dir / "checkpoints" / "step-00000001"
    size = (checkpoint / "model.pt").stat().st_size
    print(
        f"checkpoint {checkpoint}: {size / GB:.2f} GB ({time.perf_counter() - start:.0f} s to build or find)",
        flush=True,
    )
    out = args.work / "out"
    variants = {
        "export fp32": [str(CLI), "export", str(run_dir), "-o", str(out)],
        "export bf16": [str(CLI), "export", str(run_dir), "-o", str(out), "--dtype", "bf16"],
        "whole dict": [sys.executable, __file__, "--whole-dict", str(run_dir), str(out)],
    }
    results: dict[str, list[dict[str, float]]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name in variants:
            shutil.rmtree(out, ignore_errors=True)
            results[name].append(measure(variants[name]))
            print(f"  {name}: {results[name][-1]}", flush=True)
    shutil.rmtree(out, ignore_errors=True)
    lines = [
        f"### export of a 1.01B GPT (ddp checkpoint, {size / GB:.2f} GB) - {date.today()}, "
        f"{platform.node()}, {os.cpu_count()} CPUs, {args.rounds} round(s)",
        "",
        "| variant | wall s (median) | peak anonymous GB | peak RSS GB (incl. mmap'd page cache) |",
        "|---|---|---|---|",
    ]
    for name, rows in results.items():

        def median(key: str, rows: list[dict[str, float]] = rows) -> float:
            return statistics.median(row[key] for row in rows)

        lines.append(
            f"| {name} | {median('wall_s'):.1f} | {median('peak_anon_bytes') / GB:.2f} | "
            f"{median('peak_rss_bytes') / GB:.2f} |"
        )
    table = "\n".join(lines) + "\n"
    print(table)
    if args.append:
        with open(args.append, "a") as stream:
            stream.write("\n" + table)


if __name__ == "__main__":
    main()
