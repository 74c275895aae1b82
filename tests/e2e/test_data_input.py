"""Data a user points a job at, through the console script: a corpus folder holding a FIFO, token files
holding an id the vocabulary does not have (both settled in the driver, before any worker), and token
files of a vocabulary past 65,535 ids (uint32), trained on."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np

from orchestrator.data.tokens import write_token_files
from tests.helpers import cli_in_process, run_cli, train_losses


def test_a_fifo_in_a_corpus_folder_is_skipped_with_a_warning(tmp_path: Path, cache_dir: Path) -> None:
    corpus = tmp_path / "corpus"
    (corpus / "notes").mkdir(parents=True)
    (corpus / "a.py").write_text("x = 1\n")
    (corpus / "notes" / "b.txt").write_text("a short note\n")
    os.mkfifo(corpus / "notes" / "pipe.txt")
    run_dir = tmp_path / "run"
    # The corpus is too short for one sample: the driver reads every file, then stops with exit 2,
    # so the test needs no training run to show that reading got past the FIFO.
    result = run_cli(
        "train",
        "data=text",
        f"data.paths=[{corpus}]",
        "data.tokenizer=bytes",
        f"data.cache_dir={cache_dir}",
        f"hydra.run.dir={run_dir}",
        cwd=tmp_path,
        timeout=120,
    )  # a hang guard: opening the FIFO used to block forever

    assert result.returncode == 2, result.stderr
    warning, error = result.stderr.strip().splitlines()
    assert warning.startswith("warning: data.paths: skipping 1 corpus file(s) that are not regular files")
    assert warning.endswith(str(corpus / "notes" / "pipe.txt"))
    assert error.startswith("error: data.seq_len=") and "(2 files," in error
    assert not run_dir.exists()


def test_a_token_id_beyond_the_vocabulary_fails_in_the_driver_naming_file_id_and_position(tmp_path: Path) -> None:
    train = np.arange(4096) % 500
    train[3000] = 731
    write_token_files(tmp_path / "tokens", train=train, val=np.arange(600) % 500, vocab_size=1000)
    (tmp_path / "tokens" / "meta.json").write_text(json.dumps({"vocab_size": 500}))
    run_dir = tmp_path / "run"
    result = run_cli(
        "train",
        "data=memmap",
        f"data.path={tmp_path / 'tokens'}",
        "launcher=local",
        f"hydra.run.dir={run_dir}",
        cwd=tmp_path,
        timeout=120,
    )

    assert result.returncode == 2, result.stderr
    assert result.stderr == (
        f"error: data.path: {tmp_path / 'tokens' / 'train.bin'} holds token id 731 at position "
        f"3000 (counting tokens from 0), not below vocab_size=500 from meta.json\n"
    )
    assert not run_dir.exists()


def test_a_vocabulary_past_65535_ids_trains_from_uint32_token_files(tmp_path: Path) -> None:
    # Llama 3's vocabulary; ids spread up to ~100k, which uint16 files could not hold.
    vocab_size = 128_256
    ids = np.random.default_rng(0).integers(60_000, 100_000, size=4096)
    write_token_files(tmp_path / "tokens", train=ids, val=ids[:1024], vocab_size=vocab_size)
    assert json.loads((tmp_path / "tokens" / "meta.json").read_text())["dtype"] == "uint32"
    run_dir = tmp_path / "run"
    cli_in_process(
        "train",
        "data=memmap",
        f"data.path={tmp_path / 'tokens'}",
        "data.seq_len=16",
        "model=gpt_tiny",
        "model.n_layer=1",
        "model.n_embd=32",
        "trainer.device=cpu",
        "launcher=local",
        "trainer.max_steps=3",
        "trainer.global_batch_size=4",
        "trainer.micro_batch_size=2",
        "trainer.eval_every=3",
        "trainer.eval_batches=1",
        "trainer.checkpoint.every=0",
        "scheduler.warmup_steps=1",
        "logger.progress=false",
        f"hydra.run.dir={run_dir}",
        cwd=tmp_path,
        check=True,
    )

    losses = train_losses(run_dir)
    assert sorted(losses) == [1, 2, 3] and all(math.isfinite(loss) for loss in losses.values())
    # A freshly initialized model guesses about uniformly over its vocabulary: a first loss near
    # ln(128256) shows the model was built for the file's vocabulary, not a uint16 one.
    assert abs(losses[1] - math.log(vocab_size)) < 0.5, losses
