"""``orchestrator scale``: worker counts x strategies, its tables and plots checked against the runs'
own records, a point that cannot run recorded, and a second invocation that reruns only what did not
complete. Through torch elastic (``launcher=local``): under Ray each point costs ~6 s more to start."""

from __future__ import annotations

import csv
import io
import json
import re
import statistics
import subprocess
from pathlib import Path

import pytest

from tests.e2e.test_report import CHROMIUM_FLAGS, chromium
from tests.e2e.test_wandb import _history, _records
from tests.helpers import read_jsonl, run_cli

WARMUP = 2


def scale_args(cache_dir: Path, out_dir: Path) -> list[str]:
    return [
        "scale",
        "job=gpt_tiny_cpu",
        "launcher=local",
        f"data.cache_dir={cache_dir}",
        "data.max_bytes=400000",
        "data.seq_len=32",
        "trainer.global_batch_size=8",
        "trainer.micro_batch_size=4",
        "scale.workers=[1,2,3]",
        "scale.strategies=[ddp,fsdp2]",
        "scale.mode=strong",
        "scale.steps=5",
        f"scale.warmup_steps={WARMUP}",
        f"scale.output_dir={out_dir}",
    ]


@pytest.fixture(scope="module")
def experiment(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path):
    """The experiment, then the same command again after one point's summary is lost."""
    root = tmp_path_factory.mktemp("scale")
    out_dir = root / "experiment"
    first = run_cli(*scale_args(cache_dir, out_dir), cwd=root, env={"WANDB_MODE": "offline"})
    results = json.loads((out_dir / "scale.json").read_text())
    results["csv"], results["md"] = (out_dir / "scale.csv").read_text(), (out_dir / "scale.md").read_text()
    first_runs = {p.name: (p / "metrics.jsonl").stat().st_mtime_ns for p in out_dir.glob("*-w*")}
    (out_dir / "fsdp2-w2" / "summary.json").unlink()  # as if that run had been killed
    second = run_cli(*scale_args(cache_dir, out_dir), cwd=root, env={"WANDB_MODE": "disabled"})
    return out_dir, first, results, first_runs, second


def test_every_point_is_a_row_with_its_status(experiment) -> None:
    out_dir, first, results, _, _ = experiment
    assert first.returncode == 1, first.stderr  # two points cannot run
    rows = {(row["strategy"], row["workers"]): row for row in results["points"]}
    assert sorted(rows) == [(s, n) for s in ("ddp", "fsdp2") for n in (1, 2, 3)]
    for strategy in ("ddp", "fsdp2"):
        assert rows[strategy, 1]["status"] == rows[strategy, 2]["status"] == "completed"
        impossible = rows[strategy, 3]
        assert impossible["status"] == "invalid" and impossible["step_time_s"] is None
        assert "trainer.global_batch_size=8" in impossible["error"] and "3 workers" in impossible["error"]
    assert results["mode"] == "strong" and results["complete"]


def test_the_numbers_follow_from_the_runs_own_records(experiment) -> None:
    out_dir = experiment[0]  # as the second invocation left it (fsdp2-w2 rerun)
    points = json.loads((out_dir / "scale.json").read_text())["points"]
    rows = {(row["strategy"], row["workers"]): row for row in points}
    for (strategy, workers), row in rows.items():
        if row["status"] != "completed":
            continue
        records = [r for r in read_jsonl(out_dir / row["run_dir"] / "metrics.jsonl") if "step_time_s" in r]
        assert [r["step"] for r in records] == list(range(1, 6))
        assert row["step_time_s"] == statistics.median(r["step_time_s"] for r in records if r["step"] > WARMUP)
        # strong scaling: 8 sequences of 32 tokens per step at every worker count
        assert row["tokens_per_s"] == pytest.approx(8 * 32 / row["step_time_s"], rel=1e-12)
        assert row["tokens_per_s_per_worker"] * workers == pytest.approx(row["tokens_per_s"], rel=1e-12)
        assert row["grad_accum_steps"] == 8 // (4 * workers)
        base = rows[strategy, 1]
        expected = base["step_time_s"] * 1 / (row["step_time_s"] * workers)
        assert row["efficiency"] == pytest.approx(expected, rel=1e-12)
        ranks = {r["rank"] for r in read_jsonl(out_dir / row["run_dir"] / "resources.jsonl")}
        assert ranks == set(range(workers)) and len(row["peak_mem_bytes_per_rank"]) == workers
        assert row["peak_mem_bytes"] == max(row["peak_mem_bytes_per_rank"]) > 50 << 20
        summary = json.loads((out_dir / row["run_dir"] / "summary.json").read_text())
        assert summary["launcher"] == "local" and summary["world_size"] == workers and summary["strategy"] == strategy


def test_csv_markdown_and_plots_hold_the_same_rows(experiment) -> None:
    out_dir, first, results, _, _ = experiment
    table = list(csv.DictReader(io.StringIO(results["csv"])))
    assert len(table) == len(results["points"])
    for line, row in zip(table, results["points"]):
        assert (line["strategy"], int(line["workers"]), line["status"]) == (
            row["strategy"],
            row["workers"],
            row["status"],
        )
        if row["tokens_per_s"] is not None:
            assert float(line["tokens_per_s"]) == row["tokens_per_s"]
    markdown = results["md"]
    assert markdown in first.stdout
    ddp2 = next(row for row in results["points"] if (row["strategy"], row["workers"]) == ("ddp", 2))
    assert f"| ddp | 2 | 8 | 1 | {ddp2['step_time_s'] * 1000:.1f} ms | {ddp2['tokens_per_s']:,.0f} |" in markdown
    for plot in ("throughput", "efficiency", "memory"):
        svg = (out_dir / f"{plot}.svg").read_text()
        assert svg.startswith('<svg xmlns="http://www.w3.org/2000/svg"')
        assert re.findall(r'data-series="([^"]+)" data-points="(\d+)"', svg) == [("ddp", "2"), ("fsdp2", "2")]


def test_the_report_of_the_experiment_dir_draws_the_scaling_plots(experiment) -> None:
    out_dir = experiment[0]
    dom = subprocess.run(
        [chromium(), *CHROMIUM_FLAGS, "--dump-dom", (out_dir / "report.html").as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    assert "<h2>Scaling: experiment</h2>" in dom and "invalid: scale.mode=strong keeps" in dom
    drawn = dict(re.findall(r'<svg class="chart" data-chart="(scale_\w+)"[^>]*data-drawn="([^"]*)"', dom))
    assert drawn == {f"scale_{plot}": "ddp|fsdp2" for plot in ("throughput", "efficiency", "memory")}
    runs = re.findall(r'data-series="(\w+-w\d) train"', dom)  # each point's run is in the report too
    assert sorted(set(runs)) == ["ddp-w1", "ddp-w2", "fsdp2-w1", "fsdp2-w2"]


def test_the_wandb_group_holds_a_summary_run(experiment) -> None:
    out_dir, _, results, _, _ = experiment
    [records] = _records(out_dir)
    history = [row for row in _history(records).values() if "scale/workers" in row]
    assert [row["scale/workers"] for row in history] == [1, 2]
    ddp1 = next(row for row in results["points"] if (row["strategy"], row["workers"]) == ("ddp", 1))
    assert history[0]["scale/ddp/tokens_per_s"] == pytest.approx(ddp1["tokens_per_s"])
    for run_records in (records, _records(out_dir / "ddp-w1")[0]):  # the summary and a point's own run
        run = next(record["run"] for record in run_records if record["type"] == "run")
        assert run["run_group"] == "scale-gpt_tiny_cpu-strong" and run["job_type"] == "scale"


def test_a_second_invocation_reruns_only_what_did_not_complete(experiment) -> None:
    out_dir, _, _, first_runs, second = experiment
    assert second.returncode == 1, second.stderr
    started = re.findall(r"^scale: (\S+) \(", second.stdout, re.MULTILINE)
    assert started == ["fsdp2-w2"]
    for name, mtime in first_runs.items():
        if name != "fsdp2-w2":
            assert (out_dir / name / "metrics.jsonl").stat().st_mtime_ns == mtime
    [aside] = (out_dir / "replaced").iterdir()
    assert aside.name.startswith("fsdp2-w2-") and (aside / "metrics.jsonl").exists()
    rows = json.loads((out_dir / "scale.json").read_text())["points"]
    assert [row["status"] for row in rows] == ["completed", "completed", "invalid"] * 2


BAD = {
    "unknown strategy": (["scale.strategies=[ddp,zero9]"], "scale.strategies: unknown strategy 'zero9'; choose from"),
    "warmup as long as the run": (
        ["scale.steps=5", "scale.warmup_steps=5"],
        "scale.warmup_steps=5 must be >= 0 and below scale.steps=5",
    ),
    "a worker count twice": (["scale.workers=[1,2,2]"], "scale.workers lists a count twice"),
    "a script job": (
        ["job.kind=script", "job.script=examples/torchrun_train.py"],
        "job.kind=script: orchestrator scale times orchestrator's own training loop",
    ),
    "unknown mode": (["scale.mode=medium"], "scale.mode: Invalid value 'medium', expected one of [weak, strong]"),
    "no point can run": (
        ["scale.mode=strong", "scale.workers=[3]"],
        "no point of the experiment can run; ddp-w3: scale.mode=strong keeps "
        "trainer.global_batch_size=16, which 3 workers x trainer.micro_batch_size=8 do not divide",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_scale_input_is_one_line(case: str, tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    from orchestrator.cli import main

    overrides, expected = BAD[case]
    out_dir = tmp_path / "experiment"
    capfd.readouterr()
    code = main(["scale", "job=gpt_tiny_cpu", "launcher=local", *overrides, f"scale.output_dir={out_dir}"])
    stderr = capfd.readouterr().err
    assert code == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], stderr
    assert not out_dir.exists()
