"""model=gpt model.pretrained=DIR: the sizes come from DIR's GPT-2 config.json and the weights from its safetensors
files, Conv1D weights transposed as they are read, a rank's rows read as the file's columns."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from orchestrator.config.compose import compose, to_config
from orchestrator.config.schema import GPTConfig, SampleKind
from orchestrator.data.spec import DataSpec
from orchestrator.errors import UserError
from orchestrator.export.safetensors_files import OutTensor, index_json, plan_shards, write_safetensors
from orchestrator.models import build_model, meta_device, pretrained_weights
from orchestrator.models.gpt import GPT
from orchestrator.models.gpt2_format import gpt2_config, gpt_to_gpt2
from orchestrator.models.recipe import check_weights_fit, load_weights, state_shapes

SIZES = dict(n_layer=2, n_head=2, n_embd=16)
VOCAB, BLOCK = 300, 32
TOKENS = DataSpec(kind=SampleKind.tokens, vocab_size=256, seq_len=16)


def write_gpt2_dir(
    directory: Path, *, bias: bool = False, max_shard_bytes: int = 10**9, seed: int = 0, **config_changes: object
) -> GPT:
    """A GPT written as ``orchestrator export`` writes it (GPT-2 names, Conv1D weights transposed, zero biases for a
    GPT without them), with random weights everywhere it has them; returns the GPT."""
    torch.manual_seed(seed)
    gpt = GPT(GPTConfig(**SIZES, bias=bias), vocab_size=VOCAB, block_size=BLOCK)
    gpt.init_weights()
    with torch.no_grad():  # init_weights zeroes biases and sets LayerNorms to 1: make every tensor count
        for param in gpt.parameters():
            param.add_(torch.randn_like(param) * 0.1)
    tensors = [
        OutTensor(name=name, shape=tuple(t.shape), dtype=t.dtype, read=lambda t=t: t)
        for name, t in gpt_to_gpt2(gpt.state_dict()).items()
    ]
    shards = plan_shards(tensors, max_shard_bytes=max_shard_bytes)
    directory.mkdir(parents=True, exist_ok=True)
    for name, shard in shards.items():
        write_safetensors(directory / name, shard)
    if len(shards) > 1:
        (directory / "model.safetensors.index.json").write_text(index_json(shards))
    config = {**gpt2_config(GPTConfig(**SIZES, bias=bias), vocab_size=VOCAB, block_size=BLOCK), **config_changes}
    (directory / "config.json").write_text(json.dumps(config))
    return gpt


def _built(cfg: GPTConfig) -> GPT:
    with meta_device():
        return build_model(cfg, TOKENS)


def test_the_composed_config_takes_every_size_from_config_json(tmp_path: Path) -> None:
    write_gpt2_dir(tmp_path / "gpt2")
    model = to_config(compose(["model=gpt", f"model.pretrained={tmp_path / 'gpt2'}", "data.seq_len=16"])).model
    assert (model.n_layer, model.n_head, model.n_embd, model.vocab_size, model.block_size) == (2, 2, 16, VOCAB, BLOCK)
    assert not model.bias  # the job's: GPT-2 always has biases, and these are zero
    plain = to_config(compose(["model=gpt"])).model
    assert (plain.n_layer, plain.n_head, plain.n_embd, plain.vocab_size, plain.block_size) == (4, 4, 256, None, None)


@pytest.mark.parametrize("bias", [False, True])
def test_the_weights_load_unchanged_and_a_ranks_rows_are_the_files_columns(bias: bool, tmp_path: Path) -> None:
    gpt = write_gpt2_dir(tmp_path / "gpt2", bias=bias, max_shard_bytes=20_000)
    assert len(list((tmp_path / "gpt2").glob("*.safetensors"))) > 2
    cfg = GPTConfig(**SIZES, bias=bias, pretrained=str(tmp_path / "gpt2"))
    model = build_model(cfg, TOKENS)
    source = pretrained_weights(cfg, _built(cfg))  # a meta-device build tells the names
    load_weights(model, source)
    expected = gpt.state_dict()
    assert model.state_dict().keys() == expected.keys()
    assert all(torch.equal(model.state_dict()[name], expected[name]) for name in expected)
    assert model.lm_head.weight is model.tok_emb.weight
    qkv = "blocks.1.attn.qkv.weight"  # a Conv1D weight: stored (in, out), read (out, in)
    assert source.shapes()[qkv] == [3 * 16, 16]
    for rows in [(0, 24), (24, 48), (5, 6)]:
        assert torch.equal(source.read(qkv, rows=rows), expected[qkv][rows[0] : rows[1]])


def test_zero_biases_load_into_a_gpt_without_biases_and_others_do_not(tmp_path: Path) -> None:
    write_gpt2_dir(tmp_path / "zero", bias=False)
    cfg = GPTConfig(**SIZES, pretrained=str(tmp_path / "zero"))
    check_weights_fit(state_shapes(_built(cfg)), pretrained_weights(cfg, _built(cfg)))
    write_gpt2_dir(tmp_path / "biased", bias=True)
    cfg = GPTConfig(**SIZES, pretrained=str(tmp_path / "biased"))
    with pytest.raises(
        UserError,
        match=rf"^model.pretrained: {tmp_path / 'biased' / 'model.safetensors'}: "
        r"transformer.h.0.ln_1.bias is not zero, and model.bias=false has no biases; "
        r"use model.bias=true$",
    ):
        pretrained_weights(cfg, _built(cfg))


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        (dict(n_layer=3), r"model.n_layer=3 contradicts model.pretrained=.*config.json: n_layer=2\)"),
        (dict(block_size=64), r"model.block_size=64 contradicts model.pretrained=.*config.json: n_positions=32\)"),
        (dict(vocab_size=512), r"model.vocab_size=512 contradicts model.pretrained=.*config.json: vocab_size=300\)"),
    ],
)
def test_a_size_that_contradicts_config_json_is_refused(setting: dict, message: str, tmp_path: Path) -> None:
    write_gpt2_dir(tmp_path / "gpt2")
    with pytest.raises(UserError, match=message):
        build_model(GPTConfig(**{**SIZES, **setting}, pretrained=str(tmp_path / "gpt2")), TOKENS)


def test_what_the_directory_cannot_give_is_refused(tmp_path: Path) -> None:
    write_gpt2_dir(tmp_path / "llama", model_type="llama")
    with pytest.raises(
        UserError,
        match=rf"^model.pretrained: {tmp_path / 'llama' / 'config.json'}: "
        r"model_type='llama', not gpt2$",
    ):
        build_model(GPTConfig(**SIZES, pretrained=str(tmp_path / "llama")), TOKENS)
    write_gpt2_dir(tmp_path / "short", n_positions=8)
    with pytest.raises(UserError, match=r"config.json's n_positions=8 is shorter than data.seq_len=16"):
        build_model(GPTConfig(**SIZES, pretrained=str(tmp_path / "short")), TOKENS)
    with pytest.raises(UserError, match="no such directory"):
        build_model(GPTConfig(**SIZES, pretrained=str(tmp_path / "nowhere")), TOKENS)
