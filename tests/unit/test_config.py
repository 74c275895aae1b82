"""Composition of the real config tree: defaults, jobs, typed errors, cross-field checks."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.config.compose import compose, to_config
from orchestrator.config.schema import (
    Config,
    DDPConfig,
    GPTConfig,
    OptimName,
    Precision,
    TextDataConfig,
)
from orchestrator.errors import UserError

JOBS = sorted(p.stem for p in (Path(__file__).resolve().parents[2] / "jobs").glob("*.yaml"))


def load(*overrides: str) -> Config:
    return to_config(compose(list(overrides)))


def test_default_job_is_a_small_gpt_on_the_stdlib_with_ddp_on_two_workers() -> None:
    config = load()
    assert isinstance(config.model, GPTConfig)
    assert isinstance(config.data, TextDataConfig) and config.data.paths == []
    assert isinstance(config.strategy, DDPConfig)
    assert config.launcher.num_workers == 2
    assert config.grad_accum_steps == config.trainer.global_batch_size // (config.trainer.micro_batch_size * 2)


@pytest.mark.parametrize("job", JOBS)
def test_every_job_composes_to_the_typed_schema(job: str) -> None:
    config = load(f"job={job}")
    assert config.trainer.global_batch_size % config.launcher.num_workers == 0


def test_overrides_reach_the_typed_objects() -> None:
    config = load("optim=sgd_momentum", "trainer.precision=bf16", "model.n_layer=3", "strategy=none",
                  "launcher.num_workers=1")
    assert config.optim.name is OptimName.sgd and config.optim.momentum == 0.9
    assert config.trainer.precision is Precision.bf16
    assert config.model.n_layer == 3


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["trainer.max_stpes=10"], "trainer.max_stpes: unknown key; allowed keys: checkpoint"),
        (["+trainer.extra=1"], "trainer.extra: unknown key"),
        (["trainer.max_steps=ten"], "trainer.max_steps: Value 'ten'"),
        (["model=nope"], "model=nope: no such option; choose one of: cnn, gpt2_124m"),
        (["job=nope"], "job=nope: no such option; choose one of: digits_cnn_cpu"),
        (["optim.name=lion"], "optim.name: Invalid value 'lion', expected one of [sgd, adam, adamw]"),
        (["data=memmap"], "data.path: missing required value"),
        (["trainer.global_batch_size=15"], "trainer.global_batch_size=15 is not divisible by launcher.num_workers=2"),
        (["trainer.global_batch_size=24", "trainer.micro_batch_size=8"], "must be a multiple of"),
        (["model=cnn"], "model=cnn trains on images but data=text yields tokens"),
        (["strategy=none"], "strategy=none runs at most 1 worker(s)"),
        (["scheduler.warmup_steps=5000"], "scheduler.warmup_steps=5000 exceeds trainer.max_steps"),
        (["model.n_head=3"], "model.n_embd=128 must be divisible by model.n_head=3"),
        (["trainer.checkpoint.keep=1"], "trainer.checkpoint.keep must be >= 2"),
        (["optim=adam", "optim.momentum=0.9"], "optim.momentum and optim.nesterov apply to optim.name=sgd only"),
        (["scheduler=onecycle", "scheduler.warmup_steps=10"], "scheduler.warmup_steps does not apply to onecycle"),
        (["trainer.freeze=[blocks]"], "trainer.freeze needs trainer.init_from"),
        (["model.block_size=16"], "model.block_size=16 is shorter than data.seq_len=128"),
    ],
)
def test_bad_config_is_one_line_naming_the_key(overrides: list[str], expected: str) -> None:
    with pytest.raises(UserError) as info:
        load(*overrides)
    message = str(info.value)
    assert expected in message
    assert "\n" not in message
