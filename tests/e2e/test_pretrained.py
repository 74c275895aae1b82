"""model.pretrained=DIR: a save_pretrained directory (made here by transformers itself, random weights, since
nothing can be downloaded) trains under ddp, fsdp2 and zero3 at 2 ranks, starting from exactly its weights."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from orchestrator.checkpoints import manifest
from orchestrator.strategies import read_model_weights
from tests.helpers import KEEP_LOADED_WEIGHTS, TINY_HF_JOB, cli_in_process, save_tiny_llama

JOB = TINY_HF_JOB


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama as save_pretrained writes it, in several safetensors shards with an index."""
    directory = save_tiny_llama(tmp_path_factory.mktemp("pretrained") / "llama", max_shard_size="100KB")
    assert (directory / "model.safetensors.index.json").exists()
    return directory


def _file_tensors(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors = {}
    for shard in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(shard))
    return tensors


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2", "zero3"])
def test_training_starts_from_exactly_the_pretrained_weights_and_exports_them_unchanged(
    strategy: str, pretrained: Path, tmp_path: Path, cache_dir: Path
) -> None:
    run_dir = tmp_path / "run"
    cli_in_process(
        "train",
        *JOB,
        f"data.cache_dir={cache_dir}",
        f"strategy={strategy}",
        f"model.pretrained={pretrained}",
        *KEEP_LOADED_WEIGHTS,
        f"hydra.run.dir={run_dir}",
        cwd=tmp_path,
        check=True,
    )
    checkpoint = run_dir / "checkpoints" / manifest.step_dir_name(1)
    trained = read_model_weights(checkpoint, written_by=strategy)
    expected = _file_tensors(pretrained)
    assert {name.removeprefix("model.") for name in trained} == set(expected) | {"lm_head.weight"}  # tied head
    for name, tensor in expected.items():
        assert torch.equal(trained[f"model.{name}"], tensor), name
    assert torch.equal(trained["model.lm_head.weight"], expected["model.embed_tokens.weight"])

    # Round trip: exported, the weights are the input's, tensor for tensor, and transformers loads them.
    exported = tmp_path / "exported"
    cli_in_process("export", str(run_dir), "-o", str(exported), cwd=tmp_path, check=True)
    out = _file_tensors(exported)
    assert set(out) == set(expected) and all(torch.equal(out[name], expected[name]) for name in expected)


def _without(pretrained: Path, tmp_path: Path, *names: str) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(pretrained, copy)
    for name in names:
        for path in copy.glob(name):
            path.unlink()
    return copy


def _reshaped(pretrained: Path, tmp_path: Path) -> Path:
    copy = _without(pretrained, tmp_path)
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "intermediate_size": 96}))
    return copy


BAD = {
    "no config.json": (
        lambda p, t: [f"model.pretrained={_without(p, t, 'config.json')}"],
        "no config.json in it (expected what save_pretrained writes)",
    ),
    "no weights": (
        lambda p, t: [f"model.pretrained={_without(p, t, '*.safetensors*')}"],
        "no model.safetensors or model.safetensors.index.json in it",
    ),
    "a hub id": (
        lambda p, t: ["model.pretrained=meta-llama/Llama-3.2-1B"],
        "model.pretrained=meta-llama/Llama-3.2-1B: no such directory (it looks like a Hugging Face hub id: "
        "nothing is downloaded here",
    ),
    "shapes that do not match the config": (
        lambda p, t: [f"model.pretrained={_reshaped(p, t)}"],
        "model.pretrained: the weights do not fit this model "
        "(model.model.layers.0.mlp.gate_proj.weight is [64, 32] in the checkpoint, [96, 32] in this model)",
    ),
    "a contradicting model.config": (
        lambda p, t: [f"model.pretrained={p}", "+model.config.hidden_size=64"],
        "model.config.hidden_size=64 contradicts model.pretrained=",
    ),
    "init_from as well": (
        lambda p, t: [f"model.pretrained={p}", f"trainer.init_from={p}"],
        "trainer.init_from and model.pretrained both name the initial weights; set one",
    ),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_pretrained_input_is_one_line(case: str, pretrained: Path, tmp_path: Path, cache_dir: Path) -> None:
    overrides, expected = BAD[case]
    args = [*JOB, f"data.cache_dir={cache_dir}", *overrides(pretrained, tmp_path), f"hydra.run.dir={tmp_path / 'run'}"]
    result = cli_in_process("train", *args, cwd=tmp_path)
    code, stderr = result.returncode, result.stderr
    assert code == 2, stderr
    (line,) = stderr.strip().splitlines()
    assert line.startswith("error: ") and expected in line, line
    assert not (tmp_path / "run").exists()
