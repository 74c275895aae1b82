"""model=gpt model.pretrained=DIR reads this project's own exports: a tiny GPT trained a few steps and exported
trains again, under ddp, fsdp2 and zero3 at 2 ranks, from exactly the exported weights, and exports the same
tensors again."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from orchestrator.config.compose import load_resolved
from tests.e2e.test_pretrained import _file_tensors
from tests.helpers import KEEP_LOADED_WEIGHTS, cli_in_process, tiny_job

SHORT_RUN = ["trainer.eval_every=0", "scheduler.warmup_steps=0"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Path:
    """A tiny GPT (model=gpt_tiny, no biases) trained 2 steps under ddp, exported as GPT-2."""
    root = tmp_path_factory.mktemp("gpt")
    cli_in_process(
        "train",
        *tiny_job(cache_dir),
        *SHORT_RUN,
        "trainer.max_steps=2",
        "trainer.checkpoint.every=2",
        f"hydra.run.dir={root / 'run'}",
        cwd=root,
        check=True,
    )
    cli_in_process("export", str(root / "run"), "-o", str(root / "export"), cwd=root, check=True)
    return root / "export"


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2", "zero3"])
def test_an_exported_gpt_trains_again_from_exactly_its_weights(
    strategy: str, exported: Path, tmp_path: Path, cache_dir: Path
) -> None:
    run_dir = tmp_path / "run"
    cli_in_process(
        "train",
        *tiny_job(cache_dir),
        *SHORT_RUN,
        "model=gpt",
        f"model.pretrained={exported}",
        f"strategy={strategy}",
        *KEEP_LOADED_WEIGHTS,
        f"hydra.run.dir={run_dir}",
        cwd=tmp_path,
        check=True,
    )
    # The run's config says what it trained: the sizes config.json gave.
    model = load_resolved((run_dir / "config.yaml").read_text()).model
    gpt2 = json.loads((exported / "config.json").read_text())
    sizes = (gpt2["n_layer"], gpt2["n_head"], gpt2["n_embd"], gpt2["vocab_size"], gpt2["n_positions"])
    assert sizes == (2, 2, 64, 256, 32)
    assert (model.n_layer, model.n_head, model.n_embd, model.vocab_size, model.block_size) == sizes

    again = tmp_path / "again"
    cli_in_process("export", str(run_dir), "-o", str(again), cwd=tmp_path, check=True)
    first, second = _file_tensors(exported), _file_tensors(again)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[name], second[name]) for name in first)  # the zero biases included
    assert json.loads((again / "config.json").read_text()) == gpt2
