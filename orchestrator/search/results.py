"""What a search leaves: the trials' table, the best trial as a job file, and the search dir's report.

The best job file (``<search dir>/job/best.yaml``) is a job like those in ``jobs/``: the group options
the best trial composed and every value of its resolved config. Hydra finds it with the search dir on
its search path: ``orchestrator train 'hydra.searchpath=[file://<search dir>]' job=best``.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from orchestrator.config.compose import compose, without_hydra
from orchestrator.fsutil import write_atomic
from orchestrator.report import write_report
from orchestrator.report.svg import PALETTE, Chart, Series, render
from orchestrator.rundir import RunDir
from orchestrator.search.plan import SearchPlan
from orchestrator.search.record import BEST_JOB, BEST_JOB_DIR, REPORT_FILE, SearchRecord, TrialRecord
from orchestrator.search.space import trial_overrides
from orchestrator.tracking.jsonl import read_jsonl

# The config groups a job file picks options from (conf/config.yaml's defaults list).
GROUPS = ("model", "data", "strategy", "optim", "scheduler", "trainer", "launcher", "logger")


def trials_table(record: SearchRecord) -> list[list[str]]:
    """Header and rows: each trial's values, status, steps run, best eval loss and the searched metric."""
    keys = list(record.space)
    best = record.best()
    rows = [["trial", *keys, "status", "steps", "best eval loss", f"{record.metric} (last eval)"]]
    for trial in record.trials:
        mark = " *" if best is not None and trial.name == best.name else ""
        rows.append(
            [
                trial.name + mark,
                *(_value(trial.params.get(key)) for key in keys),
                trial.status,
                _value(trial.steps),
                _value(trial.best_eval_loss),
                _value(trial.value),
            ]
        )
    return rows


def format_table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows)


def write_best_job(plan: SearchPlan, best: TrialRecord) -> Path:
    """The best trial as a job file: its group options and its whole resolved config, less the search."""
    cfg = compose(trial_overrides(plan.base, plan.space, best.params), with_hydra=True)
    choices = cfg.hydra.runtime.choices
    resolved = OmegaConf.to_container(without_hydra(cfg), resolve=True)
    resolved.pop("search", None)
    values = ", ".join(f"{key}={_value(value)}" for key, value in best.params.items())
    header = (
        f"# @package _global_\n"
        f"# The best trial of the search in {plan.search_dir} ({best.name}: {values}; "
        f"{plan.settings.metric} {_value(best.value)}).\n"
        f"# Train it: {train_best_command(plan.search_dir)}\n"
    )
    defaults = {"defaults": [{f"override /{group}": choices[group]} for group in GROUPS if choices.get(group)]}
    path = plan.search_dir / BEST_JOB_DIR / f"{BEST_JOB}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(
        path,
        header + OmegaConf.to_yaml(OmegaConf.create(defaults)) + "\n" + OmegaConf.to_yaml(OmegaConf.create(resolved)),
    )
    return path


def train_best_command(search_dir: Path) -> str:
    """The command that trains the best job file."""
    return f"orchestrator train 'hydra.searchpath=[file://{search_dir}]' job={BEST_JOB}"


def search_section(search_dir: Path, record: SearchRecord) -> str:
    """The report's search section: eval loss against steps for every trial, the best one drawn bold and named,
    and the trials' table."""
    best = record.best()
    chart = Chart("search_eval_loss", "Eval loss per trial", "step", "eval loss")
    for index, trial in enumerate(record.trials):
        evals = [
            (m["step"], m["eval_loss"])
            for m in read_jsonl(RunDir(search_dir / trial.name).metrics)
            if m.get("eval_loss") is not None
        ]
        is_best = best is not None and trial.name == best.name
        chart.series.append(
            Series(
                f"{trial.name} (best)" if is_best else trial.name,
                evals,
                dashed=not is_best,
                color=PALETTE[index % len(PALETTE)],
            )
        )
    rows = trials_table(record)
    header, body = rows[0], rows[1:]
    table = (
        "<table><thead><tr>"
        + "".join(f"<th>{html.escape(cell)}</th>" for cell in header)
        + "</tr></thead><tbody>"
        + "".join("<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>" for row in body)
        + "</tbody></table>"
    )
    best_note = (
        f"best: {html.escape(best.name)} ({html.escape(record.metric)} {_value(best.value)})"
        if best is not None
        else "no trial finished with a result yet"
    )
    note = (
        f'<p class="note">{len(record.trials)} of {record.num_samples} trial(s), {html.escape(record.algorithm)}, '
        f"{html.escape(record.metric)} ({html.escape(record.mode)}); {best_note}. Dashed: the other trials; a "
        f"line that ends early is a trial the scheduler stopped.</p>"
    )
    return f'<h2>Search</h2>{note}{table}<div class="grid">{render(chart)}</div>'


def write_search_report(search_dir: Path, record: SearchRecord) -> Path:
    """``<search dir>/report.html``: the search section, then every trial's run as ``orchestrator report`` shows it."""
    return write_report([search_dir], search_dir / REPORT_FILE, sections=[search_section(search_dir, record)])


def _value(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
