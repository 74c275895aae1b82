"""The bad-input catalogue: one line on stderr naming the key and what is allowed, exit status 2,
before any worker starts, and no run dir or partial file left behind. (How fast: bench/goals.py.)"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.helpers import cli_in_process, run_cli


def _corrupt_checkpoint(tmp_path: Path) -> Path:
    directory = _checkpoint(tmp_path, strategy="ddp")
    (directory / "model.pt").write_bytes(b"not what the manifest says")
    return directory


def _checkpoint(tmp_path: Path, *, strategy: str, world_size: int = 2) -> Path:
    from tests.unit.test_manifest import make_checkpoint

    return make_checkpoint(tmp_path / "old-run" / "checkpoints", 10, strategy=strategy, world_size=world_size)


def _npz_without_labels(tmp_path: Path) -> Path:
    path = tmp_path / "arrays.npz"
    np.savez(path, x=np.zeros((10, 4), dtype=np.float32))
    return path


def _npz_with_float_targets(tmp_path: Path) -> Path:
    path = tmp_path / "regression.npz"
    np.savez(path, x=np.zeros((10, 4), dtype=np.float32), y=np.linspace(0.0, 3.0, 10))
    return path


def _tiny_corpus(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.txt"
    path.write_text("too short to hold one sample\n")
    return path


def _gpt2(tmp_path: Path, **settings: object) -> Path:
    """A model=gpt export: block_size 32, vocab_size 300, zero biases unless ``bias=True``."""
    from tests.unit.test_gpt2_weights import write_gpt2_dir

    write_gpt2_dir(tmp_path / "gpt2", **settings)
    return tmp_path / "gpt2"


def _gpt2_with_tokenizer(tmp_path: Path, *, ids: int | None) -> Path:
    """``_gpt2`` with a word-level tokenizer.json of ``ids`` ids, or with one that is not a tokenizer (None)."""
    from tokenizers import Tokenizer, models

    directory = _gpt2(tmp_path)
    if ids is None:
        (directory / "tokenizer.json").write_text('{"model": {"type": "nonsense"}}')
    else:
        vocab = {f"w{i}": i for i in range(ids - 1)} | {"[UNK]": ids - 1}
        Tokenizer(models.WordLevel(vocab, unk_token="[UNK]")).save(str(directory / "tokenizer.json"))
    return directory


# Small data that fits _gpt2's block_size: the bytes of part of the stdlib, or a text corpus that data=text tokenizes
# with model.pretrained's tokenizer.json.
SMALL_BYTES = ["data.tokenizer=bytes", "data.max_bytes=100000", "data.seq_len=32", "data.cache_dir=CACHE"]
SMALL_TEXT = ["data=text", lambda tmp: f"data.paths=[{_tiny_corpus(tmp)}]", "data.seq_len=32", "data.cache_dir=CACHE"]


CASES = {
    "wrong type": (["trainer.max_steps=ten"], "trainer.max_steps"),
    "unknown key": (["trainer.max_stpes=10"], "trainer.max_stpes: unknown key; allowed keys:"),
    "unknown added key": (["+trainer.speed=fast"], "trainer.speed: unknown key"),
    "missing required value": (["data=memmap"], "data.path: missing required value"),
    "unknown model": (["model=transformer9000"], "model=transformer9000: no such option; choose one of:"),
    "unknown strategy": (
        ["strategy=zero9"],
        "strategy=zero9: no such option; choose one of: ddp, fsdp2, none, zero0, zero1",
    ),
    "unknown optimizer": (["optim.name=lion"], "optim.name: Invalid value 'lion', expected one of [sgd, adam, adamw]"),
    "unknown job": (["job=nope"], "job=nope: no such option; choose one of:"),
    "batch not divisible by world size": (
        ["trainer.global_batch_size=15"],
        "trainer.global_batch_size=15 is not divisible by launcher.num_workers=2",
    ),
    "more workers than the machine": (
        ["launcher.num_workers=64", "trainer.global_batch_size=512"],
        "launcher.num_workers=64 exceeds this machine's",
    ),
    "cuda without a gpu": (["trainer.device=cuda"], "trainer.device=cuda but this machine has no visible CUDA GPU"),
    "unreadable data path": (["data=text", "data.paths=[/no/such/corpus]"], "data.paths entry '/no/such/corpus'"),
    "resume path missing": (["trainer.resume=/no/such/run"], "trainer.resume=/no/such/run: no such file"),
    "resume path corrupt": ([lambda tmp: f"trainer.resume={_corrupt_checkpoint(tmp)}"], "damaged checkpoint"),
    "init_from missing": (["trainer.init_from=/no/such/run"], "trainer.init_from=/no/such/run: no such file"),
    "model does not fit the data": (["model=cnn"], "model=cnn trains on images but data=text yields tokens"),
    "negative learning rate": (["optim.lr=-0.1"], "optim.lr must be > 0"),
    "warmup longer than the run": (["trainer.max_steps=10"], "scheduler.warmup_steps=20 exceeds trainer.max_steps=10"),
    "too few checkpoints kept": (["trainer.checkpoint.keep=1"], "trainer.checkpoint.keep must be >= 2"),
    "profile window past the run": (
        ["trainer.profile.start_step=145", "trainer.profile.steps=10"],
        "trainer.profile.start_step=145 + trainer.profile.steps=10 exceeds trainer.max_steps=150",
    ),
    "negative profile steps": (["trainer.profile.steps=-1"], "trainer.profile.steps must be >= 0"),
    "negative profile start": (["trainer.profile.start_step=-3"], "trainer.profile.start_step must be >= 0"),
    "heads do not divide width": (["model.n_head=5"], "model.n_embd=128 must be divisible by model.n_head=5"),
    "npz without labels": (
        ["model=mlp", "data=npz", lambda tmp: f"data.path={_npz_without_labels(tmp)}"],
        "data.y_key",
    ),
    "corpus shorter than one sample": (
        ["data=text", lambda tmp: f"data.paths=[{_tiny_corpus(tmp)}]", "data.tokenizer=bytes", "data.cache_dir=CACHE"],
        "data",
    ),
    # Losses and augmentation
    "mse on a language model": (
        ["trainer.loss=mse"],
        "trainer.loss=mse does not fit data=text, which yields token ids; allowed: cross_entropy",
    ),
    "cross_entropy on float targets": (
        ["job=diabetes_mlp_cpu", "trainer.loss=cross_entropy"],
        "trainer.loss=cross_entropy does not fit data=diabetes, which yields float targets; allowed: mse, l1, huber",
    ),
    "bce on class ids": (
        ["job=digits_mlp_cpu", "trainer.loss=bce"],
        "trainer.loss=bce does not fit data=digits, which yields class ids; allowed: cross_entropy",
    ),
    "unknown loss": (
        ["trainer.loss=focal"],
        "trainer.loss: Invalid value 'focal', expected one of [cross_entropy, mse, l1, huber, bce]",
    ),
    "float npz targets read as class ids": (
        ["model=mlp", "data=npz", lambda tmp: f"data.path={_npz_with_float_targets(tmp)}"],
        "float targets need data.targets=values",
    ),
    "augmentation on token data": (["data.augment.noise_std=0.1"], "data.augment: unknown key; allowed keys:"),
    "augmentation on synthetic tokens": (
        ["data=synthetic_tokens", "data.augment.flip=true"],
        "data.augment applies to images and feature vectors; data.kind=tokens",
    ),
    "image augmentation on feature vectors": (
        [
            "model=mlp",
            "data=npz",
            "data.targets=values",
            "trainer.loss=mse",
            lambda tmp: f"data.path={_npz_with_float_targets(tmp)}",
            "data.augment.flip=true",
        ],
        "data.augment.crop_padding, flip and rotate_degrees need images",
    ),
    "crop as large as the image": (
        ["job=digits_cnn_cpu", "data.augment.crop_padding=8"],
        "data.augment.crop_padding=8 must be smaller than the images' height and width",
    ),
    # Sharding (strategy=fsdp2 and zero0-3)
    "offload under ddp": (["strategy.offload_optimizer=cpu"], "strategy.offload_optimizer: unknown key"),
    "optimizer offload without zero": (
        ["strategy=zero0", "strategy.offload_optimizer=cpu"],
        "strategy.offload_optimizer=cpu needs ZeRO stage 1, 2 or 3",
    ),
    "parameter offload below zero3": (
        ["strategy=zero2", "strategy.offload_params=cpu"],
        "strategy.offload_params=cpu needs strategy=zero3",
    ),
    "offload to nvme": (
        ["strategy=zero3", "strategy.offload_params=nvme"],
        "strategy.offload_params: Invalid value 'nvme', expected one of [none, cpu]",
    ),
    "deepspeed fp16 on a cpu": (
        ["strategy=zero1", "trainer.precision=fp16"],
        "trainer.precision=fp16: DeepSpeed does not support fp16 on this CPU",
    ),
    "unknown deepspeed setting": (
        ["strategy=zero3", "+strategy.deepspeed_overrides.bogus=1"],
        "strategy.deepspeed_overrides: bogus is not a DeepSpeed setting",
    ),
    "unknown nested deepspeed setting": (
        ["strategy=zero2", "+strategy.deepspeed_overrides.zero_optimization.knob=1"],
        ("strategy.deepspeed_overrides.zero_optimization.knob: DeepSpeed says: Extra inputs are not permitted"),
    ),
    "invalid deepspeed value": (
        ["strategy=zero2", "+strategy.deepspeed_overrides.zero_optimization.reduce_bucket_size=-5"],
        (
            "strategy.deepspeed_overrides.zero_optimization.reduce_bucket_size: DeepSpeed says: "
            "Input should be greater than 0"
        ),
    ),
    "deepspeed override against the job": (
        ["strategy=zero2", "+strategy.deepspeed_overrides.gradient_clipping=2.0"],
        (
            "strategy.deepspeed_overrides.gradient_clipping=2.0 contradicts the job "
            "(which sets 1.0); set trainer.grad_clip instead"
        ),
    ),
    "deepspeed batch size against the job": (
        ["strategy=zero1", "+strategy.deepspeed_overrides.train_micro_batch_size_per_gpu=3"],
        (
            "strategy.deepspeed_overrides.train_micro_batch_size_per_gpu=3 contradicts "
            "the job (which sets 8); set trainer.micro_batch_size instead"
        ),
    ),
    # Ray
    "ray cluster unreachable": (
        ["launcher=ray", "launcher.address=127.0.0.1:1"],
        "launcher.address=127.0.0.1:1: no Ray cluster answers there",
    ),
    "ray address without a port": (
        ["launcher=ray", "launcher.address=headnode"],
        "launcher.address=headnode: expected host:port",
    ),
    "ray workers beyond the machine": (
        ["launcher=ray", "launcher.cpus_per_worker=2"],
        "launcher.num_workers=2 x launcher.cpus_per_worker=2 needs 4 CPUs",
    ),
    "resume from another strategy": (
        ["strategy=zero3", lambda tmp: f"trainer.resume={_checkpoint(tmp, strategy='ddp')}"],
        "written by strategy=ddp, which strategy=zero3 cannot resume from",
    ),
    "zero resume at another world size": (
        ["strategy=zero2", lambda tmp: f"trainer.resume={_checkpoint(tmp, strategy='zero2', world_size=4)}"],
        "checkpoints resume at the world size they were written at (4)",
    ),
    # model=gpt model.pretrained=DIR, and DIR's tokenizer.json for data=text
    "gpt pretrained that is not gpt-2": (
        ["model=gpt", lambda tmp: f"model.pretrained={_gpt2(tmp, model_type='llama')}", *SMALL_BYTES],
        "/gpt2/config.json: model_type='llama', not gpt2",
    ),
    "gpt size against pretrained": (
        ["model=gpt", lambda tmp: f"model.pretrained={_gpt2(tmp)}", "model.n_layer=3", *SMALL_BYTES],
        "model.n_layer=3 contradicts model.pretrained=",
    ),
    "gpt without biases from biases": (
        ["model=gpt", lambda tmp: f"model.pretrained={_gpt2(tmp, bias=True)}", *SMALL_BYTES],
        "/gpt2/model.safetensors: transformer.h.0.ln_1.bias is not zero, and model.bias=false has no biases",
    ),
    "pretrained tokenizer.json that is not one": (
        ["model=gpt", lambda tmp: f"model.pretrained={_gpt2_with_tokenizer(tmp, ids=None)}", *SMALL_TEXT],
        "/gpt2/tokenizer.json is not a tokenizer tokenizers can read",
    ),
    "pretrained tokenizer past the model's vocabulary": (
        ["model=gpt", lambda tmp: f"model.pretrained={_gpt2_with_tokenizer(tmp, ids=400)}", *SMALL_TEXT],
        "/gpt2/tokenizer.json has ids up to 399, past the model's vocab_size=300",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_naming_the_key(case: str, tmp_path: Path, cache_dir: Path) -> None:
    # In this process (the catalogue is long; a CLI process costs seconds of imports each); the cases
    # below run the installed console script, exit status and timing included.
    overrides, expected = CASES[case]
    args = [o(tmp_path) if callable(o) else o.replace("CACHE", str(cache_dir)) for o in overrides]
    run_dir = tmp_path / "run"
    result = cli_in_process("train", *args, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    code, stderr = result.returncode, result.stderr

    assert code == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert expected in lines[0]
    assert not run_dir.exists() and not (tmp_path / "outputs").exists()


@pytest.mark.parametrize(
    "case", ["unknown key", "ray cluster unreachable", "more workers than the machine", "resume path corrupt"]
)
def test_the_console_script_exits_2_with_one_line(case: str, tmp_path: Path, cache_dir: Path) -> None:
    overrides, expected = CASES[case]
    args = [o(tmp_path) if callable(o) else o.replace("CACHE", str(cache_dir)) for o in overrides]
    run_dir = tmp_path / "run"
    result = run_cli("train", *args, f"hydra.run.dir={run_dir}", cwd=tmp_path, timeout=120)

    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], result.stderr
    assert not run_dir.exists() and not (tmp_path / "outputs").exists()


def test_freeze_names_are_checked_against_the_built_model(tmp_path: Path) -> None:
    base = tmp_path / "base"
    run_cli(
        "train",
        "job=digits_mlp_cpu",
        "launcher=local",
        "trainer.max_steps=2",
        "trainer.eval_every=0",
        f"hydra.run.dir={base}",
        "logger.progress=false",
        cwd=tmp_path,
        check=True,
    )
    result = run_cli(
        "train",
        "job=digits_mlp_cpu",
        "launcher=local",
        f"trainer.init_from={base}",
        "trainer.freeze=[encoder]",
        f"hydra.run.dir={tmp_path / 'tuned'}",
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "error: trainer.freeze: 'encoder' is not a module of this model; top-level modules are: hidden, head"
    )
    assert not (tmp_path / "tuned").exists()


def test_unknown_command(tmp_path: Path) -> None:
    result = run_cli("trian", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "error: unknown command 'trian'; commands: "
        "train, verify, estimate, scale, search, report, export, cluster, submit, jobs"
    )
