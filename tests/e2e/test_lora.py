"""model.lora: LoRA adapters on a pretrained directory (made here by transformers, random weights) under ddp, fsdp2
and zero1-3 at 2 ranks: only the adapters train, resume is bit-exact, the base can stay in bf16, and the result
exports as PEFT adapters or merged, loading in transformers with this project's logits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from orchestrator.checkpoints import manifest
from orchestrator.config.compose import load_resolved
from orchestrator.data import prepare_data
from orchestrator.experiments.estimate import describe, model_states
from orchestrator.models import build_model, model_blocks
from orchestrator.models.lora import is_adapter, lora_for
from orchestrator.strategies import read_model_weights
from tests.helpers import TINY_HF_JOB, cli_in_process, save_tiny_llama, tiny_job, train_losses

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

RANK = 4
JOB = [*TINY_HF_JOB, f"model.lora.rank={RANK}", "optim.lr=1e-2"]
BATCH = torch.tensor([[3, 17, 200, 5, 99, 42, 7, 128, 64, 1, 250, 33], [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]])


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("pretrained") / "llama")


def _adapter_params(hidden: int = 32, intermediate: int = 64, kv: int = 16, layers: int = 2) -> int:
    """LoRA parameters of the tiny Llama's seven projections per layer: rank x (in + out) each."""
    shapes = [
        (hidden, hidden),
        (hidden, kv),
        (hidden, kv),
        (hidden, hidden),  # q, k, v, o
        (hidden, intermediate),
        (hidden, intermediate),
        (intermediate, hidden),
    ]  # gate, up, down
    return layers * sum(RANK * (fan_in + fan_out) for fan_in, fan_out in shapes)


def _file_tensors(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {
        name: tensor for path in sorted(directory.glob("*.safetensors")) for name, tensor in load_file(path).items()
    }


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2", "zero1", "zero2", "zero3"])
def test_only_the_adapters_train_and_resume_is_bit_exact(
    strategy: str, pretrained: Path, tmp_path: Path, cache_dir: Path
) -> None:
    job = [
        *JOB,
        f"data.cache_dir={cache_dir}",
        f"strategy={strategy}",
        f"model.pretrained={pretrained}",
        "model.lora.dropout=0.1",
        "trainer.max_steps=4",
        "trainer.checkpoint.every=2",
    ]
    first, second = tmp_path / "first", tmp_path / "second"
    cli_in_process("train", *job, f"hydra.run.dir={first}", cwd=tmp_path, check=True)
    step_2 = first / "checkpoints" / manifest.step_dir_name(2)
    result = cli_in_process(
        "train", *job, f"trainer.resume={step_2}", f"hydra.run.dir={second}", cwd=tmp_path, check=True
    )
    assert "resumed from" in result.stdout
    resumed = train_losses(second)
    assert sorted(resumed) == [3, 4]
    assert resumed == {step: loss for step, loss in train_losses(first).items() if step > 2}

    summary = json.loads((first / "summary.json").read_text())
    trainable = _adapter_params()
    assert summary["num_trainable_params"] == trainable < summary["num_params"] / 10
    # Gradients and optimizer state exist for the adapters alone (at most their fp32 size; sharded: half).
    assert 0 < summary["grad_bytes"] <= 4 * trainable
    assert 0 < summary["optimizer_bytes"] <= 2 * 4 * trainable + 1024  # Adam's two moments (+ step counters)
    assert summary["param_bytes"] > 5 * summary["grad_bytes"]
    # orchestrator estimate counts LoRA's model states as measured: the full cost for the adapters, weights
    # alone for the frozen base.
    config = load_resolved((first / "config.yaml").read_text())
    estimated = model_states(strategy, "none", config.trainer.precision, describe(config), world_size=2).sharded
    measured = sum(summary[key] for key in ("param_bytes", "grad_bytes", "optimizer_bytes", "master_bytes"))
    assert abs(estimated - measured) <= 0.05 * measured, (estimated, measured)

    # The frozen base is the pretrained weights exactly; the adapters moved (B starts at zero).
    checkpoint = first / "checkpoints" / manifest.step_dir_name(4)
    trained = read_model_weights(checkpoint, written_by=strategy)
    base = _file_tensors(pretrained)
    for name, tensor in trained.items():
        if not is_adapter(name):
            stored = name.removeprefix("model.").replace(".base_layer.", ".")
            stored = "model.embed_tokens.weight" if stored == "lm_head.weight" else stored
            assert torch.equal(tensor, base[stored]), name
    b_matrices = [tensor for name, tensor in trained.items() if ".lora_B." in name]
    assert len(b_matrices) == 14 and all(tensor.abs().max() > 0 for tensor in b_matrices)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_a_bf16_base_holds_the_frozen_weights_in_half_the_bytes(
    strategy: str, pretrained: Path, tmp_path: Path, cache_dir: Path
) -> None:
    run_dir = tmp_path / "run"
    cli_in_process(
        "train",
        *JOB,
        f"data.cache_dir={cache_dir}",
        f"strategy={strategy}",
        f"model.pretrained={pretrained}",
        "trainer.precision=bf16",
        "model.lora.base_dtype=bf16",
        "trainer.max_steps=2",
        f"hydra.run.dir={run_dir}",
        cwd=tmp_path,
        check=True,
    )
    summary = json.loads((run_dir / "summary.json").read_text())
    trainable = _adapter_params()
    frozen = summary["num_params"] - trainable
    shards = 2 if strategy == "fsdp2" else 1
    # bf16 frozen weights plus fp32 adapters, per rank (FSDP2 shards both over the two ranks).
    assert abs(summary["param_bytes"] * shards - (2 * frozen + 4 * trainable)) <= 64 * 32
    assert all(loss == loss for loss in train_losses(run_dir).values())  # finite


@pytest.fixture(scope="module")
def lora_runs(pretrained: Path, tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> dict[str, Path]:
    """A LoRA run of the pretrained Llama (model=hf) and of the tiny GPT (model=gpt, no pretrained base)."""
    root = tmp_path_factory.mktemp("lora_runs")
    runs = {"llama": root / "llama", "gpt": root / "gpt"}
    cli_in_process(
        "train",
        *JOB,
        f"data.cache_dir={cache_dir}",
        f"model.pretrained={pretrained}",
        "trainer.max_steps=3",
        f"hydra.run.dir={runs['llama']}",
        cwd=root,
        check=True,
    )
    cli_in_process(
        "train",
        *tiny_job(cache_dir),
        f"model.lora.rank={RANK}",
        "model.lora.target_modules=[qkv,fc]",
        "strategy=zero3",
        "trainer.max_steps=3",
        "trainer.checkpoint.every=3",
        "trainer.eval_every=0",
        "scheduler.warmup_steps=0",
        "optim.lr=1e-2",
        f"hydra.run.dir={runs['gpt']}",
        cwd=root,
        check=True,
    )
    return runs


def _own_logits(run_dir: Path) -> torch.Tensor:
    """This project's model with its adapters, built from the run's config and loaded from its checkpoint."""
    config = load_resolved((run_dir / "config.yaml").read_text())
    checkpoint = manifest.resolve_checkpoint(run_dir, key="test")
    model = build_model(config.model, prepare_data(config.data))
    lora_for(config.model).add(model, blocks=model_blocks(config.model, model))
    model.load_state_dict(read_model_weights(checkpoint, written_by=manifest.read_manifest(checkpoint).strategy))
    with torch.no_grad():
        return model.eval()(BATCH)


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=BATCH).logits


@pytest.mark.parametrize("model", ["llama", "gpt"])
def test_adapters_export_for_peft_and_merged_with_the_projects_logits(
    model: str, lora_runs: dict[str, Path], pretrained: Path, tmp_path: Path
) -> None:
    run_dir = lora_runs[model]
    adapters, merged = tmp_path / "adapters", tmp_path / "merged"
    result = cli_in_process("export", str(run_dir), "-o", str(adapters), cwd=tmp_path, check=True)
    assert "adapter_model.safetensors over" in result.stdout, result.stdout
    cli_in_process("export", str(run_dir), "-o", str(merged), "--merge-lora", cwd=tmp_path, check=True)
    config = json.loads((adapters / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == RANK
    # Over the pretrained directory when the run had one; else the base weights are written beside the adapters.
    assert config["base_model_name_or_path"] == str(pretrained if model == "llama" else adapters)
    assert (adapters / "config.json").exists() == (model == "gpt")

    own = _own_logits(run_dir)
    base = transformers.AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"])
    with_adapters = peft.PeftModel.from_pretrained(base, adapters)
    merged_model, info = transformers.AutoModelForCausalLM.from_pretrained(merged, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert torch.allclose(_logits(with_adapters), own, atol=1e-5, rtol=0)
    assert torch.allclose(_logits(merged_model), own, atol=1e-5, rtol=0)
    # transformers loads the adapter directory itself (base from adapter_config.json, adapters on top).
    assert torch.allclose(_logits(transformers.AutoModelForCausalLM.from_pretrained(adapters)), own, atol=1e-5, rtol=0)
    # Training moved the model away from its base.
    with with_adapters.disable_adapter():
        assert not torch.allclose(_logits(with_adapters), own, atol=1e-3)


def test_bad_lora_settings_are_one_line_and_exit_2(
    pretrained: Path, lora_runs: dict[str, Path], tmp_path: Path, cache_dir: Path
) -> None:
    # The job's own model (model=llama_tiny: the tiny Llama's config, random weights) unless model=hf is named.
    common = [arg for arg in JOB if arg != "model=hf"] + [
        f"data.cache_dir={cache_dir}",
        "trainer.max_steps=1",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    cases = {
        "model.lora.target_modules: 'qkv' names no linear layer of this model; its block's linear layers are: "
        "self_attn.q_proj": ["model=hf", f"model.pretrained={pretrained}", "model.lora.target_modules=[qkv]"],
        "model.lora.base_dtype=bf16 needs trainer.precision=bf16": [
            "model=hf",
            f"model.pretrained={pretrained}",
            "model.lora.base_dtype=bf16",
        ],
        "trainer.freeze and model.lora": [f"trainer.init_from={lora_runs['llama']}", "trainer.freeze=[model]"],
        "it holds LoRA adapters; `orchestrator export --merge-lora` writes the model they make": [
            f"trainer.init_from={lora_runs['llama']}"
        ],
    }
    for expected, extra in cases.items():
        result = cli_in_process("train", *common, *extra, cwd=tmp_path)
        assert result.returncode == 2, (expected, result.stderr)
        (line,) = result.stderr.strip().splitlines()
        assert line.startswith("error: ") and expected in line, line
        assert not (tmp_path / "run" / "checkpoints").exists()
