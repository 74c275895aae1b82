"""model=gpt and transformers' GPT-2 are the same network: GPT's weights in GPT-2's layout compute GPT's logits
in GPT2LMHeadModel, and GPT-2's come back unchanged; the safetensors writer's files are what safetensors reads."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from orchestrator.config.schema import GPTConfig
from orchestrator.errors import UserError
from orchestrator.export.safetensors_files import OutTensor, plan_shards, write_safetensors
from orchestrator.models.gpt import GPT
from orchestrator.models.gpt2_format import gpt2_config, gpt2_to_gpt, gpt_config, gpt_to_gpt2

transformers = pytest.importorskip("transformers")

VOCAB, BLOCK = 97, 16
INPUTS = torch.randint(0, VOCAB, (2, BLOCK), generator=torch.Generator().manual_seed(0))


def _gpt(*, bias: bool) -> GPT:
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=4, n_embd=32, bias=bias, dropout=0.1), vocab_size=VOCAB, block_size=BLOCK)
    model.init_weights()
    with torch.no_grad():  # init_weights zeroes biases and sets LayerNorms to 1: make every tensor count
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.1)
    return model.eval()


def _gpt2(gpt: GPT, *, bias: bool, **overrides: object) -> torch.nn.Module:
    cfg = GPTConfig(n_layer=2, n_head=4, n_embd=32, bias=bias, dropout=0.1)
    config = transformers.GPT2Config(**{**gpt2_config(cfg, vocab_size=VOCAB, block_size=BLOCK), **overrides})
    model = transformers.GPT2LMHeadModel(config).eval()
    missing, unexpected = model.load_state_dict(gpt_to_gpt2(gpt.state_dict()), strict=False)
    assert missing == ["lm_head.weight"] and unexpected == []  # the head is tied to transformer.wte
    return model


@pytest.mark.parametrize("bias", [False, True])
def test_gpt_weights_compute_the_same_logits_in_gpt2(bias: bool) -> None:
    gpt = _gpt(bias=bias)
    gpt2 = _gpt2(gpt, bias=bias)
    with torch.no_grad():
        expected, logits = gpt(INPUTS), gpt2(input_ids=INPUTS).logits
    assert expected.abs().mean() > 0.1  # not a degenerate model
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)


def test_the_comparison_sees_the_gelu_approximation() -> None:
    """OpenAI's tanh GELU (gelu_new) moves the logits past the tolerance: the exact GELU is a real choice."""
    gpt = _gpt(bias=True)
    with torch.no_grad():
        difference = gpt(INPUTS) - _gpt2(gpt, bias=True, activation_function="gelu_new")(input_ids=INPUTS).logits
    assert difference.abs().max() > 1e-5


@pytest.mark.parametrize("bias", [False, True])
def test_gpt2_weights_come_back_unchanged(bias: bool) -> None:
    state = _gpt(bias=bias).state_dict()
    back = gpt2_to_gpt(gpt_to_gpt2(state), bias=bias, source="test")
    assert back.keys() == state.keys()
    assert all(torch.equal(back[name], state[name]) for name in state)


def test_bare_gpt2_names_and_mask_buffers_are_read() -> None:
    """GPT2Model's names (no ``transformer.``) and the causal-mask buffers older checkpoints carry."""
    state = gpt_to_gpt2(_gpt(bias=True).state_dict())
    bare = {name.removeprefix("transformer."): tensor for name, tensor in state.items()}
    bare["h.0.attn.bias"] = torch.tril(torch.ones(1, 1, BLOCK, BLOCK))
    assert gpt2_to_gpt(bare, bias=True, source="test").keys() == _gpt(bias=True).state_dict().keys()


def test_nonzero_biases_do_not_load_into_a_gpt_without_biases() -> None:
    with pytest.raises(UserError, match=r"test: transformer.h.0.ln_1.bias is not zero, and model.bias=false"):
        gpt2_to_gpt(gpt_to_gpt2(_gpt(bias=True).state_dict()), bias=False, source="test")


def test_an_untied_head_is_refused() -> None:
    state = gpt_to_gpt2(_gpt(bias=True).state_dict())
    state["lm_head.weight"] = torch.zeros_like(state["transformer.wte.weight"])
    with pytest.raises(UserError, match="lm_head.weight differs from transformer.wte.weight"):
        gpt2_to_gpt(state, bias=True, source="test")


def test_the_config_comes_back() -> None:
    cfg = GPTConfig(n_layer=3, n_head=2, n_embd=48, dropout=0.1, bias=True)
    back = gpt_config(gpt2_config(cfg, vocab_size=VOCAB, block_size=BLOCK), source="config.json")
    assert back == GPTConfig(n_layer=3, n_head=2, n_embd=48, dropout=0.1, bias=True, vocab_size=VOCAB, block_size=BLOCK)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("activation_function", "gelu_new", "activation_function='gelu_new' cannot be loaded as model=gpt"),
        ("n_inner", 100, "n_inner=100 cannot be loaded as model=gpt"),
        ("layer_norm_epsilon", 1e-6, "layer_norm_epsilon=1e-06 cannot be loaded as model=gpt"),
        ("tie_word_embeddings", False, "tie_word_embeddings=False cannot be loaded as model=gpt"),
        ("attn_pdrop", 0.0, "differ; model=gpt has one model.dropout"),
        ("model_type", "llama", "model_type='llama', not gpt2"),
    ],
)
def test_what_gpt_cannot_express_is_refused(field: str, value: object, message: str) -> None:
    config = gpt2_config(GPTConfig(dropout=0.1), vocab_size=VOCAB, block_size=BLOCK)
    with pytest.raises(UserError, match=f"^config.json: .*{message}"):
        gpt_config({**config, field: value}, source="config.json")


def test_openai_gpt2_defaults_are_refused_for_their_gelu() -> None:
    """A config.json that leaves fields out gets GPT2Config's defaults, gelu_new among them."""
    with pytest.raises(UserError, match="activation_function='gelu_new'.*load them with model=hf"):
        gpt_config({"model_type": "gpt2"}, source="config.json")


def test_safetensors_files_read_back(tmp_path) -> None:
    tensors = {
        "f32": torch.randn(3, 5),
        "bf16": torch.randn(7).to(torch.bfloat16),
        "f16": torch.randn(2, 2, 2).half(),
        "i64": torch.arange(6).reshape(2, 3),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
        "transposed": torch.randn(4, 6).t(),
    }
    out = [OutTensor(name=name, shape=tuple(t.shape), dtype=t.dtype, read=lambda t=t: t) for name, t in tensors.items()]
    write_safetensors(tmp_path / "model.safetensors", out)
    back = load_file(tmp_path / "model.safetensors")
    assert back.keys() == tensors.keys()
    assert all(back[name].dtype == t.dtype and torch.equal(back[name], t) for name, t in tensors.items())


def test_shards_split_before_the_limit() -> None:
    def tensor(name: str, numel: int) -> OutTensor:
        return OutTensor(name=name, shape=(numel,), dtype=torch.float32, read=lambda: torch.zeros(numel))

    shards = plan_shards([tensor("a", 10), tensor("b", 10), tensor("big", 100), tensor("c", 5)], max_shard_bytes=80)
    assert {name: [t.name for t in ts] for name, ts in shards.items()} == {
        "model-00001-of-00003.safetensors": ["a", "b"],
        "model-00002-of-00003.safetensors": ["big"],
        "model-00003-of-00003.safetensors": ["c"],
    }
    assert list(plan_shards([tensor("a", 10)], max_shard_bytes=80)) == ["model.safetensors"]
