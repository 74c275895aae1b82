"""Helpers for tests that run the installed console script."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Iterable

import psutil

from orchestrator.checkpoints import manifest

REPO = Path(__file__).resolve().parents[1]
CLI = Path(sys.executable).with_name("orchestrator")


def run_cli(
    *args: str, cwd: Path, timeout: float = 300, env: dict[str, str] | None = None, check: bool = False
) -> subprocess.CompletedProcess:
    """Runs the installed ``orchestrator`` console script and returns its completed process."""
    result = subprocess.run(
        [str(CLI), *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"orchestrator {' '.join(args)} exited {result.returncode}\n"
            f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
        )
    return result


def read_jsonl(path: Path) -> list[dict]:
    # A run still writing may have appended half a line: only whole (newline-terminated) lines are records.
    text = path.read_text()
    whole = text[: text.rfind("\n") + 1]
    return [json.loads(line) for line in whole.splitlines() if line.strip()]


def committed_step(run_dir: Path) -> int:
    """The step of the run's newest committed checkpoint, the one ``checkpoints/latest`` names (0: none yet).
    Saves are asynchronous: a step's checkpoint is committed some steps after the step, once every rank
    has written its part, and a run killed before that resumes from the one before."""
    latest = run_dir / "checkpoints" / "latest"
    name = latest.read_text().strip() if latest.exists() else ""
    return (manifest.step_of(run_dir / "checkpoints" / name) or 0) if name else 0


def alive(process: psutil.Process) -> bool:
    """Whether the process still runs (a killed orphan can stay a zombie where the container's init does
    not reap it: it is gone)."""
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def wait_gone(processes: Iterable[psutil.Process], timeout_s: float) -> list[str]:
    """Waits up to ``timeout_s`` (a hang guard: it returns as soon as they are gone) for the processes to
    exit; returns those still running, described."""
    processes = list(processes)
    deadline = time.monotonic() + timeout_s
    while any(alive(p) for p in processes) and time.monotonic() < deadline:
        time.sleep(0.5)
    left = []
    for process in filter(alive, processes):
        with contextlib.suppress(psutil.Error):
            left.append(f"{process.pid} {' '.join(process.cmdline())[:80]}")
    return left


def process_group_tree(pid: int) -> set[psutil.Process]:
    """A process, the members of its process group and all their descendants (a Ray node's processes)."""
    roots = [psutil.Process(pid)]
    for process in psutil.process_iter():
        try:
            if process.pid != pid and os.getpgid(process.pid) == pid:
                roots.append(process)
        except (OSError, psutil.Error):
            continue
    return {found for root in roots for found in [root, *root.children(recursive=True)]}


def listening(processes: Iterable[psutil.Process]) -> list[tuple[str, str, int]]:
    """(name, address, port) of every socket the processes listen on."""
    found = []
    for process in processes:
        try:
            found += [
                (process.name(), c.laddr.ip, c.laddr.port)
                for c in process.net_connections(kind="inet")
                if c.status == psutil.CONN_LISTEN
            ]
        except psutil.NoSuchProcess:
            continue
    return found


def is_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip.split("%")[0])
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1, an IPv6 socket bound to 127.0.0.1
    return (mapped or address).is_loopback


def train_losses(run_dir: Path) -> dict[int, float]:
    """step -> training loss from a run's metrics.jsonl."""
    return {r["step"]: r["loss"] for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r}


MAX_STEPS = 40


def tiny_job(cache_dir: Path) -> list[str]:
    """A 2-worker DDP GPT job that trains in a few seconds on two CPU cores (torch elastic: no Ray start-up)."""
    return [
        "job=gpt_tiny_cpu",
        "launcher=local",
        f"data.cache_dir={cache_dir}",
        "data.max_bytes=400000",
        "data.seq_len=32",
        "trainer.max_steps=20",
        "trainer.global_batch_size=8",
        "trainer.micro_batch_size=4",
        "trainer.eval_every=10",
        "trainer.eval_batches=2",
        "trainer.checkpoint.every=10",
        "logger.progress=false",
    ]


# A tiny Llama (transformers) job: the model is the saved config's (`save_tiny_llama`) or model.config.*.
TINY_HF_JOB = [
    "job=llama_tiny_cpu",
    "model=hf",
    "launcher=local",
    "data.max_bytes=400000",
    "data.seq_len=32",
    "trainer.global_batch_size=4",
    "trainer.micro_batch_size=2",
    "trainer.eval_every=0",
    "scheduler.warmup_steps=0",
    "logger.progress=false",
]

# Overrides that make one step keep the weights it starts from (a learning rate too small to move an fp32
# weight) and save them: the step-1 checkpoint holds the weights the run loaded.
KEEP_LOADED_WEIGHTS = [
    "optim.lr=1e-30",
    "optim.weight_decay=0",
    "trainer.max_steps=1",
    "trainer.checkpoint.every=1",
]


def resume_job(cache_dir: Path, run_dir: Path, *extra: str) -> list[str]:
    """A 2-rank DDP GPT with dropout (so RNG state matters), a checkpoint every 10 steps: the resume tests' job."""
    return [
        "train",
        "job=gpt_tiny_cpu",
        "launcher=local",
        f"data.cache_dir={cache_dir}",
        "data.max_bytes=400000",
        "data.seq_len=64",
        "model.dropout=0.1",
        f"trainer.max_steps={MAX_STEPS}",
        "trainer.global_batch_size=16",
        "trainer.micro_batch_size=4",
        "trainer.eval_every=20",
        "trainer.eval_batches=2",
        "trainer.checkpoint.every=10",
        "scheduler.warmup_steps=5",
        "logger.progress=false",
        f"hydra.run.dir={run_dir}",
        *extra,
    ]


def cli_in_process(*args: str, cwd: Path, check: bool = False) -> subprocess.CompletedProcess:
    """``orchestrator ARGS`` through the CLI's own ``main`` in this process, which has torch and the package
    imported already (a console script spends seconds on that): the same completed process ``run_cli``
    returns, its stdout and stderr read from this process's file descriptors 1 and 2, which the run's
    forked workers write to as well. For runs that are not killed or timed: those stay subprocesses."""
    from orchestrator.cli import main

    saved_cwd, saved_streams = os.getcwd(), (sys.stdout, sys.stderr)
    # A run that reaches Hydra's run_job gives the root logger handlers on this run's streams.
    root_handlers, root_level = logging.root.handlers[:], logging.root.level
    outputs = [tempfile.TemporaryFile(), tempfile.TemporaryFile()]
    sys.stdout.flush()
    sys.stderr.flush()
    saved_fds = [os.dup(1), os.dup(2)]
    os.chdir(cwd)
    try:
        for output, fd in zip(outputs, (1, 2)):
            os.dup2(output.fileno(), fd)
        sys.stdout, sys.stderr = (open(fd, "w", buffering=1, closefd=False) for fd in (1, 2))
        try:
            code = main(list(args))
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        sys.stdout, sys.stderr = saved_streams
        for saved, fd in zip(saved_fds, (1, 2)):
            os.dup2(saved, fd)
            os.close(saved)
        os.chdir(saved_cwd)
        logging.root.handlers[:] = root_handlers
        logging.root.setLevel(root_level)
    stdout, stderr = (_read(output) for output in outputs)
    result = subprocess.CompletedProcess(["orchestrator", *args], code or 0, stdout, stderr)
    if check and result.returncode != 0:
        raise AssertionError(
            f"orchestrator {' '.join(args)} exited {result.returncode}\nstdout:\n{stdout}\nstderr:\n{stderr}"
        )
    return result


def _read(output: IO[bytes]) -> str:
    with output:
        output.seek(0)
        return output.read().decode(errors="replace")


class Payload:
    """Pickles as a call of ``os.system`` that touches ``marker``: what a malicious checkpoint holds."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def save_tiny_llama(
    directory: Path,
    *,
    vocab_size: int = 4096,
    layers: int = 2,
    max_positions: int = 256,
    max_shard_size: str | None = None,
) -> Path:
    """A tiny Llama as ``save_pretrained`` writes it (made by transformers itself, random weights from seed 0:
    nothing can be downloaded here); the tied head makes ``lm_head.weight`` absent from the files."""
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=True,
        max_position_embeddings=max_positions,
    )
    model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(directory, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    return directory
