"""``orchestrator report RUN_DIR [RUN_DIR ...] -o report.html``: one HTML file with a run's (or several
runs') curves, throughput, MFU, memory, every rank's resource use, the runs' summaries and the config
keys that differ between them, and a profiled run's top operators (``trainer.profile``).

It reads only the run dirs' files (``config.yaml``, ``metrics.jsonl``, ``resources.jsonl``,
``summary.json``, ``profile/``), so it works on a run in progress (its status says so) and on runs copied from a
cluster. Everything is inline, charts included (``svg.py``): the file opens with no network.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from orchestrator import __version__
from orchestrator.errors import UserError
from orchestrator.fsutil import write_atomic
from orchestrator.report.scale import RESULTS_FILE, TABLE_HEADER, scale_charts, table_rows, with_efficiency
from orchestrator.report.svg import PALETTE, Chart, Series, render
from orchestrator.rundir import PROFILE_DIR, RunDir, RunSummary
from orchestrator.tracking.console import format_bytes, format_duration, format_si
from orchestrator.tracking.jsonl import read_jsonl


@dataclass
class Run:
    name: str
    path: Path
    config: dict[str, Any]
    metrics: list[dict[str, Any]]
    resources: list[dict[str, Any]]
    summary: RunSummary | None  # None: still running, or killed before it wrote one

    @property
    def status(self) -> str:
        return self.summary.status if self.summary else "running (or stopped)"


def find_runs(paths: list[Path]) -> list[Path]:
    """Each path is a run dir, or a dir of run dirs (a sweep's ``multirun/...``): the run dirs, in order.

    Raises:
        UserError: a path does not exist or holds no run.
    """
    runs: list[Path] = []
    for path in paths:
        if not path.is_dir():
            raise UserError(f"{path}: no such directory (give run dirs, or a sweep's dir of run dirs)")
        if RunDir(path).is_run():
            runs.append(path)
            continue
        inner = sorted(
            (p for p in path.iterdir() if p.is_dir() and RunDir(p).is_run()),
            key=lambda p: (not p.name.isdigit(), int(p.name) if p.name.isdigit() else 0, p.name),
        )
        if not inner:
            raise UserError(
                f"{path}: not a run dir (no metrics.jsonl, summary.json or config.yaml) and no run dirs inside"
            )
        runs.extend(inner)
    return runs


def load_run(path: Path, name: str) -> Run:
    files = RunDir(path)
    try:
        config = yaml.safe_load(files.config.read_text()) if files.config.exists() else {}
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: unreadable run file ({exc.__class__.__name__}: {str(exc).splitlines()[0]})") from None
    summary = RunSummary.read(files.summary) if files.summary.exists() else None
    return Run(
        name=name,
        path=path,
        config=config or {},
        metrics=read_jsonl(files.metrics),
        resources=read_jsonl(files.resources),
        summary=summary,
    )


def run_names(paths: list[Path]) -> list[str]:
    """Short unique names: the shortest path suffixes that tell the runs apart."""
    for depth in range(1, 6):
        names = ["/".join(p.resolve().parts[-depth:]) for p in paths]
        if len(set(names)) == len(names):
            return names
    return [str(p) for p in paths]


# ------------------------------------------------------------------------------------------ charts


def charts(runs: list[Run]) -> list[Chart]:
    steps = [(run, [m for m in run.metrics if m.get("loss") is not None]) for run in runs]
    evals = [(run, [m for m in run.metrics if m.get("eval_loss") is not None]) for run in runs]

    def per_run(key: str, *, scale: float = 1.0) -> list[Series]:
        return [
            Series(f"{run.name}", [(m["step"], m[key] * scale) for m in records if m.get(key) is not None])
            for run, records in steps
        ]

    def in_bytes(key: str, records: list[dict[str, Any]]) -> tuple[str, float]:
        """The unit (MiB or GiB) the largest value of ``key`` reads best in, and its size."""
        largest = max((r[key] for r in records if r.get(key) is not None), default=0)
        return ("GiB", float(1 << 30)) if largest >= 10 << 30 else ("MiB", float(1 << 20))

    loss = Chart("loss", "Loss", "step", "loss")
    for index, ((run, train), (_, evaluated)) in enumerate(zip(steps, evals)):
        color = PALETTE[index % len(PALETTE)]
        loss.series.append(Series(f"{run.name} train", [(m["step"], m["loss"]) for m in train], color=color))
        loss.series.append(
            Series(f"{run.name} eval", [(m["step"], m["eval_loss"]) for m in evaluated], dashed=True, color=color)
        )
    result = [
        loss,
        Chart("lr", "Learning rate", "step", "lr", per_run("lr"), y_format=lambda v: f"{v:.2g}"),
        Chart("throughput", "Throughput", "step", "tokens/s", per_run("tokens_per_s"), y_format=format_si),
        Chart(
            "mfu",
            "Model FLOPs utilization",
            "step",
            "MFU (%)",
            per_run("mfu", scale=100.0),
            empty_note="no MFU: the device's peak FLOP/s is unknown (set trainer.peak_tflops)",
        ),
        Chart("step_time", "Step time", "step", "ms", per_run("step_time_s", scale=1000.0)),
    ]
    unit, size = in_bytes("mem_peak_bytes", [m for run in runs for m in run.metrics])
    result.append(Chart("memory", "Peak memory (rank 0)", "step", unit, per_run("mem_peak_bytes", scale=1 / size)))
    every = [r for run in runs for r in run.resources]
    for key, title in (
        ("cpu_pct", "CPU per rank"),
        ("rss_bytes", "Resident memory per rank"),
        ("gpu_util_pct", "GPU utilization per rank"),
        ("gpu_mem_bytes", "GPU memory per rank"),
    ):
        unit, size = in_bytes(key, every) if key.endswith("_bytes") else ("%", 1.0)
        chart = Chart(f"rank_{key}", title, "step", unit)
        for run in runs:
            for rank in sorted({r["rank"] for r in run.resources if key in r}):
                chart.series.append(
                    Series(
                        f"{run.name} rank {rank}",
                        [
                            (r["step"], r[key] / size)
                            for r in run.resources
                            if r["rank"] == rank and r.get(key) is not None
                        ],
                    )
                )
        if chart.series or not key.startswith("gpu"):
            result.append(chart)
    return result


# ------------------------------------------------------------------------------------------ tables


def summary_rows(runs: list[Run]) -> list[list[str]]:
    rows = []
    for run in runs:
        s = run.summary or RunSummary(status=run.status)
        losses = [m["loss"] for m in run.metrics if m.get("loss") is not None]
        last_step = max((m["step"] for m in run.metrics if "step" in m), default=0)
        eval_first, eval_last = s.first_eval_loss, s.final_eval_loss
        rows.append(
            [
                run.name,
                run.status,
                str(s.steps if s.steps is not None else last_step),
                f"{s.final_loss:.4f}" if s.final_loss is not None else (f"{losses[-1]:.4f}" if losses else "-"),
                f"{eval_first:.4f} → {eval_last:.4f}" if eval_first is not None and eval_last is not None else "-",
                f"{s.tokens_per_s:,.0f}" if s.tokens_per_s else "-",
                f"{s.mfu:.1%}" if s.mfu is not None else "-",
                format_bytes(s.peak_mem_bytes) if s.peak_mem_bytes else "-",
                f"{_or(s.world_size, '-')} × {_or(s.device, '?')}, {_or(s.strategy, '-')}",
                format_duration(s.wall_s) if s.wall_s else "-",
            ]
        )
    return rows


def _or(value: Any, default: str) -> Any:
    return default if value is None else value


SUMMARY_HEADER = [
    "run",
    "status",
    "steps",
    "final loss",
    "eval loss",
    "tokens/s",
    "MFU",
    "peak memory / rank",
    "workers",
    "wall time",
]


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_differences(runs: list[Run]) -> tuple[list[str], list[list[str]]]:
    """The config keys whose values differ between the runs (paths and caches left out): header, rows."""
    flats = [flatten(run.config) for run in runs]
    keys = sorted({key for flat in flats for key in flat})
    ignored = ("data.cache_dir", "trainer.storage", "logger.group")
    rows = []
    for key in keys:
        values = [json.dumps(flat.get(key), default=str) if key in flat else "(unset)" for flat in flats]
        if len(set(values)) > 1 and key not in ignored:
            rows.append([key, *values])
    return ["key", *(run.name for run in runs)], rows


# ------------------------------------------------------------------------------------------ page


def build_report(paths: list[Path], *, sections: list[str] | None = None) -> str:
    """The report's HTML for the run dirs (or dirs of run dirs) ``paths``; ``sections`` (HTML, escaped by their
    maker) come first: a search's own section (``search/results.py``)."""
    run_dirs = find_runs(paths)
    runs = [load_run(path, name) for path, name in zip(run_dirs, run_names(run_dirs))]
    sections = [*(sections or []), *(_scaling_section(path) for path in paths if (path / RESULTS_FILE).exists())]
    sections.append(f"<h2>Runs</h2>{_table(SUMMARY_HEADER, summary_rows(runs))}")
    if len(runs) > 1:
        header, rows = config_differences(runs)
        sections.append(
            "<h2>Config differences</h2>"
            + (_table(header, rows) if rows else '<p class="note">The runs have the same config.</p>')
        )
    sections.append('<h2>Training</h2><div class="grid">' + "".join(render(c) for c in charts(runs)) + "</div>")
    sections.extend(_profile_section(run, titled=len(runs) > 1) for run in runs if (run.path / PROFILE_DIR).is_dir())
    data = {
        run.name: {
            "path": str(run.path),
            "status": run.status,
            "summary": run.summary.to_dict() if run.summary else None,
        }
        for run in runs
    }
    generated = datetime.now().strftime("%Y-%m-%d %H:%M:%S")
    title = f"orchestrator report: {', '.join(run.name for run in runs[:3])}{' ...' if len(runs) > 3 else ''}"
    return (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{CSS}</style></head>'
        f'<body><header><h1>{html.escape(title)}</h1><p class="note">{len(runs)} run(s), generated '
        f"{generated} by orchestrator {__version__}</p></header><main>{''.join(sections)}</main>"
        f'<script type="application/json" id="runs">{_json_for_html(data)}</script>'
        f"<script>{SCRIPT}</script></body></html>\n"
    )


def _scaling_section(path: Path) -> str:
    """An ``orchestrator scale`` experiment's table and plots (its ``scale.json``)."""
    try:
        results = json.loads((path / RESULTS_FILE).read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path / RESULTS_FILE}: unreadable ({exc})") from None
    rows = with_efficiency(results["points"])
    state = "" if results.get("complete") else " (in progress)"
    # Every field read from the file is escaped: scale.json is data, and a run dir may come from anyone.
    mode, job, steps, warmup_steps = (
        html.escape(str(results.get(key))) for key in ("mode", "job", "steps", "warmup_steps")
    )
    note = (
        f'<p class="note">{mode} scaling of {job}, {steps} steps per point, step time = median after '
        f"{warmup_steps} warm-up steps; efficiency = tokens/s per worker against the strategy's smallest "
        f"worker count{state}</p>"
    )
    return (
        f"<h2>Scaling: {html.escape(path.name)}</h2>{note}{_table(TABLE_HEADER, table_rows(rows))}"
        f'<div class="grid">{"".join(render(chart) for chart in scale_charts(rows))}</div>'
    )


PROFILE_TOP_OPS = 15


def _profile_section(run: Run, *, titled: bool) -> str:
    """A profiled run's (``trainer.profile``) top operators on rank 0 and its trace files."""
    from orchestrator.train.profile import read_top_ops, trace_files  # lazy: imports torch

    title = f"Profile: {html.escape(run.name)}" if titled else "Profile"
    traces = ", ".join(html.escape(str(path.relative_to(run.path))) for path in trace_files(run.path))
    hint = (
        f'<p class="note">Traces (one per rank, Chrome trace format): {traces or "none"}. Open one in '
        f'<a href="https://ui.perfetto.dev">ui.perfetto.dev</a> (Open trace file) or chrome://tracing; '
        f'each step is a range named "step N".</p>'
    )
    top = read_top_ops(run.path, rank=0)
    if top is None:
        return f"<h2>{title}</h2>{hint}"
    steps, cuda = top.get("steps") or [], top.get("device") == "cuda"
    window = f"steps {steps[0]}-{steps[-1]}" if len(steps) > 1 else f"step {steps[0]}" if steps else "no steps"
    sorted_by = "self CUDA time" if cuda else "self CPU time"
    note = (
        f'<p class="note">Rank 0, {html.escape(window)}: the {PROFILE_TOP_OPS} operators with the most '
        f"{sorted_by}, in ms summed over the profiled steps.</p>"
    )
    header = ["operator", "calls", "self CPU (ms)", "CPU total (ms)", *(["self CUDA (ms)", "CUDA total (ms)"] * cuda)]
    keys = ["self_cpu_us", "cpu_total_us", *(["self_cuda_us", "cuda_total_us"] * cuda)]
    rows = [
        [
            str(op.get("name")),
            str(op.get("calls")),
            *(f"{op[key] / 1000:.3f}" if isinstance(op.get(key), (int, float)) else "-" for key in keys),
        ]
        for op in (top.get("ops") or [])[:PROFILE_TOP_OPS]
        if isinstance(op, dict)
    ]
    return f"<h2>{title}</h2>{note}{_table(header, rows)}{hint}"


def write_report(paths: list[Path], output: Path, *, sections: list[str] | None = None) -> Path:
    """Builds the report and writes it atomically to ``output``."""
    text = build_report(paths, sections=sections)
    output.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(output, text)
    return output


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _json_for_html(data: Any) -> str:
    """``data`` as JSON that cannot end or alter the ``<script>`` element holding it, whatever its strings
    hold: no ``<``, ``>`` or ``&`` appears raw (JSON's own escapes stand in)."""
    text = json.dumps(data, default=str)
    return text.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")


CSS = """
body{font:14px/1.4 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#1d2430;background:#fafbfc}
header{padding:16px 24px;background:#fff;border-bottom:1px solid #e3e6ea}h1{font-size:18px;margin:0 0 4px}
main{padding:8px 24px 32px}h2{font-size:15px;margin:24px 0 8px}
.note{color:#667085;margin:0}
table{border-collapse:collapse;background:#fff;font-variant-numeric:tabular-nums}
th,td{border:1px solid #e3e6ea;padding:4px 8px;text-align:left;white-space:nowrap}th{background:#f2f4f7}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(480px,1fr));gap:12px}
svg.chart{background:#fff;border:1px solid #e3e6ea;border-radius:4px;width:100%;height:auto}
svg .title{font-weight:600;font-size:13px}svg .tick,svg .legend text{font-size:10px;fill:#475467}
svg .axis{font-size:11px;fill:#475467}svg .grid{stroke:#eef0f3}svg .note{font-size:12px;fill:#667085}
svg .series{fill:none;stroke-width:1.6;stroke-linejoin:round;stroke-linecap:round}
svg .series.dashed{stroke-dasharray:5 3}svg .series:hover{stroke-width:3}
"""

# Marks each chart once the browser has laid it out: the number of series it drew and their lengths,
# which a test (or a person) can read from the page.
SCRIPT = """
document.querySelectorAll('svg.chart').forEach(function (svg) {
  var drawn = Array.prototype.filter.call(svg.querySelectorAll('path.series'), function (p) {
    return p.getTotalLength() > 0;
  });
  svg.setAttribute('data-drawn', drawn.map(function (p) { return p.getAttribute('data-series'); }).join('|'));
});
document.body.setAttribute('data-rendered', 'yes');
"""
