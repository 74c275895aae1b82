"""``orchestrator verify``: the same job under several strategies, compared step by step.

Each strategy trains ``verify.steps`` steps of the job at the same seed, data and world size, in its
own run dir under the verify dir. Then the per-step losses and gradient norms are printed side by
side with the largest relative deviation from the first strategy, and the command fails when that
exceeds ``verify.tolerance``. In fp32 on CPU every strategy computes the same sums in nearly the same
order, so a deviation above ~1e-5 means a strategy trains a different model, not rounding.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.config.compose import compose, override_value, to_config
from orchestrator.config.schema import Config
from orchestrator.fsutil import write_atomic
from orchestrator.launch import run_job
from orchestrator.launch.prepared import prepare_composed
from orchestrator.rundir import RunDir, RunSummary
from orchestrator.tracking.jsonl import read_jsonl

METRICS = ("loss", "grad_norm")


@dataclass(frozen=True, kw_only=True)
class Deviation:
    metric: str
    value: float  # largest |x - reference| / |reference| over strategies and steps
    strategy: str
    step: int


def verify_command(overrides: list[str]) -> int:
    """Runs the verification; exit status 0 when every strategy agrees within the tolerance."""
    base = to_config(compose(overrides))
    settings = base.verify
    job = override_value(overrides, "job") or "default"
    # Every run is checked before the first one starts.
    jobs = {
        name: prepare_composed(compose([*overrides, *_run_overrides(name, base)]), job_name=job)
        for name in settings.strategies
    }

    out_dir = Path(settings.output_dir or Path("outputs") / "verify" / job / time.strftime("%Y-%m-%d_%H-%M-%S"))
    summaries: dict[str, RunSummary] = {}
    for name, prepared in jobs.items():
        print(f"verify: {name} ({settings.steps} steps, {prepared.config.launcher.num_workers} workers)", flush=True)
        summaries[name] = run_job(prepared, run_dir=out_dir / name, print_summary=False)

    series = {name: _series(out_dir / name) for name in jobs}
    reference = settings.strategies[0]
    deviations = [largest_deviation(series, reference=reference, metric=m) for m in METRICS]
    failed = [name for name, summary in summaries.items() if not summary.completed]
    passed = not failed and all(d.value <= settings.tolerance for d in deviations)
    report = format_report(
        series, summaries, deviations, reference=reference, tolerance=settings.tolerance, passed=passed, failed=failed
    )
    print(report, flush=True)
    write_atomic(out_dir / "verify.md", report + "\n")
    write_atomic(
        out_dir / "verify.json",
        json.dumps(
            {
                "reference": reference,
                "tolerance": settings.tolerance,
                "passed": passed,
                "failed": failed,
                "deviations": {
                    d.metric: {"value": d.value, "strategy": d.strategy, "step": d.step} for d in deviations
                },
                "series": {name: {str(step): values for step, values in s.items()} for name, s in series.items()},
                "memory": {name: _memory(summary) for name, summary in summaries.items()},
            },
            indent=1,
        )
        + "\n",
    )
    print(f"verify dir: {out_dir}", flush=True)
    return 0 if passed else 1


def _run_overrides(strategy: str, base: Config) -> list[str]:
    steps = base.verify.steps
    return [
        f"strategy={strategy}",
        f"trainer.max_steps={steps}",
        f"scheduler.warmup_steps={min(base.scheduler.warmup_steps, steps)}",
        "trainer.eval_every=0",
        "trainer.checkpoint.every=0",
        "trainer.checkpoint.at_end=false",
        "trainer.resume=never",
        "logger.progress=false",
    ]


def _series(run_dir: Path) -> dict[int, dict[str, float]]:
    return {r["step"]: {m: r[m] for m in METRICS} for r in read_jsonl(RunDir(run_dir).metrics) if "loss" in r}


def largest_deviation(series: dict[str, dict[int, dict[str, float]]], *, reference: str, metric: str) -> Deviation:
    """The largest relative deviation of ``metric`` from the reference strategy, over all steps.

    A step missing from a strategy (it failed early), or a non-finite value, counts as infinite.
    """
    worst = Deviation(metric=metric, value=0.0, strategy=reference, step=0)
    for name, steps in series.items():
        if name == reference:
            continue
        for step, expected in series[reference].items():
            value = steps.get(step, {}).get(metric)
            want = expected[metric]
            if value is None or want is None:
                deviation = float("inf")
            else:
                deviation = abs(value - want) / max(abs(want), 1e-12)
            if deviation > worst.value:
                worst = Deviation(metric=metric, value=deviation, strategy=name, step=step)
    return worst


def _memory(summary: RunSummary) -> dict[str, Any]:
    return {
        "param_bytes": summary.param_bytes,
        "grad_bytes": summary.grad_bytes,
        "optimizer_bytes": summary.optimizer_bytes,
        "master_bytes": summary.master_bytes,
        "num_params": summary.num_params,
        "world_size": summary.world_size,
    }


def format_report(
    series: dict[str, dict[int, dict[str, float]]],
    summaries: dict[str, RunSummary],
    deviations: list[Deviation],
    *,
    reference: str,
    tolerance: float,
    passed: bool,
    failed: list[str],
) -> str:
    """The side-by-side tables and the verdict, as markdown (it reads as well in a terminal)."""
    names = list(series)
    lines = []
    for metric in METRICS:
        lines += [f"| step | {' | '.join(f'{name} {metric}' for name in names)} |", "|---:|" + "---:|" * len(names)]
        for step in sorted(series[reference]):
            cells = [_number(series[name].get(step, {}).get(metric)) for name in names]
            lines.append(f"| {step} | {' | '.join(cells)} |")
        lines.append("")
    lines += [
        "| strategy | params MiB | grads MiB | optimizer MiB | master copy MiB | tokens/s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, summary in summaries.items():
        memory = [
            _mib(value)
            for value in (summary.param_bytes, summary.grad_bytes, summary.optimizer_bytes, summary.master_bytes)
        ]
        tokens = f"{summary.tokens_per_s:,.0f}" if summary.tokens_per_s else "-"
        lines.append(f"| {name} | {' | '.join(memory)} | {tokens} |")
    lines.append("")
    for d in deviations:
        lines.append(
            f"largest relative deviation from {reference} in {d.metric}: {d.value:.2e}"
            + (f" ({d.strategy}, step {d.step})" if d.value else "")
        )
    if failed:
        lines.append(f"failed runs: {', '.join(failed)}")
    lines.append(f"tolerance {tolerance:.0e}: {'PASS' if passed else 'FAIL'}")
    return "\n".join(lines)


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.7g}"


def _mib(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**20:.2f}"
