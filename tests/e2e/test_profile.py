"""trainer.profile: a 2-worker run writes each rank's trace of exactly the profiled steps and its top
operators, and report.html shows rank 0's; a run without it has no profile/ at all."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.helpers import run_cli, tiny_job

PROFILE = ["trainer.profile.start_step=2", "trainer.profile.steps=2"]


@pytest.fixture(scope="module")
def profiled_run(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Path:
    root = tmp_path_factory.mktemp("profile")
    run_cli(
        "train",
        *tiny_job(cache_dir),
        *PROFILE,
        f"hydra.run.dir={root / 'run'}",
        cwd=root,
        env={"WANDB_MODE": "offline"},
        check=True,
    )
    return root / "run"


@pytest.mark.parametrize("rank", [0, 1])
def test_each_rank_traces_exactly_the_profiled_steps(profiled_run: Path, rank: int) -> None:
    trace = json.loads((profiled_run / "profile" / f"rank{rank}.json").read_text())
    names = [event.get("name", "") for event in trace["traceEvents"]]
    assert sorted(name for name in names if re.fullmatch(r"step \d+", name)) == ["step 3", "step 4"]
    assert any(name.startswith("aten::") for name in names)

    top = json.loads((profiled_run / "profile" / f"rank{rank}_top_ops.json").read_text())
    assert top["steps"] == [3, 4] and top["device"] == "cpu"
    assert top["ops"] and all(op["name"] and op["calls"] > 0 and op["self_cpu_us"] >= 0 for op in top["ops"])


def test_the_report_shows_rank_0s_top_operators_and_the_traces(profiled_run: Path) -> None:
    page = (profiled_run / "report.html").read_text()
    section = page[page.index("<h2>Profile</h2>") :]
    top = json.loads((profiled_run / "profile" / "rank0_top_ops.json").read_text())
    assert f"<td>{top['ops'][0]['name']}</td>" in section and "self CPU (ms)" in section
    assert "profile/rank0.json, profile/rank1.json" in section and 'href="https://ui.perfetto.dev"' in section
    others = page.replace('href="https://ui.perfetto.dev"', "").replace("http://www.w3.org", "")
    assert "http://" not in others and "https://" not in others  # a link to follow, nothing to fetch


def test_a_run_without_profiling_has_no_profile_dir(tmp_path: Path, cache_dir: Path) -> None:
    run_cli(
        "train",
        *tiny_job(cache_dir),
        f"hydra.run.dir={tmp_path / 'run'}",
        cwd=tmp_path,
        env={"WANDB_MODE": "offline"},
        check=True,
    )
    assert (tmp_path / "run" / "summary.json").exists()
    assert not (tmp_path / "run" / "profile").exists()
    assert "<h2>Profile" not in (tmp_path / "run" / "report.html").read_text()
