"""Data preparation speed: MB/s of building the default corpus's token cache on one core and on every core.

    python bench/data_prep.py                        # 3 interleaved rounds, the whole default corpus
    python bench/data_prep.py --max-bytes 10000000 --append bench/RESULTS.md
    python bench/data_prep.py --baseline /tmp/old    # also an older checkout's code (git archive COMMIT)
    python bench/data_prep.py --one-file             # the same corpus as one file

Each run is a fresh process preparing ``conf/data/stdlib.yaml`` (the standard library's ``.py`` files,
a 4096-token byte-level BPE) into an empty cache dir: reading the files, training the tokenizer,
encoding the corpus, writing the token files; with ``--one-file``, the same files concatenated into
one (a corpus of one big file, which a preparation that spreads files over the cores runs on one).
Variants:

- ``1 core``: the process pinned to one CPU (tokenizers then runs one thread): the serial baseline;
- ``every core``: the process on all the CPUs it was given;
- ``every core, baseline``: the same with the ``orchestrator`` package of ``--baseline DIR``.

Each round runs every variant once, in a rotated order. The table gives MB/s (corpus bytes over wall
time) of the whole preparation and of its encoding step alone (``bpe.encode_corpus``; absent from a
baseline that has no such function), medians over the rounds, and the cores the preparation kept busy
(its CPU time over its wall time): on a machine that other work keeps busy, that is where the
difference shows, not in MB/s. The header gives the load average when the benchmark started.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def child(cache_dir: str, *, num_cores: int, max_bytes: int, one_file: bool) -> None:
    """Prepare the default corpus into ``cache_dir`` on ``num_cores`` CPUs; print the timings as JSON."""
    cpus = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, cpus[:num_cores])  # before tokenizers starts its thread pool, sized to these
    # Imported before the clock starts, as a baseline may import them inside prepare_data: torch (through
    # the token dataset) and tokenizers are not preparation time.
    import tokenizers  # noqa: F401
    from omegaconf import OmegaConf

    import orchestrator
    import orchestrator.data.text  # noqa: F401
    from orchestrator.config.schema import TextDataConfig
    from orchestrator.data import prepare_data

    stdlib = OmegaConf.load(REPO / "conf/data/stdlib.yaml")
    stdlib.pop("defaults")
    cfg = OmegaConf.to_object(
        OmegaConf.merge(OmegaConf.structured(TextDataConfig), stdlib, {"cache_dir": cache_dir, "max_bytes": max_bytes})
    )
    if one_file:
        corpus = Path(cache_dir) / "corpus.txt"
        corpus.write_bytes(b"".join(path.read_bytes() for path in orchestrator.data.text.find_corpus_files(cfg)))
        cfg = dataclasses.replace(cfg, paths=[str(corpus)], max_bytes=0)
    encode_s = []
    try:
        from orchestrator.data import bpe

        encode = bpe.encode_corpus

        def timed_encode(*args, **kwargs):
            start = time.perf_counter()
            try:
                return encode(*args, **kwargs)
            finally:
                encode_s.append(time.perf_counter() - start)

        bpe.encode_corpus = timed_encode
    except ImportError:
        pass  # a baseline from before bpe.py: the whole preparation only
    start, usage = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    prepare_data(cfg)
    prepare_s = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu_s = after.ru_utime - usage.ru_utime + after.ru_stime - usage.ru_stime
    (meta_path,) = Path(cache_dir).glob("text/*/meta.json")
    num_bytes = json.loads(meta_path.read_text())["corpus"]["num_bytes"]
    print(
        json.dumps(
            {
                "num_bytes": num_bytes,
                "prepare_s": prepare_s,
                "cpu_s": cpu_s,
                "encode_s": sum(encode_s) if encode_s else None,
                "cores": len(os.sched_getaffinity(0)),
                "code": str(Path(orchestrator.__file__).parents[1]),
            }
        )
    )


def run(variant: str, *, tmp: Path, max_bytes: int, one_file: bool, baseline: Path | None) -> dict:
    """One fresh process preparing into a new, empty cache dir."""
    num_cores = 1 if variant == "1 core" else len(os.sched_getaffinity(0))
    source = baseline if variant.endswith("baseline") else REPO
    with tempfile.TemporaryDirectory(dir=tmp) as cache_dir:
        result = subprocess.run(
            [
                sys.executable,
                str(Path(__file__).resolve()),
                "--child",
                cache_dir,
                "--cores",
                str(num_cores),
                "--max-bytes",
                str(max_bytes),
                *(["--one-file"] if one_file else []),
            ],
            env={**os.environ, "PYTHONPATH": str(source)},
            capture_output=True,
            text=True,
        )
    if result.returncode:
        raise RuntimeError(f"{variant} exited {result.returncode}:\n{result.stderr}")
    timings = json.loads(result.stdout.strip().splitlines()[-1])
    if Path(timings["code"]).resolve() != Path(source).resolve():
        raise RuntimeError(f"{variant} ran the code in {timings['code']}, not {source}")
    return timings


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-bytes", type=int, default=0, help="data.max_bytes (0: the whole default corpus)")
    parser.add_argument("--one-file", action="store_true", help="the default corpus concatenated into one file")
    parser.add_argument("--baseline", type=Path, default=None, help="a checkout whose code to time as well")
    parser.add_argument("--append", type=Path, default=None, help="append the table to this markdown file")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--cores", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, num_cores=args.cores, max_bytes=args.max_bytes, one_file=args.one_file)
        return 0

    variants = ["1 core", "every core"] + (["every core, baseline"] if args.baseline else [])
    results: dict[str, list[dict]] = {variant: [] for variant in variants}
    load_average = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as name:
        for round_ in range(args.rounds):
            for variant in variants[round_ % len(variants) :] + variants[: round_ % len(variants)]:
                result = run(
                    variant, tmp=Path(name), max_bytes=args.max_bytes, one_file=args.one_file, baseline=args.baseline
                )
                results[variant].append(result)
                print(
                    f"round {round_ + 1}/{args.rounds} {variant}: {result['prepare_s']:.2f} s",
                    file=sys.stderr,
                    flush=True,
                )

    num_bytes = results[variants[0]][0]["num_bytes"]

    def rate(variant: str, key: str) -> str:
        seconds = [r[key] for r in results[variant] if r[key] is not None]
        return f"{num_bytes / statistics.median(seconds) / 1e6:.2f}" if seconds else "-"

    def cores_busy(variant: str) -> str:
        return f"{statistics.median(r['cpu_s'] / r['prepare_s'] for r in results[variant]):.2f}"

    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
    ).stdout.strip()
    corpus = "the default corpus as one file" if args.one_file else "the default corpus"
    lines = [
        f"### Data preparation: {corpus}, cold cache ({date.today()}, {platform.node() or 'host'}, "
        f"{len(os.sched_getaffinity(0))} CPUs, load {load_average:.1f}, commit {commit}, {num_bytes / 1e6:.1f} MB, "
        f"{args.rounds} rounds interleaved)",
        "",
        "| variant | CPUs | prepare MB/s (median) | encode MB/s (median) | cores busy (median) "
        "| prepare s, all rounds |",
        "|---|---:|---:|---:|---:|---|",
        *(
            f"| {v} | {results[v][0]['cores']} | {rate(v, 'prepare_s')} | {rate(v, 'encode_s')} | {cores_busy(v)} | "
            f"{', '.join(format(r['prepare_s'], '.1f') for r in results[v])} |"
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
