"""Composition of the real config tree: defaults, jobs, typed errors, cross-field checks."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.config.compose import compose, to_config
from orchestrator.config.schema import (
    Config,
    GPTConfig,
    OptimName,
    Precision,
    TextDataConfig,
)
from orchestrator.errors import UserError
from orchestrator.strategies.ddp import DDPConfig

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
    # A fine-tuning job takes model.pretrained=DIR on the command line; composing reads no file of it.
    pretrained = ["model.pretrained=models/some-llama"] if "lora" in job else []
    config = load(f"job={job}", *pretrained)
    assert config.trainer.global_batch_size % config.launcher.num_workers == 0


def test_overrides_reach_the_typed_objects() -> None:
    config = load(
        "optim=sgd_momentum", "trainer.precision=bf16", "model.n_layer=3", "strategy=none", "launcher.num_workers=1"
    )
    assert config.optim.name is OptimName.sgd and config.optim.momentum == 0.9
    assert config.trainer.precision is Precision.bf16
    assert config.model.n_layer == 3


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["trainer.max_stpes=10"], "trainer.max_stpes: unknown key; allowed keys: checkpoint"),
        (["+trainer.extra=1"], "trainer.extra: unknown key"),
        (["trainer.max_steps=ten"], "trainer.max_steps: Value 'ten'"),
        (["model=nope"], "model=nope: no such option; choose one of: cnn, gpt, gpt2_124m"),
        (
            ["job=nope"],
            "job=nope: no such option; choose one of: diabetes_mlp_cpu, digits_cnn_augment_cpu, digits_cnn_cpu",
        ),
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


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("optim.lr=inf", "optim.lr must be > 0 and finite, got inf"),
        ("optim.lr=nan", "optim.lr must be > 0 and finite, got nan"),
        ("optim.eps=inf", "optim.eps must be > 0 and finite"),
        ("optim.weight_decay=inf", "optim.weight_decay must be >= 0 and finite"),
        ("optim.betas=[0.9,inf]", "optim.betas must be two numbers in [0, 1)"),
        ("optim.betas=[nan,0.9]", "optim.betas must be two numbers in [0, 1)"),
        ("scheduler.div_factor=inf", "scheduler.div_factor must be > 0 and finite"),
        ("scheduler.final_div_factor=nan", "scheduler.final_div_factor must be > 0 and finite"),
        ("scheduler.gamma=nan", "scheduler.gamma must be in (0, 1]"),
        ("scheduler.min_lr_ratio=inf", "scheduler.min_lr_ratio must be in [0, 1]"),
        ("trainer.grad_clip=inf", "trainer.grad_clip must be >= 0 and finite (0 = off), got inf"),
        ("trainer.grad_clip=nan", "trainer.grad_clip must be >= 0 and finite (0 = off), got nan"),
        ("trainer.early_stopping.min_delta=inf", "trainer.early_stopping.min_delta must be >= 0 and finite"),
        ("trainer.peak_tflops=inf", "trainer.peak_tflops must be > 0 and finite"),
        ("trainer.storage_timeout_s=inf", "trainer.storage_timeout_s must be > 0 and finite"),
        ("trainer.max_consecutive_skips=0", "trainer.max_consecutive_skips must be > 0"),
        ("model.dropout=nan", "model.dropout must be in [0, 1)"),
        ("data.val_fraction=inf", "data.val_fraction must be in (0, 0.5)"),
        ("logger.wandb.init_timeout_s=inf", "logger.wandb.init_timeout_s must be > 0 and finite"),
        ("verify.tolerance=nan", "verify.tolerance must be > 0 and finite"),
        ("estimate.device_memory_gb=inf", "estimate.device_memory_gb must be > 0 and finite"),
    ],
)
def test_a_number_that_must_be_finite_refuses_inf_and_nan(override: str, expected: str) -> None:
    with pytest.raises(UserError) as info:
        load(override)
    assert expected in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("override", ["launcher.capacity_timeout_s=inf", "launcher.cpus_per_worker=nan"])
def test_ray_launcher_timeouts_and_cpus_refuse_inf_and_nan(override: str) -> None:
    with pytest.raises(UserError, match=rf"{override.split('=')[0]} must be > 0 and finite"):
        load("launcher=ray", override)


@pytest.mark.parametrize(
    "uri",
    [
        "s3://AKIAEXAMPLE:s3cr3t-value@bucket/runs",
        "s3://AKIAEXAMPLE@bucket/runs",
        "s3://bucket/runs?access_key=AKIAEXAMPLE&secret_key=s3cr3t-value",
        "s3://bucket/runs?region=us-east-1&session_token=s3cr3t-value",
        "abfs://account:s3cr3t-value@container/runs",
        "abfs://container@account.dfs.core.windows.net/runs?sv=2024&sig=s3cr3t-value",
    ],
)
def test_storage_with_credentials_in_the_uri_is_refused_without_echoing_them(uri: str) -> None:
    with pytest.raises(UserError) as info:
        load(f"trainer.storage='{uri}'")
    message = str(info.value)
    assert message.startswith("trainer.storage must not hold credentials") and "AWS_SECRET_ACCESS_KEY" in message
    assert "s3cr3t" not in message and "AKIAEXAMPLE" not in message and "\n" not in message


@pytest.mark.parametrize(
    "uri",
    [
        "s3://bucket/runs?region=us-east-1&endpoint_override=localhost:9000",
        "gs://bucket/runs",
        "hdfs://user@namenode:8020/runs",
        "file:///tmp/runs",
    ],
)
def test_storage_uris_without_secrets_pass_the_schema(uri: str) -> None:
    assert load(f"trainer.storage='{uri}'").trainer.storage == uri
