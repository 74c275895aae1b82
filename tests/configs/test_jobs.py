"""Every job under jobs/ composes and trains for 2 steps at tiny size on this CPU machine."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from orchestrator.config.compose import compose, to_config
from tests.helpers import REPO, cli_in_process, save_tiny_llama

JOBS = sorted(p.stem for p in (REPO / "jobs").glob("*.yaml"))

# The same job, shrunk: the architecture family stays, the sizes go to the minimum.
TINY_MODEL = {
    "gpt": ["model.n_layer=1", "model.n_head=2", "model.n_embd=32"],
    "lstm": ["model.n_embd=16", "model.hidden_size=32", "model.n_layer=1"],
    "hf": [
        "model.config.hidden_size=32",
        "model.config.intermediate_size=64",
        "model.config.num_hidden_layers=1",
        "model.config.num_attention_heads=2",
        "model.config.num_key_value_heads=1",
        "++model.config.vocab_size=512",
    ],
    "cnn": ["model.widths=[8]"],
    "mlp": ["model.hidden_sizes=[16]"],
}
TINY_DATA = {
    "text": ["data.max_bytes=300000", "data.seq_len=32", "data.vocab_size=512"],
    "digits": [],
    "diabetes": [],
}


def needs_pretrained(job: str) -> bool:
    """Whether the job leaves ``model.pretrained`` for the command line: a fine-tuning job."""
    model = compose([f"job={job}"]).model
    return model.name == "hf" and model.pretrained is None and "model_type" not in model.config


@pytest.fixture(scope="session")
def pretrained_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama as save_pretrained writes it (random weights: nothing can be downloaded here)."""
    pytest.importorskip("transformers")
    return save_tiny_llama(
        tmp_path_factory.mktemp("pretrained") / "llama", vocab_size=1024, layers=1, max_positions=4096
    )


def tiny_overrides(job: str, cache_dir: Path, pretrained: Path | None = None) -> list[str]:
    """The job at tiny size; a fine-tuning job gets the tiny ``pretrained`` directory, whose size it keeps."""
    model = [f"model.pretrained={pretrained}"] if needs_pretrained(job) else []
    config = to_config(compose([f"job={job}", *model]))
    workers = min(config.launcher.num_workers, 2)
    return [
        f"job={job}",
        "launcher=local",
        *(model or TINY_MODEL[config.model.name]),
        *TINY_DATA[config.data.name],
        f"data.cache_dir={cache_dir}" if config.data.name == "text" else "seed=0",
        "trainer.device=cpu",
        "trainer.max_steps=2",
        "scheduler.warmup_steps=0",
        f"launcher.num_workers={workers}",
        f"trainer.global_batch_size={4 * workers}",
        "trainer.micro_batch_size=2",
        "trainer.eval_every=2",
        "trainer.eval_batches=1",
        "trainer.checkpoint.every=0",
        "logger.progress=false",
    ]


def test_there_are_jobs_for_every_model_family() -> None:
    families = {compose([f"job={job}"]).model.name for job in JOBS}
    assert families == set(TINY_MODEL)


@pytest.mark.parametrize("job", JOBS)
def test_job_trains_two_steps_at_tiny_size(
    job: str, tmp_path: Path, cache_dir: Path, request: pytest.FixtureRequest
) -> None:
    pretrained = request.getfixturevalue("pretrained_llama") if needs_pretrained(job) else None
    run_dir = tmp_path / "run"
    cli_in_process(
        "train", *tiny_overrides(job, cache_dir, pretrained), f"hydra.run.dir={run_dir}", cwd=tmp_path, check=True
    )
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 2
    assert summary["final_eval_loss"] is not None
