"""Checkpoint save and load at 2 CPU ranks under ddp, fsdp2 and zero3, against the disk's own bandwidth.

    python bench/checkpoint.py                                  # GPT 12 x 1280 (~0.25B), AdamW, ddp, fsdp2, zero3
    python bench/checkpoint.py --layers 20 --width 2048         # ~1B (needs ~40 GiB of host memory under ddp)
    python bench/checkpoint.py --strategies fsdp2 --dir /scratch/bench

Each strategy runs in fresh processes (2 gloo ranks, forked as launcher=local does): the model is
set up and takes one AdamW step (so the optimizer state exists), then ``Checkpointer.save`` writes a
checkpoint (the whole protocol: files, fsync, hashes, manifest, rename) and ``first_valid`` plus
``Checkpointer.restore`` read it back (verification shared across ranks, then the load), after its
files were dropped from the page cache. Times are rank 0's, barrier to barrier.

Then two asynchronous saves (``trainer.checkpoint.async_save``) of the same state: the time training
is blocked by each is the ``save`` call (the host copy) plus the ``commit`` call that completes it at a
step boundary once the background write is done (manifest, rename, ``latest``); the time the
background write took is reported beside it. The first copies into fresh host memory, the second
into the buffers the first left (what every save after a run's first does).

Then, in the same run and under the same directory, one file of the checkpoint's size is written
and fsynced (sequential write bandwidth), dropped from the page cache with
``posix_fadvise(DONTNEED)`` and read back (sequential read bandwidth); it is read a second time from
the page cache, so a cold read far slower than the cached one shows that the drop took effect. The
ratio is (checkpoint bytes / save time) / write bandwidth.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

GIB = 2**30
CHUNK_BYTES = 64 << 20


def _drop_from_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # only clean pages can be dropped
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _measure(dist, strategy_name: str, layers: int, width: int, root: str) -> dict[str, float]:
    import torch
    import torch.nn.functional as F

    from orchestrator.checkpoints import manifest
    from orchestrator.config.compose import compose, to_config
    from orchestrator.data import load_data
    from orchestrator.models import build_model, model_blocks
    from orchestrator.models.recipe import ModelRecipe
    from orchestrator.strategies import build_strategy
    from orchestrator.train.checkpoint import Checkpointer, first_valid
    from orchestrator.train.optim import build_optimizer

    os.environ["DS_ACCELERATOR"] = "cpu"
    config = to_config(
        compose(
            [
                "model=gpt_tiny",
                f"model.n_layer={layers}",
                f"model.n_embd={width}",
                f"model.n_head={width // 128}",
                "data=synthetic_tokens",
                "data.vocab_size=4096",
                "data.seq_len=64",
                "optim=adamw",
                f"strategy={strategy_name}",
                "scheduler.warmup_steps=0",
                "trainer.global_batch_size=2",
                "trainer.micro_batch_size=1",
            ]
        )
    )
    data = load_data(config.data)
    recipe = ModelRecipe(
        build=partial(build_model, config.model, data.spec), blocks=partial(model_blocks, config.model)
    )
    torch.manual_seed(0)
    strategy = build_strategy(config, dist=dist)
    strategy.setup(recipe, build_optimizer=partial(build_optimizer, config.optim))
    inputs, targets = data.train.get_batch(torch.arange(dist.rank, dist.rank + 1).numpy())
    with strategy.accumulate(sync=True), strategy.autocast():
        loss = F.cross_entropy(strategy.model(inputs).flatten(0, 1).float(), targets.flatten())
    strategy.backward(loss)
    strategy.step(lr=1e-4, max_norm=1.0, guard=math.isfinite)

    checkpointer = Checkpointer(
        Path(root) / strategy_name, dist=dist, strategy=strategy, strategy_name=strategy_name, keep=2, model_shapes={}
    )
    dist.barrier()
    start = time.perf_counter()
    directory = checkpointer.save(1, {"step": 1})
    save_s = time.perf_counter() - start
    if dist.is_main:
        for path in directory.rglob("*"):
            if path.is_file():
                _drop_from_cache(path)
    dist.barrier()
    start = time.perf_counter()
    found = first_valid(lambda: [directory], dist=dist)
    assert found == directory, "the checkpoint just written does not verify"
    checkpointer.restore(found)
    dist.barrier()
    load_s = time.perf_counter() - start
    background = Checkpointer(
        Path(root) / f"{strategy_name}-async",
        dist=dist,
        strategy=strategy,
        strategy_name=strategy_name,
        keep=2,
        model_shapes={},
        background=True,
    )
    blocked_s, write_s, polls = [], [], []
    for step in (2, 3):
        dist.barrier()
        start = time.perf_counter()
        assert background.save(step, {"step": step}) is None
        saved_s = time.perf_counter() - start
        while True:  # a training loop's step boundaries, every 10 ms
            time.sleep(0.01)
            poll_start = time.perf_counter()
            committed = background.commit(wait=False)
            polls.append(time.perf_counter() - poll_start)
            if committed is not None:
                break
        write_s.append(poll_start - start)
        blocked_s.append(saved_s + polls.pop())
    return {
        "save_s": save_s,
        "load_s": load_s,
        "bytes": manifest.read_manifest(directory).total_bytes,
        "files": len(manifest.read_manifest(directory).files),
        "blocked_s": blocked_s,
        "write_s": write_s,
        "poll_s": sum(polls) / max(len(polls), 1),
    }


def disk_bandwidth(directory: Path, size_bytes: int) -> tuple[float, float, float]:
    """(write+fsync, cold read, cached read) bytes/s of one sequential file of ``size_bytes`` in ``directory``."""
    block = os.urandom(CHUNK_BYTES)
    path = directory / "bandwidth.bin"
    start = time.perf_counter()
    with open(path, "wb") as f:
        left = size_bytes
        while left > 0:
            left -= f.write(block[: min(left, CHUNK_BYTES)])
        f.flush()
        os.fsync(f.fileno())
    write_s = time.perf_counter() - start
    _drop_from_cache(path)
    reads = []
    for _ in range(2):  # cold, then from the page cache
        start = time.perf_counter()
        with open(path, "rb", buffering=0) as f:
            buffer = bytearray(CHUNK_BYTES)
            while f.readinto(buffer):
                pass
        reads.append(time.perf_counter() - start)
    path.unlink()
    return size_bytes / write_s, size_bytes / reads[0], size_bytes / reads[1]


def main() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository: tests/ holds the rank runner
    from tests.distributed.ranks import run_ranks

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--strategies", default="ddp,fsdp2,zero3")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--width", type=int, default=1280, help="n_embd (a multiple of 128)")
    parser.add_argument(
        "--dir",
        default=None,
        help="where checkpoints are written (default: a new directory in the system's temporary directory)",
    )
    args = parser.parse_args()
    params = args.layers * 12 * args.width**2 + args.layers * 13 * args.width + 4096 * args.width + 64 * args.width
    root = Path(tempfile.mkdtemp(prefix="bench-checkpoint-", dir=args.dir))
    print(
        f"model: GPT {args.layers} x {args.width}, {params / 1e9:.2f}B parameters, AdamW; 2 ranks; "
        f"checkpoints under {root}\n"
    )
    print(
        "| strategy | checkpoint GiB | files | save s | load s | save GB/s | disk write GB/s | save / disk write "
        "| load GB/s | disk read GB/s (cold / cached) | async: blocked s (1st / 2nd save) | blocked / save "
        "(2nd) | background write s (1st / 2nd) | poll ms |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    try:
        for name in args.strategies.split(","):
            m = run_ranks(_measure, name, args.layers, args.width, str(root))[0]
            shutil.rmtree(root / name)
            shutil.rmtree(root / f"{name}-async")
            write_bps, cold_bps, cached_bps = disk_bandwidth(root, m["bytes"])
            save_bps, load_bps = m["bytes"] / m["save_s"], m["bytes"] / m["load_s"]
            print(
                f"| {name} | {m['bytes'] / GIB:.2f} | {m['files']} | {m['save_s']:.2f} | {m['load_s']:.2f} "
                f"| {save_bps / 1e9:.2f} | {write_bps / 1e9:.2f} | {save_bps / write_bps:.0%} | {load_bps / 1e9:.2f} "
                f"| {cold_bps / 1e9:.2f} / {cached_bps / 1e9:.2f} "
                f"| {m['blocked_s'][0]:.2f} / {m['blocked_s'][1]:.2f} | {m['blocked_s'][1] / m['save_s']:.1%} "
                f"| {m['write_s'][0]:.1f} / {m['write_s'][1]:.1f} | {m['poll_s'] * 1e3:.1f} |",
                flush=True,
            )
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
