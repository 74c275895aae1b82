"""An ``orchestrator scale`` experiment's outputs: ``scale.json``, ``scale.csv``, ``scale.md`` and the
three charts, written by the experiment after every point and read by the report."""

from __future__ import annotations

import csv
import io
import json
import time
from pathlib import Path
from typing import Any

from orchestrator.errors import first_line
from orchestrator.fsutil import write_atomic
from orchestrator.report.svg import Chart, Series, standalone
from orchestrator.tracking.console import format_bytes, format_si

RESULTS_FILE = "scale.json"
COLUMNS = (
    "strategy",
    "workers",
    "status",
    "global_batch_size",
    "grad_accum_steps",
    "step_time_s",
    "tokens_per_s",
    "tokens_per_s_per_worker",
    "efficiency",
    "mfu",
    "peak_mem_bytes",
    "model_state_bytes",
    "run_dir",
    "error",
)
PLOTS = {"scale_throughput": "throughput.svg", "scale_efficiency": "efficiency.svg", "scale_memory": "memory.svg"}


def with_efficiency(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each completed row's efficiency against its strategy's smallest completed worker count."""
    baselines: dict[str, dict[str, Any]] = {}
    for row in sorted(rows, key=lambda r: r["workers"]):
        if row["tokens_per_s_per_worker"] is not None:
            baselines.setdefault(row["strategy"], row)
    for row in rows:
        base = baselines.get(row["strategy"])
        if row["tokens_per_s_per_worker"] is not None and base is not None:
            row["efficiency"] = row["tokens_per_s_per_worker"] / base["tokens_per_s_per_worker"]
            row["baseline_workers"] = base["workers"]
    return rows


def write_outputs(out_dir: Path, meta: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    """scale.json, scale.csv, scale.md and the plots, each written whole (atomically)."""
    rows = with_efficiency(rows)
    complete = all(row["status"] not in ("pending", "running") for row in rows)
    write_atomic(
        out_dir / RESULTS_FILE,
        json.dumps({**meta, "complete": complete, "updated": time.time(), "points": rows}, indent=1) + "\n",
    )
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows({key: "" if row.get(key) is None else row[key] for key in COLUMNS} for row in rows)
    write_atomic(out_dir / "scale.csv", text.getvalue())
    write_atomic(out_dir / "scale.md", markdown_table(rows, mode=meta["mode"]) + "\n")
    for chart in scale_charts(rows):
        write_atomic(out_dir / PLOTS[chart.key], standalone(chart))


TABLE_HEADER = [
    "strategy",
    "workers",
    "global batch",
    "accum",
    "step time",
    "tokens/s",
    "tokens/s/worker",
    "efficiency",
    "MFU",
    "peak mem/rank",
    "status",
]


def table_rows(rows: list[dict[str, Any]]) -> list[list[str]]:
    """The rows as the markdown table and the HTML report show them."""

    def cell(value: Any, form: str) -> str:
        return "-" if value is None else format(value, form)

    return [
        [
            row["strategy"],
            str(row["workers"]),
            str(row["global_batch_size"]),
            cell(row["grad_accum_steps"], "d"),
            "-" if row["step_time_s"] is None else f"{row['step_time_s'] * 1000:.1f} ms",
            cell(row["tokens_per_s"], ",.0f"),
            cell(row["tokens_per_s_per_worker"], ",.0f"),
            cell(row["efficiency"], ".0%"),
            cell(row["mfu"], ".1%"),
            format_bytes(row["peak_mem_bytes"]) if row["peak_mem_bytes"] else "-",
            row["status"] + (f": {first_line(row['error'])}" if row.get("error") else ""),
        ]
        for row in rows
    ]


def markdown_table(rows: list[dict[str, Any]], *, mode: str) -> str:
    rows = with_efficiency(rows)
    lines = [f"| {' | '.join(TABLE_HEADER)} |", "|---|" + "---:|" * (len(TABLE_HEADER) - 2) + "---|"]
    lines += [f"| {' | '.join(cells)} |" for cells in table_rows(rows)]
    counts = {row["strategy"]: row["baseline_workers"] for row in rows if row.get("baseline_workers")}
    if len(set(counts.values())) == 1:
        against = f"the same strategy at {next(iter(counts.values()))} worker(s)"
    else:
        against = ", ".join(f"{name} at {count}" for name, count in counts.items()) or "the smallest worker count"
    lines += ["", f"{mode} scaling; efficiency = tokens/s per worker against {against}"]
    return "\n".join(lines)


def scale_charts(rows: list[dict[str, Any]]) -> list[Chart]:
    """Throughput, efficiency and peak memory per rank against workers, one line per strategy."""
    strategies = list(dict.fromkeys(row["strategy"] for row in rows))

    def lines(key: str, scale: float = 1.0) -> list[Series]:
        return [
            Series(
                name,
                [
                    (row["workers"], row[key] * scale)
                    for row in rows
                    if row["strategy"] == name and row.get(key) is not None
                ],
            )
            for name in strategies
        ]

    counts = sorted({row["workers"] for row in rows})
    largest = max((row["peak_mem_bytes"] or 0 for row in rows), default=0)
    unit, size = ("GiB", float(1 << 30)) if largest >= 10 << 30 else ("MiB", float(1 << 20))
    return [
        Chart(
            "scale_throughput",
            "Throughput",
            "workers",
            "tokens/s",
            lines("tokens_per_s"),
            y_format=format_si,
            markers=True,
            x_ticks=counts,
        ),
        Chart(
            "scale_efficiency",
            "Scaling efficiency",
            "workers",
            "%",
            lines("efficiency", 100.0),
            markers=True,
            x_ticks=counts,
        ),
        Chart(
            "scale_memory",
            "Peak memory per rank",
            "workers",
            unit,
            lines("peak_mem_bytes", 1 / size),
            markers=True,
            x_ticks=counts,
        ),
    ]
