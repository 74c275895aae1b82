"""summary.json through RunSummary: what a reader of the file (a script, jq, the report) relies on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from orchestrator.errors import UserError
from orchestrator.rundir import RunDir, RunSummary


def test_a_diverged_loss_is_written_as_null_and_the_file_is_strict_json(tmp_path: Path) -> None:
    path = RunDir(tmp_path).summary
    RunSummary(status="failed", error="loss is nan", steps=3, final_loss=float("nan")).write(path)
    content = json.loads(path.read_text(), parse_constant=lambda name: pytest.fail(f"{name} in summary.json"))
    assert content["final_loss"] is None and content["steps"] == 3 and content["error"] == "loss is nan"
    assert RunSummary.read(path).final_loss is None


def test_an_older_files_unknown_keys_are_kept_and_written_back(tmp_path: Path) -> None:
    path = RunDir(tmp_path).summary
    path.write_text(json.dumps({"status": "completed", "steps": 5, "from_an_older_version": [1, 2]}))
    summary = RunSummary.read(path)
    assert summary.completed and summary.steps == 5 and summary.extra == {"from_an_older_version": [1, 2]}
    summary.write(path)
    assert json.loads(path.read_text())["from_an_older_version"] == [1, 2]


def test_optional_keys_are_left_out_when_unset_and_measured_ones_are_null() -> None:
    content = RunSummary(status="completed", steps=2).to_dict()
    assert "error" not in content and "wandb" not in content and "script" not in content
    assert content["final_eval_accuracy"] is None and content["mfu"] is None


@pytest.mark.parametrize("text", ["{", "[]", '{"steps": 1}'])
def test_an_unreadable_summary_is_a_user_error_naming_the_file(tmp_path: Path, text: str) -> None:
    path = RunDir(tmp_path).summary
    path.write_text(text)
    with pytest.raises(UserError, match="summary.json"):
        RunSummary.read(path)
