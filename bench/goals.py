"""The wall-clock goals the tests do not assert (a timed test fails on a slow day; this machine's
speed varies 2x from day to day):

- bad input fails in one line within 10 s (the console script, before any worker starts);
- the default job (`make run`) trains from a cold data cache within 3 minutes.

    python bench/goals.py                  # both, once
    python bench/goals.py --skip-default   # the bad-input cases only (seconds)

Each case is a fresh `orchestrator` process, timed from spawn to exit; the table says whether it met
its goal. Numbers go to bench/RESULTS.md by hand, with the date and the machine.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CLI = Path(sys.executable).with_name("orchestrator")
BAD_INPUT_GOAL_S = 10.0
DEFAULT_JOB_GOAL_S = 180.0
BAD_INPUT = {
    "unknown key": ["trainer.max_stpes=10"],
    "unknown model": ["model=transformer9000"],
    "batch not divisible": ["trainer.global_batch_size=15"],
    "more workers than cores": ["launcher.num_workers=64", "trainer.global_batch_size=512"],
    "missing resume path": ["trainer.resume=/nonexistent/checkpoints/step-00000200"],
}


def timed(args: list[str], *, cwd: Path, env: dict[str, str]) -> tuple[float, int]:
    started = time.perf_counter()
    result = subprocess.run([str(CLI), *args], cwd=cwd, env={**os.environ, **env}, capture_output=True, text=True)
    return time.perf_counter() - started, result.returncode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--skip-default", action="store_true", help="leave out the default job (minutes)")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name, overrides in BAD_INPUT.items():
            wall_s, code = timed(["train", *overrides], cwd=work, env={})
            rows.append((f"bad input: {name}", wall_s, BAD_INPUT_GOAL_S, code == 2))
        if not args.skip_default:
            wall_s, code = timed(
                ["train", f"data.cache_dir={work / 'cache'}", f"hydra.run.dir={work / 'run'}", "logger.progress=false"],
                cwd=work,
                env={"WANDB_MODE": "offline"},
            )
            rows.append(("default job, cold cache", wall_s, DEFAULT_JOB_GOAL_S, code == 0))
    print("| case | wall time | goal | met | exit as expected |\n|---|---:|---:|---|---|")
    for name, wall_s, goal_s, exit_ok in rows:
        print(
            f"| {name} | {wall_s:.1f} s | {goal_s:.0f} s | {'yes' if wall_s <= goal_s else 'NO'} | "
            f"{'yes' if exit_ok else 'NO'} |"
        )


if __name__ == "__main__":
    main()
