"""trainer.profile: its checks, and the profiler's files from a few steps in this process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from orchestrator.config.compose import compose, to_config
from orchestrator.config.schema import ProfileConfig
from orchestrator.errors import UserError
from orchestrator.report import build
from orchestrator.train import profile
from orchestrator.train.profile import StepProfiler


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["trainer.profile.start_step=-1"], "trainer.profile.start_step must be >= 0, got -1"),
        (["trainer.profile.steps=-2"], "trainer.profile.steps must be >= 0 (0 = off), got -2"),
        (
            ["trainer.max_steps=30", "trainer.profile.start_step=25", "trainer.profile.steps=10"],
            "trainer.profile.start_step=25 + trainer.profile.steps=10 exceeds trainer.max_steps=30",
        ),
    ],
)
def test_bad_profile_window_is_one_line_naming_the_key(overrides: list[str], expected: str) -> None:
    with pytest.raises(UserError) as info:
        to_config(compose(overrides))
    assert str(info.value) == expected


def test_profiling_is_off_by_default_and_a_window_may_end_at_the_last_step() -> None:
    assert to_config(compose([])).trainer.profile == ProfileConfig(start_step=0, steps=0, record_shapes=False)
    config = to_config(compose(["trainer.max_steps=30", "trainer.profile.start_step=20", "trainer.profile.steps=10"]))
    assert (config.trainer.profile.start_step, config.trainer.profile.steps) == (20, 10)


def test_off_or_past_the_window_builds_no_profiler(tmp_path: Path) -> None:
    cpu = torch.device("cpu")
    assert StepProfiler.create(ProfileConfig(), run_dir=tmp_path, rank=0, device=cpu, next_step=1) is None
    window = ProfileConfig(start_step=2, steps=2)
    assert StepProfiler.create(window, run_dir=tmp_path, rank=0, device=cpu, next_step=5) is None
    assert StepProfiler.create(window, run_dir=tmp_path, rank=0, device=cpu, next_step=4) is not None


def _train(profiler: StepProfiler, steps: range) -> None:
    weights = torch.randn(16, 16, requires_grad=True)
    for step in steps:
        profiler.begin_step(step)
        (torch.randn(8, 16) @ weights).square().sum().backward()
        profiler.end_step(step)


def test_the_window_is_traced_with_one_named_range_per_step(tmp_path: Path) -> None:
    profiler = StepProfiler.create(
        ProfileConfig(start_step=1, steps=2), run_dir=tmp_path, rank=3, device=torch.device("cpu"), next_step=1
    )
    _train(profiler, range(1, 6))
    profiler.close()  # the run's end: nothing left to write

    trace = json.loads((tmp_path / "profile" / "rank3.json").read_text())
    steps = {event["name"] for event in trace["traceEvents"] if event.get("name", "").startswith("step ")}
    assert steps == {"step 2", "step 3"}
    top = json.loads((tmp_path / "profile" / "rank3_top_ops.json").read_text())
    assert top["steps"] == [2, 3] and top["sorted_by"] == "self_cpu_us"
    names = [op["name"] for op in top["ops"]]
    assert "aten::mm" in names and not any(name.startswith("step ") for name in names)
    assert [op["self_cpu_us"] for op in top["ops"]] == sorted((op["self_cpu_us"] for op in top["ops"]), reverse=True)
    assert profile.trace_files(tmp_path) == [tmp_path / "profile" / "rank3.json"]


def test_a_window_the_run_cuts_short_keeps_the_steps_that_ran(tmp_path: Path) -> None:
    profiler = StepProfiler.create(
        ProfileConfig(start_step=0, steps=10), run_dir=tmp_path, rank=0, device=torch.device("cpu"), next_step=1
    )
    _train(profiler, range(1, 4))  # early stopping after step 3
    profiler.close()
    assert profile.read_top_ops(tmp_path)["steps"] == [1, 2, 3]


def test_the_report_looks_for_the_profilers_directory() -> None:
    assert build.PROFILE_DIR == profile.PROFILE_DIR
