"""Models: each builds for its data, learns, initializes reproducibly, builds on the meta device, and reports
the parameter counts and FLOPs that throughput and memory estimates rely on."""

from __future__ import annotations

import importlib.util
import socket
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from orchestrator.config.schema import (
    CNNConfig,
    GPTConfig,
    HFConfig,
    LSTMConfig,
    MLPConfig,
    ModelConfig,
    SampleKind,
)
from orchestrator.data.spec import DataSpec
from orchestrator.errors import UserError
from orchestrator.models import build_model, describe_model, meta_device, model_blocks

TOKENS = DataSpec(kind=SampleKind.tokens, vocab_size=64, seq_len=16)
DIGITS = DataSpec(kind=SampleKind.images, input_shape=(1, 8, 8), num_classes=10)
CIFAR = DataSpec(kind=SampleKind.images, input_shape=(3, 32, 32), num_classes=10)
VECTORS = DataSpec(kind=SampleKind.images, input_shape=(20,), num_classes=3)

needs_transformers = pytest.mark.skipif(
    importlib.util.find_spec("transformers") is None, reason="needs the hf extra: pip install 'orchestrator[hf]'"
)
TINY_LLAMA = dict(
    model_type="llama",
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=128,
)
# gpt2's default special tokens (50256) lie outside a 64-token vocabulary; transformers warns about them.
TINY_GPT2 = dict(model_type="gpt2", n_embd=64, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0)

TOKEN_CASES = [
    pytest.param(GPTConfig(n_layer=2, n_head=2, n_embd=32), TOKENS, id="gpt"),
    pytest.param(LSTMConfig(n_embd=16, hidden_size=32, n_layer=2), TOKENS, id="lstm"),
    pytest.param(HFConfig(config=TINY_LLAMA), TOKENS, id="hf-llama", marks=needs_transformers),
    pytest.param(HFConfig(config=TINY_GPT2), TOKENS, id="hf-gpt2", marks=needs_transformers),
]
CASES = TOKEN_CASES + [
    pytest.param(MLPConfig(hidden_sizes=[32, 32]), DIGITS, id="mlp-digits"),
    pytest.param(MLPConfig(hidden_sizes=[32]), VECTORS, id="mlp-vectors"),
    pytest.param(CNNConfig(widths=[8, 16]), DIGITS, id="cnn-digits"),
    pytest.param(CNNConfig(widths=[8, 16]), CIFAR, id="cnn-cifar"),
    # Five stages on 8x8: 8 -> 4 -> 2 -> 1 -> 1 -> 1, never below one pixel.
    pytest.param(CNNConfig(widths=[4, 4, 4, 4, 4]), DIGITS, id="cnn-digits-5-stages"),
]


def _batch(data: DataSpec, *, size: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    if data.kind is SampleKind.tokens:
        # Each sequence counts up from a random start, so that every model here can learn the next token.
        starts = torch.randint(0, data.vocab_size, (size, 1), generator=generator)
        tokens = (starts + torch.arange(data.seq_len + 1)) % data.vocab_size
        return tokens[:, :-1], tokens[:, 1:]
    inputs = torch.randn(size, *data.input_shape, generator=generator)
    return inputs, torch.randint(0, data.num_classes, (size,), generator=generator)


def _loss(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    # What the training loop computes, for both kinds of model.
    return F.cross_entropy(model(inputs).flatten(0, -2), targets.flatten())


def _build(cfg: ModelConfig, data: DataSpec, *, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(cfg, data)


def _same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    state_a, state_b = a.state_dict(), b.state_dict()
    return state_a.keys() == state_b.keys() and all(torch.equal(state_a[k], state_b[k]) for k in state_a)


# ------------------------------------------------------------------------------------ every model


@pytest.mark.parametrize(("cfg", "data"), CASES)
def test_forward_gives_logits_of_the_right_shape(cfg: ModelConfig, data: DataSpec) -> None:
    inputs, targets = _batch(data, size=3)
    logits = _build(cfg, data)(inputs)
    expected = (3, data.seq_len, data.vocab_size) if data.kind is SampleKind.tokens else (3, data.num_classes)
    assert logits.shape == expected
    assert logits.dtype == torch.float32


@pytest.mark.parametrize(("cfg", "data"), CASES)
def test_learns_a_fixed_batch(cfg: ModelConfig, data: DataSpec) -> None:
    model = _build(cfg, data)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    inputs, targets = _batch(data)
    losses = []
    for _ in range(20):
        loss = _loss(model, inputs, targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0], losses


@pytest.mark.parametrize(("cfg", "data"), CASES)
def test_same_seed_gives_the_same_weights(cfg: ModelConfig, data: DataSpec) -> None:
    assert _same_state(_build(cfg, data, seed=3), _build(cfg, data, seed=3))
    assert not _same_state(_build(cfg, data, seed=3), _build(cfg, data, seed=4))


@pytest.mark.parametrize(("cfg", "data"), CASES)
def test_meta_build_allocates_nothing_and_counts_like_a_real_build(cfg: ModelConfig, data: DataSpec) -> None:
    with meta_device():
        meta_model = build_model(cfg, data)
    assert all(t.is_meta for t in [*meta_model.parameters(), *meta_model.buffers()])
    assert describe_model(cfg, data, meta_model) == describe_model(cfg, data, _build(cfg, data))


def test_meta_build_skips_random_fills_and_imports_no_compiler() -> None:
    # torch runs normal_ on a meta tensor through a decomposition that imports torch._dynamo (~1.4 s in
    # every driver and worker); meta_device() skips the fill, and the shapes are the same.
    code = (
        "import sys, torch\n"
        "from orchestrator.config.schema import GPTConfig, SampleKind\n"
        "from orchestrator.data.spec import DataSpec\n"
        "from orchestrator.models import build_model, meta_device\n"
        "data = DataSpec(kind=SampleKind.tokens, vocab_size=64, seq_len=16)\n"
        "with meta_device():\n"
        "    model = build_model(GPTConfig(n_layer=2, n_head=2, n_embd=32), data)\n"
        "with torch.device('meta'):\n"
        "    x = torch.empty(3)\n"
        "x.normal_()\n"  # outside meta_device(): torch's own path, for contrast
        "assert all(p.is_meta for p in model.parameters())\n"
        "print(sorted(name for name in sys.modules if name.startswith('torch._dynamo'))[:1])\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code.replace("x.normal_()\n", "")], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"
    contrast = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert contrast.stdout.strip() == "['torch._dynamo']"


@pytest.mark.parametrize(("cfg", "data"), CASES)
def test_meta_build_materializes_like_a_real_build(cfg: ModelConfig, data: DataSpec) -> None:
    # The sharded path: build on meta, (shard), allocate, then init_weights fills every parameter and buffer.
    with meta_device():
        model = build_model(cfg, data)
    model.to_empty(device="cpu")
    torch.manual_seed(5)
    model.init_weights()
    reference = _build(cfg, data)
    torch.manual_seed(5)
    reference.init_weights()
    assert _same_state(model, reference)
    assert describe_model(cfg, data, model).num_params == describe_model(cfg, data, reference).num_params


def _expected_num_blocks(cfg: ModelConfig) -> int:
    if isinstance(cfg, (GPTConfig, LSTMConfig)):
        return cfg.n_layer
    if isinstance(cfg, HFConfig):
        return cfg.config.get("num_hidden_layers") or cfg.config["n_layer"]
    if isinstance(cfg, CNNConfig):
        return len(cfg.widths) * cfg.blocks_per_stage
    return len(cfg.hidden_sizes)


@pytest.mark.parametrize(("cfg", "data"), CASES)
def test_model_blocks_are_the_repeated_layers(cfg: ModelConfig, data: DataSpec) -> None:
    model = _build(cfg, data)
    blocks = model_blocks(cfg, model)
    assert len(blocks) == _expected_num_blocks(cfg)
    assert len({type(block) for block in blocks}) == 1
    assert len({id(block) for block in blocks}) == len(blocks)
    assert all(any(block is module for module in model.modules()) for block in blocks)


@pytest.mark.parametrize(("cfg", "data"), TOKEN_CASES)
def test_a_future_token_does_not_change_earlier_logits(cfg: ModelConfig, data: DataSpec) -> None:
    model = _build(cfg, data).eval()
    inputs, _ = _batch(data, size=2)
    changed = inputs.clone()
    changed[:, 10] = (changed[:, 10] + 1) % data.vocab_size
    with torch.no_grad():
        before, after = model(inputs), model(changed)
    torch.testing.assert_close(before[:, :10], after[:, :10])
    assert not torch.allclose(before[:, 10:], after[:, 10:])


# --------------------------------------------------------------------------------------------- gpt


@pytest.mark.parametrize(
    ("cfg", "vocab_size", "seq_len", "low", "high"),
    [
        # nanoGPT's GPT-2 124M with tied weights and position embeddings: exactly 124,439,808.
        (GPTConfig(n_layer=12, n_head=12, n_embd=768, bias=True), 50257, 1024, 124_439_808, 124_439_808),
        (GPTConfig(n_layer=24, n_head=16, n_embd=1024, bias=True), 50257, 1024, 350e6, 360e6),
        (GPTConfig(n_layer=24, n_head=16, n_embd=2048, vocab_size=50304, block_size=2048), 50257, 2048, 1.25e9, 1.4e9),
    ],
    ids=["124M", "350M", "1.3B"],
)
def test_gpt_sizes_counted_on_meta(cfg: GPTConfig, vocab_size: int, seq_len: int, low: float, high: float) -> None:
    data = DataSpec(kind=SampleKind.tokens, vocab_size=vocab_size, seq_len=seq_len)
    with torch.device("meta"):
        model = build_model(cfg, data)
    assert low <= describe_model(cfg, data, model).num_params <= high


def test_gpt_head_is_tied_to_the_token_embedding() -> None:
    cfg = GPTConfig(n_layer=1, n_head=2, n_embd=32)
    model = _build(cfg, TOKENS)
    assert model.lm_head.weight is model.tok_emb.weight
    with torch.device("meta"):
        model = build_model(cfg, TOKENS)
    model.to_empty(device="cpu")  # gives the head and the embedding separate tensors ...
    model.init_weights()  # ... and this ties them again
    assert model.lm_head.weight is model.tok_emb.weight


def test_gpt_flops_per_token_follow_the_formula() -> None:
    n_layer, n_head, n_embd, vocab_size, seq_len = 2, 2, 32, 64, 16
    cfg = GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd)
    info = describe_model(cfg, TOKENS, _build(cfg, TOKENS))
    # Per block, no biases: two LayerNorm weights, qkv, the attention projection, the 4x MLP.
    per_block = 2 * n_embd + n_embd * 3 * n_embd + n_embd * n_embd + 2 * n_embd * 4 * n_embd
    non_embedding = n_layer * per_block + n_embd  # + the final LayerNorm
    assert info.num_non_embedding_params == non_embedding
    assert info.num_params == non_embedding + vocab_size * n_embd + seq_len * n_embd
    head = vocab_size * n_embd  # tied: the embedding does a matmul as the head
    head_dim = n_embd // n_head
    assert info.flops_per_token == 6 * (non_embedding + head) + 12 * n_layer * n_head * head_dim * seq_len
    assert info.tokens_per_sample == seq_len


def test_gpt2_124m_flops_match_nanogpt() -> None:
    cfg = GPTConfig(n_layer=12, n_head=12, n_embd=768, bias=True)
    data = DataSpec(kind=SampleKind.tokens, vocab_size=50257, seq_len=1024)
    with torch.device("meta"):
        model = build_model(cfg, data)
    # nanoGPT's estimate_mfu: N = parameters less position embeddings, 6N + 12 L H Q T.
    nanogpt_params = 124_439_808 - 1024 * 768
    assert describe_model(cfg, data, model).flops_per_token == 6 * nanogpt_params + 12 * 12 * 12 * 64 * 1024


def test_gpt_block_size_shorter_than_the_data_is_an_error() -> None:
    with pytest.raises(UserError, match=r"model\.block_size=8 .*data\.seq_len=16"):
        build_model(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=8), TOKENS)


def test_gpt_vocabulary_smaller_than_the_data_is_an_error() -> None:
    with pytest.raises(UserError, match=r"model\.vocab_size=32"):
        build_model(GPTConfig(n_layer=1, n_head=2, n_embd=32, vocab_size=32), TOKENS)


# ------------------------------------------------------------------------------------ image models


@pytest.mark.parametrize(
    ("cfg", "data"), [(MLPConfig(hidden_sizes=[32]), VECTORS), (CNNConfig(widths=[8]), DIGITS)], ids=["mlp", "cnn"]
)
def test_image_models_have_no_embeddings_and_count_per_sample(cfg: ModelConfig, data: DataSpec) -> None:
    info = describe_model(cfg, data, _build(cfg, data))
    assert info.num_non_embedding_params == info.num_params
    assert info.tokens_per_sample == 1


def test_mlp_flops_are_six_per_parameter() -> None:
    cfg = MLPConfig(hidden_sizes=[32])
    info = describe_model(cfg, VECTORS, _build(cfg, VECTORS))
    assert info.num_params == 20 * 32 + 32 + 32 * 3 + 3
    assert info.flops_per_token == 6 * info.num_params


def _conv_flops(c_in: int, c_out: int, *, kernel: int, pixels: int) -> int:
    return 2 * c_in * c_out * kernel * kernel * pixels


def test_cnn_flops_count_every_convolution_at_its_resolution() -> None:
    cfg = CNNConfig(widths=[4, 8])
    forward = (
        _conv_flops(1, 4, kernel=3, pixels=64)  # stem at 8x8
        + 2 * _conv_flops(4, 4, kernel=3, pixels=64)  # stage 1 block at 8x8
        + _conv_flops(4, 8, kernel=3, pixels=16)  # stage 2 block at 4x4: conv1 (stride 2)
        + _conv_flops(8, 8, kernel=3, pixels=16)  # conv2
        + _conv_flops(4, 8, kernel=1, pixels=16)  # the 1x1 shortcut
        + 2 * 8 * 10  # classifier
    )
    assert describe_model(cfg, DIGITS, _build(cfg, DIGITS)).flops_per_token == 3 * forward


def test_cnn_on_feature_vectors_is_an_error() -> None:
    with pytest.raises(UserError, match=r"model=cnn .*\(20,\).*model=mlp"):
        build_model(CNNConfig(), VECTORS)


# ------------------------------------------------------------------------------------------ errors


def test_unknown_model_name_is_an_error_naming_the_choices() -> None:
    with pytest.raises(UserError, match=r"model\.name='foo' is not a model; choose one of: cnn, gpt, hf, lstm, mlp"):
        build_model(ModelConfig(name="foo"), TOKENS)


@pytest.mark.parametrize(("cfg", "data"), [(GPTConfig(), DIGITS), (MLPConfig(), TOKENS)], ids=["gpt", "mlp"])
def test_model_on_the_wrong_kind_of_data_is_an_error(cfg: ModelConfig, data: DataSpec) -> None:
    with pytest.raises(UserError, match=rf"model={cfg.name} trains on"):
        build_model(cfg, data)


def test_data_spec_must_describe_its_samples() -> None:
    with pytest.raises(ValueError, match="seq_len"):
        DataSpec(kind=SampleKind.tokens, vocab_size=64)
    with pytest.raises(ValueError, match="input_shape"):
        DataSpec(kind=SampleKind.images, num_classes=10)
    assert TOKENS.tokens_per_sample == 16 and DIGITS.tokens_per_sample == 1


# ---------------------------------------------------------------------------------------------- hf


def test_hf_without_transformers_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)  # makes `import transformers` fail
    with pytest.raises(UserError, match=r"pip install 'orchestrator\[hf\]'"):
        build_model(HFConfig(config=TINY_LLAMA), TOKENS)


@needs_transformers
def test_hf_builds_without_the_network_and_takes_its_sizes_from_the_data(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("model=hf tried to open a connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    for settings in (TINY_LLAMA, TINY_GPT2):
        config = build_model(HFConfig(config=settings), TOKENS).model.config
        assert (config.vocab_size, config.max_position_embeddings) == (TOKENS.vocab_size, TOKENS.seq_len)


@needs_transformers
def test_hf_gpt2_head_stays_tied_through_meta_materialization() -> None:
    cfg = HFConfig(config=TINY_GPT2)
    with torch.device("meta"):
        model = build_model(cfg, TOKENS)
    model.to_empty(device="cpu")
    model.init_weights()
    assert model.model.lm_head.weight is model.model.transformer.wte.weight


@needs_transformers
def test_hf_flops_per_token_follow_the_formula() -> None:
    cfg = HFConfig(config=TINY_LLAMA)
    info = describe_model(cfg, TOKENS, _build(cfg, TOKENS))
    embedding = TOKENS.vocab_size * 64  # llama's head is untied: it is already among the non-embedding params
    assert info.num_non_embedding_params == info.num_params - embedding
    assert info.flops_per_token == 6 * info.num_non_embedding_params + 12 * 2 * 4 * 16 * TOKENS.seq_len


@needs_transformers
def test_hf_llama_70b_counted_on_meta() -> None:
    cfg = HFConfig(
        config=dict(
            model_type="llama",
            hidden_size=8192,
            num_hidden_layers=80,
            num_attention_heads=64,
            num_key_value_heads=8,
            intermediate_size=28672,
        )
    )
    data = DataSpec(kind=SampleKind.tokens, vocab_size=128256, seq_len=8192)
    with torch.device("meta"):
        model = build_model(cfg, data)
    assert describe_model(cfg, data, model).num_params == 70_553_706_496  # Llama 3 70B
    assert len(model_blocks(cfg, model)) == 80


@needs_transformers
@pytest.mark.parametrize(
    ("settings", "match"),
    [
        (dict(model_type="not-a-model"), r"model\.config\.model_type='not-a-model'"),
        (dict(model_type="vit"), r"model\.config\.model_type='vit' has no causal language model"),
        (dict(TINY_LLAMA, max_position_embeddings=8), r"model\.config\.max_position_embeddings=8 .*data\.seq_len=16"),
        (dict(TINY_LLAMA, vocab_size=32), r"model\.config\.vocab_size=32"),
    ],
    ids=["unknown-type", "not-causal", "positions-too-few", "vocab-too-small"],
)
def test_hf_config_that_does_not_fit_is_an_error(settings: dict, match: str) -> None:
    with pytest.raises(UserError, match=match):
        build_model(HFConfig(config=settings), TOKENS)
