"""`orchestrator report`: one HTML file of two finished runs and one in progress, loaded in headless
Chromium with no network; every chart drew the series it should, and the config differences show."""

from __future__ import annotations

import html
import json
import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from orchestrator.report.build import build_report
from orchestrator.report.scale import COLUMNS
from tests.helpers import cli_in_process, read_jsonl, tiny_job

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]


def chromium() -> str:
    """Debian's chromium, installed with apt-get when missing; the test is skipped, saying why, where it cannot be."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    if shutil.which("apt-get") is None:
        pytest.skip("no chromium, and no apt-get to install it with")
    install = subprocess.run(
        "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium",
        shell=True,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if install.returncode != 0 or not shutil.which("chromium"):
        pytest.skip(f"chromium could not be installed: {(install.stderr or install.stdout).strip()[-300:]}")
    return shutil.which("chromium")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> list[Path]:
    """Two finished 2-worker runs that differ in lr, and a copy of one cut off mid-run (no summary yet)."""
    root = tmp_path_factory.mktemp("report")
    dirs = []
    for name, lr in (("a", "3e-3"), ("b", "1e-3")):
        cli_in_process(
            "train",
            *tiny_job(cache_dir),
            f"optim.lr={lr}",
            "logger.resources_every=5",
            f"hydra.run.dir={root / name}",
            cwd=root,
            check=True,
        )
        dirs.append(root / name)
    running = root / "c"
    shutil.copytree(root / "a", running)
    (running / "summary.json").unlink()
    lines = (running / "metrics.jsonl").read_text().splitlines(keepends=True)
    (running / "metrics.jsonl").write_text("".join(lines[:8]) + lines[8][:20])  # a torn last line too
    return [*dirs, running]


def test_every_run_writes_its_report(runs: list[Path]) -> None:
    report = runs[1] / "report.html"
    assert report.exists()
    page = report.read_text()
    assert "http://" not in page.replace("http://www.w3.org", "") and "https://" not in page  # nothing to fetch
    assert 'data-chart="loss"' in page and "b train" in page


def test_the_report_in_chromium_draws_every_series(runs: list[Path], tmp_path: Path) -> None:
    browser = chromium()
    output = tmp_path / "report.html"
    result = cli_in_process("report", *map(str, runs), "-o", str(output), cwd=tmp_path, check=True)
    assert result.stdout.strip() == f"report: {output}"

    dom = subprocess.run(
        [browser, *CHROMIUM_FLAGS, "--dump-dom", output.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    assert 'data-rendered="yes"' in dom  # the page's script ran after layout
    drawn = {
        key: set(html.unescape(series).split("|")) - {""}
        for key, series in re.findall(r'<svg class="chart" data-chart="(\w+)"[^>]*data-drawn="([^"]*)"', dom)
    }
    names = ["a", "b", "c"]
    assert drawn["loss"] == {f"{n} {kind}" for n in names for kind in ("train", "eval")}
    for chart in ("lr", "throughput", "step_time", "memory"):
        assert drawn[chart] == set(names), chart
    for chart in ("rank_cpu_pct", "rank_rss_bytes"):
        assert drawn[chart] == {f"{n} rank {rank}" for n in names for rank in (0, 1)}, chart
    assert "rank_gpu_util_pct" not in drawn  # no GPU, no GPU charts

    # Point counts: what the files hold (the in-progress run: its 7 complete step lines before the tear).
    def points(series: str) -> int:
        return int(re.search(rf'data-series="{series}" data-points="(\d+)"', dom).group(1))

    assert points("a train") == len([r for r in read_jsonl(runs[0] / "metrics.jsonl") if "loss" in r]) == 20
    assert points("c train") == 7 and points("a eval") == 3  # steps 0, 10, 20

    # Tables: the in-progress run's status, and the one config key the finished runs differ in.
    assert "running (or stopped)" in dom
    differences = re.search(r"<h2>Config differences</h2><table>.*?</table>", dom, re.S).group(0)
    assert "optim.lr" in differences and "trainer.max_steps" not in differences

    screenshot = tmp_path / "report.png"
    subprocess.run(
        [
            browser,
            *CHROMIUM_FLAGS,
            "--hide-scrollbars",
            "--window-size=1280,1800",
            f"--screenshot={screenshot}",
            output.as_uri(),
        ],
        capture_output=True,
        timeout=120,
        check=True,
    )
    header = screenshot.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", header[16:24]) == (1280, 1800)


def test_report_of_a_sweep_dir_and_bad_paths(runs: list[Path], tmp_path: Path) -> None:
    page = build_report([runs[0].parent])  # a dir of run dirs: every run in it
    assert all(f"{name} train" in page for name in ("a", "b", "c"))
    result = cli_in_process("report", str(tmp_path / "nope"), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"error: {tmp_path / 'nope'}: no such directory (give run dirs, or a sweep's dir of run dirs)"
    )
    (tmp_path / "empty").mkdir()
    result = cli_in_process("report", str(tmp_path / "empty"), cwd=tmp_path)
    assert result.returncode == 2 and "not a run dir" in result.stderr
    assert not (tmp_path / "report.html").exists()


def test_summary_json_is_what_the_report_tables_show(runs: list[Path]) -> None:
    summary = json.loads((runs[0] / "summary.json").read_text())
    page = (runs[0] / "report.html").read_text()
    assert f"{summary['final_loss']:.4f}" in page and f"{summary['tokens_per_s']:,.0f}" in page


PAYLOAD = "<script>alert(1)</script>"


def test_run_provided_strings_are_escaped(tmp_path: Path) -> None:
    # An `orchestrator scale` experiment dir whose scale.json, run dir name, summary and config all carry
    # markup (a run dir copied from elsewhere is data): the page shows it as text, never as a tag.
    experiment = tmp_path / "experiment"
    run_dir = experiment / "<img src=x onerror=alert(2)>"
    run_dir.mkdir(parents=True)
    point = {
        **dict.fromkeys(COLUMNS),
        "strategy": PAYLOAD,
        "workers": 2,
        "status": PAYLOAD,
        "error": PAYLOAD,
        "run_dir": PAYLOAD,
    }
    (experiment / "scale.json").write_text(
        json.dumps(
            {
                "job": PAYLOAD,
                "mode": PAYLOAD,
                "steps": PAYLOAD,
                "warmup_steps": PAYLOAD,
                "complete": True,
                "points": [point],
            }
        )
    )
    (run_dir / "summary.json").write_text(
        json.dumps(
            {
                "status": PAYLOAD,
                "error": PAYLOAD,
                "strategy": PAYLOAD,
                "device": PAYLOAD,
                "world_size": PAYLOAD,
                "run_dir": PAYLOAD,
            }
        )
    )
    (run_dir / "config.yaml").write_text(json.dumps({"job": {"script": PAYLOAD}}))
    (run_dir / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 2.0, "lr": 0.1}) + "\n")

    page = build_report([experiment])

    assert page.count("<script") == 2  # the page's own: its JSON data and its chart marker
    assert "<img" not in page and "alert(1)</script>" not in page
    assert html.escape(PAYLOAD) in page  # shown, as text
    data = re.search(r'<script type="application/json" id="runs">(.*?)</script>', page, re.S).group(1)
    assert json.loads(data)[run_dir.name]["summary"]["strategy"] == PAYLOAD  # the data is intact
