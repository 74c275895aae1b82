"""GPU throughput and MFU: GPT-2 124M and a 1.3B GPT under each strategy, eager and compiled.

    python bench/gpu.py | tee bench-gpu.md                       # every visible GPU, bf16, the whole matrix
    python bench/gpu.py --models gpt_1p3b --modes ddp,fsdp2+compile --steps 20
    python bench/gpu.py --extra zero3:strategy.activation_checkpointing=true
    python bench/gpu.py --smoke --models tiny --modes ddp        # tiny GPT on the CPU: checks this script

Each variant (a model and a mode: a strategy, eager or ``+compile``) is one ``python -m orchestrator
train`` run in its own process group (torch elastic, one worker per visible GPU, bf16, random tokens:
no data preparation, nothing read from disk) killed at ``--run-timeout``. Variants run once each,
cheapest first: eager, eager ZeRO-3, compiled, compiled ZeRO-3 (the slowest to start) last; no run
starts once ``--budget`` seconds are spent, and the rows left are marked skipped. A markdown table's
title and header are printed first and each row as its run ends, so a kill of this script still
leaves every finished row on stdout. A failed run's row holds its error (``summary.json``'s, else the
end of its log); its run dir and log are kept and named on stderr.

Columns, all from the run's own records: median step time (the first step left out; each step ends
with a host sync on its loss, so in the steady state a step's wall time holds all of one step's GPU
work), tokens/s, MFU against the device's dense bf16 peak (``orchestrator/train/throughput.py``),
and the peak allocated and reserved GPU memory over the ranks (``resources.jsonl``; on the CPU the
peak RSS). Goal: 50% MFU for the 1.3B GPT on one H100/H200.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    config: str  # conf/model/<config>.yaml
    micro_batch_size: int  # per GPU; no gradient accumulation
    lr: float
    overrides: tuple[str, ...] = field(default=())


# lr: the default optimizer's 3e-3 suits the small CPU models only; jobs/gpt2_124m_1gpu.yaml trains GPT-2
# small at 6e-4, and a 1.3B model wants less again (GPT-3 XL: 2e-4). Activation checkpointing stays off:
# the 1.3B model's activations at 8 x 1024 tokens fit an 80 GB GPU, and recomputation would cost MFU.
MODELS = {
    "tiny": ModelSpec(config="gpt_tiny", micro_batch_size=2, lr=3e-3),
    "gpt2_124m": ModelSpec(config="gpt2_124m", micro_batch_size=16, lr=6e-4),
    "gpt_1p3b": ModelSpec(config="gpt_1p3b", micro_batch_size=8, lr=3e-4),
}
STRATEGIES = ("ddp", "fsdp2", "zero1", "zero3")
COMPILE_SUFFIX = "+compile"
ALL_MODES = (*STRATEGIES, *(s + COMPILE_SUFFIX for s in STRATEGIES))

HEADER = ["model", "mode", "step time (ms)", "tokens/s", "MFU", "peak allocated (GiB)", "peak reserved (GiB)", "status"]


@dataclass(frozen=True, kw_only=True)
class Variant:
    model: str
    strategy: str
    compiled: bool

    @property
    def mode(self) -> str:
        return self.strategy + (COMPILE_SUFFIX if self.compiled else "")

    @property
    def name(self) -> str:
        return f"{self.model}-{self.mode.replace('+', '-')}"


def variants(models: list[str], modes: list[str]) -> list[Variant]:
    """The matrix, cheapest first: eager before compiled, ZeRO-3 (slowest to build) last of each, small models first."""
    chosen = [
        Variant(model=model, strategy=mode.removesuffix(COMPILE_SUFFIX), compiled=mode.endswith(COMPILE_SUFFIX))
        for model in models
        for mode in modes
    ]
    return sorted(
        chosen, key=lambda v: (v.compiled, v.strategy == "zero3", models.index(v.model), STRATEGIES.index(v.strategy))
    )


def extras_for(variant: Variant, extras: list[str]) -> list[str]:
    """The ``--extra`` overrides that apply to ``variant``: ``OVERRIDE`` for every run, ``SELECTOR:OVERRIDE`` for
    the runs of one model or mode (``zero3:...`` also selects ``zero3+compile``)."""
    chosen = []
    for extra in extras:
        selector, _, override = extra.partition(":")
        if selector in MODELS or selector in ALL_MODES:
            if selector in (variant.model, variant.mode, variant.strategy):
                chosen.append(override)
        else:
            chosen.append(extra)
    return chosen


def command(variant: Variant, *, args: argparse.Namespace, num_workers: int, run_dir: Path) -> list[str]:
    spec = MODELS[variant.model]
    if args.smoke:
        device = ["trainer.device=cpu", "trainer.precision=fp32", "data.seq_len=64", "data.vocab_size=512"]
    else:
        device = ["trainer.device=cuda", "trainer.precision=bf16", "data.seq_len=1024", "data.vocab_size=50304"]
    return [
        sys.executable,
        "-m",
        "orchestrator",
        "train",
        "launcher=local",
        "logger=jsonl",
        "data=synthetic_tokens",
        f"model={spec.config}",
        *device,
        f"strategy={variant.strategy}",
        *spec.overrides,
        f"strategy.compile={str(variant.compiled).lower()}",
        f"optim.lr={spec.lr}",
        f"launcher.num_workers={num_workers}",
        f"trainer.micro_batch_size={spec.micro_batch_size}",
        f"trainer.global_batch_size={spec.micro_batch_size * num_workers}",
        f"trainer.max_steps={args.steps}",
        f"scheduler.warmup_steps={min(10, args.steps)}",
        "trainer.eval_every=0",
        "trainer.checkpoint.every=0",
        "trainer.checkpoint.at_end=false",
        "trainer.resume=never",
        "logger.progress=false",
        f"hydra.run.dir={run_dir}",
        *extras_for(variant, args.extra),
    ]


@dataclass(kw_only=True)
class Outcome:
    status: str  # completed, failed, timed out, skipped
    summary: dict
    resources: list[dict]
    error: str = ""


def run(variant: Variant, *, args: argparse.Namespace, num_workers: int, out: Path, timeout_s: float) -> Outcome:
    """One variant in its own process group, killed with all its workers at ``timeout_s``."""
    run_dir, log = out / variant.name, out / f"{variant.name}.log"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    with open(log, "w") as log_file:
        process = subprocess.Popen(
            command(variant, args=args, num_workers=num_workers, run_dir=run_dir),
            stdout=log_file,
            stderr=subprocess.STDOUT,
            cwd=out,
            env=env,
            start_new_session=True,
        )
        try:
            process.wait(timeout=timeout_s)
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(process)
    summary = _read_json(run_dir / "summary.json")
    resources = _read_jsonl(run_dir / "resources.jsonl")
    if timed_out:
        return Outcome(
            status="timed out",
            summary=summary,
            resources=resources,
            error=f"killed after {timeout_s:.0f} s; {failure_reason(summary, log) or 'no error logged'}",
        )
    if process.returncode == 0 and summary.get("status") == "completed":
        return Outcome(status="completed", summary=summary, resources=resources)
    return Outcome(
        status="failed",
        summary=summary,
        resources=resources,
        error=f"exit {process.returncode}: {failure_reason(summary, log) or 'no error logged'}",
    )


def _kill_group(process: subprocess.Popen) -> None:
    """SIGTERM to the run's whole process group (the launcher and its workers), SIGKILL 10 s later."""
    for sig, grace_s in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=grace_s)
            return
        except subprocess.TimeoutExpired:
            continue


# Lines of a run's log that say nothing about why it failed.
_NOISE = re.compile(r"^(run dir:|\s*$|-+$|Traceback|\s+File |\s+\^+$|W\d{4} |I\d{4} |\[W|warnings\.warn)")
_ERROR = re.compile(r"^(error:|[\w.]*(Error|Exception|Interrupt)\b)")


def failure_reason(summary: dict, log: Path, *, max_chars: int = 300) -> str:
    """Why a run failed, in one line: ``summary.json``'s error, else the log's last error line, else its last lines."""
    if summary.get("error"):
        return _one_line(summary["error"], max_chars)
    try:
        lines = [line.rstrip() for line in log.read_text(errors="replace").splitlines()]
    except OSError:
        return ""
    meaningful = [line for line in lines if not _NOISE.match(line)]
    errors = [line for line in meaningful if _ERROR.match(line.strip())]
    return _one_line(errors[-1] if errors else " / ".join(meaningful[-3:]), max_chars)


def _one_line(text: str, max_chars: int) -> str:
    text = " ".join(str(text).split()).replace("|", "/")  # a table cell
    return text if len(text) <= max_chars else text[: max_chars - 3] + "..."


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _read_jsonl(path: Path) -> list[dict]:
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, ValueError):
        return []


def row(variant: Variant, outcome: Outcome) -> str:
    s = outcome.summary
    if outcome.status != "completed":
        cells = ["-"] * 5 + [f"{outcome.status}: {outcome.error}" if outcome.error else outcome.status]
    else:
        allocated = max((r.get("gpu_mem_peak_bytes", 0) for r in outcome.resources), default=0)
        allocated = allocated or s.get("peak_mem_bytes") or 0  # on the CPU: peak RSS
        reserved = max((r.get("gpu_mem_reserved_bytes", 0) for r in outcome.resources), default=0)
        cells = [
            f"{s['step_time_s_median'] * 1e3:.1f}",
            f"{s['tokens_per_s']:,.0f}",
            f"{s['mfu']:.1%}" if s.get("mfu") is not None else "-",
            f"{allocated / 2**30:.2f}",
            f"{reserved / 2**30:.2f}" if reserved else "-",
            "completed",
        ]
    return "| " + " | ".join([variant.model, variant.mode, *cells]) + " |"


def commit_of_checkout() -> str:
    """This checkout's short commit (``+`` when files differ from it); ``unknown`` without git or a repository."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=30
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if head.returncode != 0 or not head.stdout.strip():
        return "unknown"
    return head.stdout.strip() + ("+" if dirty.stdout.strip() else "")


def gpus() -> tuple[int, str, str]:
    """(visible GPUs, the first one's name, torch version), asked in a child process: this one holds no CUDA context."""
    probe = (
        "import torch; n = torch.cuda.device_count(); "
        "print(n); print(torch.cuda.get_device_name(0) if n else '-'); print(torch.__version__)"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    count, name, version = result.stdout.strip().splitlines()[-3:]
    return int(count), name, version


def parse_list(text: str, known: tuple[str, ...] | dict, what: str) -> list[str]:
    items = [item for item in text.split(",") if item]
    unknown = [item for item in items if item not in known]
    if unknown or not items:
        raise SystemExit(f"{what}: unknown {unknown or text!r}; choose from {','.join(known)}")
    return items


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--models",
        default=None,
        help=f"comma-separated, of {','.join(MODELS)} (default: gpt2_124m,gpt_1p3b; tiny with --smoke)",
    )
    parser.add_argument(
        "--modes",
        default=",".join(ALL_MODES),
        help=f"comma-separated strategies, each eager or with {COMPILE_SUFFIX} (default: all 8)",
    )
    parser.add_argument("--steps", type=int, default=None, help="training steps per run (default 30; 2 with --smoke)")
    parser.add_argument("--run-timeout", type=float, default=150.0, help="seconds before a run is killed")
    parser.add_argument(
        "--budget",
        type=float,
        default=460.0,
        help="seconds for the whole matrix: no run starts after, and none runs past it "
        "(the default fits the 16 default runs, start-up and install into 10 minutes)",
    )
    parser.add_argument(
        "--extra",
        action="append",
        default=[],
        metavar="[MODEL|MODE:]OVERRIDE",
        help="a config override for every run, or for one model's or mode's runs; repeatable",
    )
    parser.add_argument("--out", type=Path, default=None, help="where run dirs and logs go (default: a new temp dir)")
    parser.add_argument("--commit", default=None, help="the commit for the title (default: git's, else unknown)")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="tiny sizes on the CPU, 1 worker, fp32: checks this script, measures nothing",
    )
    parser.add_argument("--append", type=Path, default=None, help="append the finished table to this markdown file")
    args = parser.parse_args()
    args.steps = args.steps or (2 if args.smoke else 30)
    models = parse_list(args.models or ("tiny" if args.smoke else "gpt2_124m,gpt_1p3b"), MODELS, "--models")
    matrix = variants(models, parse_list(args.modes, ALL_MODES, "--modes"))

    if args.smoke:
        num_workers, device, torch_version = 1, "cpu (smoke)", gpus()[2]
    else:
        num_workers, device, torch_version = gpus()
        if num_workers == 0:
            raise SystemExit("no CUDA GPU: run on a GPU machine, or pass --smoke")
    out = args.out or Path(tempfile.mkdtemp(prefix="bench-gpu-"))
    out.mkdir(parents=True, exist_ok=True)
    print(f"run dirs and logs under {out}", file=sys.stderr, flush=True)

    title = (
        f"### GPU: tokens/s and MFU (`bench/gpu.py`, {date.today()}, {platform.node()}, {num_workers} x {device}, "
        f"torch {torch_version}, commit {args.commit or commit_of_checkout()}, {args.steps} steps per run)"
    )
    lines = [title, "", "| " + " | ".join(HEADER) + " |", "|---|---|" + "---:|" * 5 + "---|"]
    print("\n".join(lines), flush=True)
    deadline = time.monotonic() + args.budget
    statuses = []
    for variant in matrix:
        left_s = deadline - time.monotonic()
        if left_s < 5:
            outcome = Outcome(status="skipped", summary={}, resources=[], error=f"--budget {args.budget:.0f} s spent")
        else:
            outcome = run(variant, args=args, num_workers=num_workers, out=out, timeout_s=min(args.run_timeout, left_s))
        lines.append(row(variant, outcome))
        print(lines[-1], flush=True)
        statuses.append(outcome.status)
        if outcome.status in ("failed", "timed out"):
            print(
                f"{variant.name}: {outcome.status}; run dir {out / variant.name}, log {out / variant.name}.log",
                file=sys.stderr,
                flush=True,
            )
    if args.append:
        with open(args.append, "a") as f:
            f.write("\n" + "\n".join(lines) + "\n")
    return 0 if all(status == "completed" for status in statuses) else 1


if __name__ == "__main__":
    sys.exit(main())
