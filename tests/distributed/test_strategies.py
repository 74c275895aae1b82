"""Every strategy on 2 gloo ranks trains GPT and a Llama (transformers) to the same losses as DDP,
with activation checkpointing on or off, through the one Strategy protocol the loop uses."""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from orchestrator.config.compose import compose, to_config
from orchestrator.config.schema import Resume
from orchestrator.data import load_data, prepare_data
from orchestrator.distributed import DistContext
from orchestrator.models import build_model, model_blocks
from orchestrator.models.recipe import ModelRecipe
from orchestrator.strategies import build_strategy
from orchestrator.train.optim import build_optimizer
from tests.distributed.ranks import run_ranks

STRATEGIES = ["ddp", "fsdp2", "zero0", "zero1", "zero2", "zero3"]
MODELS = {
    "gpt": ["model=gpt_tiny", "model.n_embd=32"],
    "llama": [
        "model=llama_tiny",
        "model.config.hidden_size=32",
        "model.config.intermediate_size=64",
        "model.config.num_attention_heads=2",
        "model.config.num_key_value_heads=1",
    ],
}


def _losses(dist: DistContext, model: str, activation_checkpointing: bool) -> dict[str, list[float]]:
    import os

    os.environ["DS_ACCELERATOR"] = "cpu"
    out = {}
    for strategy_name in STRATEGIES:
        config = to_config(
            compose(
                [
                    *MODELS[model],
                    "data=synthetic_tokens",
                    "data.vocab_size=128",
                    "data.seq_len=16",
                    f"strategy={strategy_name}",
                    f"strategy.activation_checkpointing={str(activation_checkpointing).lower()}",
                    "trainer.global_batch_size=8",
                    "trainer.micro_batch_size=2",
                    "scheduler.warmup_steps=0",
                ]
            )
        )
        data = load_data(config.data)
        recipe = ModelRecipe(
            build=partial(build_model, config.model, data.spec), blocks=partial(model_blocks, config.model)
        )
        torch.manual_seed(0)
        strategy = build_strategy(config, dist=dist)
        strategy.setup(recipe, build_optimizer=partial(build_optimizer, config.optim))
        losses = []
        for _ in range(3):
            total = 0.0
            for micro in range(config.grad_accum_steps):  # 2 micro-batches per rank
                index = (dist.rank * 2 + micro) * 2  # the same global batch every step: the loss must fall
                inputs, targets = data.train.get_batch(torch.arange(index, index + 2).numpy())
                with strategy.accumulate(sync=micro == config.grad_accum_steps - 1):
                    with strategy.autocast():
                        loss = F.cross_entropy(strategy.model(inputs).flatten(0, 1).float(), targets.flatten())
                    strategy.backward(loss)
                total += loss.item()
            outcome = strategy.step(lr=1e-2, max_norm=1.0, guard=math.isfinite)
            assert outcome.applied
            losses.append(total)
        out[strategy_name] = losses
    return out


@pytest.mark.parametrize(("model", "activation_checkpointing"), [("gpt", False), ("llama", True)])
def test_every_strategy_trains_to_the_same_losses(model: str, activation_checkpointing: bool) -> None:
    prepare_data(to_config(compose(["data=synthetic_tokens", "data.vocab_size=128", "data.seq_len=16"])).data)
    per_rank = run_ranks(_losses, model, activation_checkpointing)
    for losses in per_rank:
        reference = losses["ddp"]
        assert reference[-1] < reference[0]  # it learns
        for name in STRATEGIES:
            assert losses[name] == pytest.approx(reference, rel=1e-5), name


# ------------------------------------------------------------------------------------------- resume

RESUMABLE = ["ddp", "fsdp2", "zero1", "zero2", "zero3"]


def _tiny(strategy_name: str, world_size: int, *extra: str):
    return to_config(
        compose(
            [
                *MODELS["gpt"],
                "model.vocab_size=128",
                "data=synthetic_tokens",
                "data.vocab_size=128",
                "data.seq_len=16",
                f"strategy={strategy_name}",
                "optim=sgd_momentum",
                f"launcher.num_workers={world_size}",
                "trainer.global_batch_size=8",
                "trainer.micro_batch_size=4",
                "scheduler.warmup_steps=0",
                *extra,
            ]
        )
    )


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.randint(0, 128, (8, 17), generator=torch.Generator().manual_seed(0))
    return tokens[:, :-1], tokens[:, 1:]


def _train(
    dist: DistContext,
    strategy_name: str,
    root: str,
    *,
    steps: int,
    save_at: int | None,
    restore: bool,
    seed: int = 0,
    extra: tuple[str, ...] = (),
) -> list[float]:
    """``steps`` steps on one global batch split over the ranks; the loss on the whole batch after each."""
    import os

    from orchestrator.config.schema import SampleKind
    from orchestrator.data.spec import DataSpec
    from orchestrator.models.recipe import state_shapes
    from orchestrator.train.checkpoint import Checkpointer

    os.environ["DS_ACCELERATOR"] = "cpu"
    config = _tiny(strategy_name, dist.world_size, *extra)
    spec = DataSpec(kind=SampleKind.tokens, vocab_size=128, seq_len=16)
    recipe = ModelRecipe(build=partial(build_model, config.model, spec), blocks=partial(model_blocks, config.model))
    torch.manual_seed(seed)
    strategy = build_strategy(config, dist=dist)
    strategy.setup(recipe, build_optimizer=partial(build_optimizer, config.optim))
    with torch.device("meta"):
        shapes = state_shapes(build_model(config.model, spec))
    checkpointer = Checkpointer(
        Path(root), dist=dist, strategy=strategy, strategy_name=strategy_name, keep=2, model_shapes=shapes
    )
    if "strategy.compile=true" in extra:  # every block compiled, inside its checkpoint wrapper
        compiled = [m for m in strategy.model.modules() if getattr(m, "_compiled_call_impl", None) is not None]
        assert len(compiled) == config.model.n_layer, strategy_name
        assert all("Block" in type(m._checkpoint_wrapped_module).__name__ for m in compiled), strategy_name
    if restore:
        checkpointer.restore(checkpointer.find_resume(Resume("auto"), restarted=False))
    inputs, targets = _batch()
    per_rank = inputs.shape[0] // dist.world_size
    mine = slice(dist.rank * per_rank, (dist.rank + 1) * per_rank)
    micro = list(zip(inputs[mine].chunk(config.grad_accum_steps), targets[mine].chunk(config.grad_accum_steps)))
    losses = []
    for step in range(1, steps + 1):
        for i, (x, y) in enumerate(micro):
            with strategy.accumulate(sync=i == len(micro) - 1):
                strategy.backward(F.cross_entropy(strategy.model(x).flatten(0, 1).float(), y.flatten()))
        assert strategy.step(lr=0.1, max_norm=1.0, guard=math.isfinite).applied
        if step == save_at:
            checkpointer.save(step, {"step": step})
        with torch.no_grad():
            losses.append(F.cross_entropy(strategy.model(inputs).flatten(0, 1).float(), targets.flatten()).item())
    return losses


def _train_each(dist: DistContext, root: str, **kwargs) -> dict[str, list[float]]:
    return {name: _train(dist, name, f"{root}/{name}", **kwargs) for name in RESUMABLE}


def test_a_restored_checkpoint_continues_bit_for_bit(tmp_path: Path) -> None:
    """Save after step 2 of 4; a new model (another seed) restored from it makes steps 3-4 exactly."""
    through = run_ranks(_train_each, str(tmp_path), steps=4, save_at=2, restore=False)[0]
    resumed = run_ranks(_train_each, str(tmp_path), steps=2, save_at=None, restore=True, seed=1)[0]
    for name in RESUMABLE:
        assert resumed[name] == through[name][2:], name


@pytest.mark.parametrize(("saved_by", "restored_by"), [(2, 1), (1, 2)])
def test_fsdp2_checkpoints_load_at_another_world_size(saved_by: int, restored_by: int, tmp_path: Path) -> None:
    through = run_ranks(_train, "fsdp2", str(tmp_path), steps=4, save_at=2, restore=False, world_size=saved_by)[0]
    resumed = run_ranks(
        _train, "fsdp2", str(tmp_path), steps=2, save_at=None, restore=True, seed=1, world_size=restored_by
    )[0]
    # The same update, reduced over another number of ranks: equal up to float rounding.
    assert resumed == pytest.approx(through[2:], rel=1e-6)


ONE_BLOCK = ("model.n_layer=1",)  # every block compiles to the same graph: one shows it
COMPILED = (*ONE_BLOCK, "strategy.compile=true", "strategy.activation_checkpointing=true")


def _eager_and_compiled(dist: DistContext, root: str) -> dict[str, tuple[list[float], list[float]]]:
    return {
        name: (
            _train(dist, name, f"{root}/{name}-eager", steps=3, save_at=None, restore=False, extra=ONE_BLOCK),
            _train(dist, name, f"{root}/{name}-compiled", steps=3, save_at=None, restore=False, extra=COMPILED),
        )
        for name in ("ddp", "fsdp2", "zero3")
    }


@pytest.mark.slow
def test_activation_checkpointing_then_compile_per_block_trains_the_same_model(tmp_path: Path) -> None:
    """Each block checkpointed, then compiled (inductor, CPU), then wrapped or sharded: the losses
    match eager execution's up to the compiled kernels' float reordering."""
    for name, (eager, compiled) in run_ranks(_eager_and_compiled, str(tmp_path))[0].items():
        assert compiled == pytest.approx(eager, rel=1e-5), name


FSDP2_OPTIONS = {
    "offload": ("strategy.offload_params=cpu",),
    "keep gathered": ("strategy.reshard_after_forward=false",),
    "meta init": ("strategy.init_device=meta",),
}


def _fsdp2_options(dist: DistContext, root: str) -> dict[str, list[float]]:
    runs = {"ddp": _train(dist, "ddp", f"{root}/ddp", steps=3, save_at=None, restore=False)}
    for label, extra in FSDP2_OPTIONS.items():
        runs[label] = _train(dist, "fsdp2", f"{root}/{label}", steps=3, save_at=None, restore=False, extra=extra)
    return runs


def test_fsdp2_options_train_the_same_model_as_ddp(tmp_path: Path) -> None:
    """CPU offload (CPUOffloadPolicy) and keeping parameters gathered between forward and backward
    change where tensors live, not the arithmetic. Meta-device init draws each shard's weights
    itself, so it trains a differently initialized model: it must learn, not match."""
    runs = run_ranks(_fsdp2_options, str(tmp_path))[0]
    for label in ("offload", "keep gathered"):
        assert runs[label] == pytest.approx(runs["ddp"], rel=1e-5), label
    assert runs["meta init"][-1] < runs["meta init"][0]
