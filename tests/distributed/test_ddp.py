"""DDP on 2 gloo ranks: the same update as one process on the whole batch, exact checkpoints, memory."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from orchestrator.checkpoints import manifest
from orchestrator.config.compose import compose, to_config
from orchestrator.config.schema import Config, Resume
from orchestrator.distributed import DistContext
from orchestrator.models import build_model, model_blocks
from orchestrator.models.recipe import ModelRecipe, state_shapes
from orchestrator.strategies import build_strategy
from orchestrator.train.checkpoint import Checkpointer
from orchestrator.train.optim import build_optimizer
from tests.distributed.ranks import run_ranks

ONE_PROCESS = DistContext(rank=0, world_size=1, local_rank=0, local_world_size=1, device=torch.device("cpu"))


def job(*overrides: str) -> Config:
    """A tiny GPT job on 64-token vocabulary data, as the CLI would compose it."""
    return to_config(
        compose(
            [
                "model=gpt_tiny",
                "model.n_embd=32",
                "model.vocab_size=64",
                "data=synthetic_tokens",
                "data.vocab_size=64",
                "data.seq_len=16",
                "trainer.global_batch_size=8",
                "trainer.micro_batch_size=4",
                "scheduler.warmup_steps=0",
                *overrides,
            ]
        )
    )


def global_batch(size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 64, (size, 17), generator=generator)
    return tokens[:, :-1], tokens[:, 1:]


def setup(config: Config, dist: DistContext):
    from orchestrator.config.schema import SampleKind
    from orchestrator.data.spec import DataSpec

    spec = DataSpec(kind=SampleKind.tokens, vocab_size=64, seq_len=16)
    recipe = ModelRecipe(build=partial(build_model, config.model, spec), blocks=partial(model_blocks, config.model))
    torch.manual_seed(0)
    strategy = build_strategy(config, dist=dist)
    strategy.setup(recipe, build_optimizer=partial(build_optimizer, config.optim))
    return strategy


def train_steps(dist: DistContext, config: Config, *, steps: int = 3) -> dict[str, torch.Tensor]:
    """``steps`` optimizer steps on the same global batch of 8, split over ranks and micro-batches."""
    strategy = setup(config, dist)
    accum = config.grad_accum_steps
    inputs, targets = global_batch()
    per_rank = inputs.shape[0] // dist.world_size
    mine = slice(dist.rank * per_rank, (dist.rank + 1) * per_rank)
    micro = list(zip(inputs[mine].chunk(accum), targets[mine].chunk(accum)))
    for _ in range(steps):
        for i, (x, y) in enumerate(micro):
            with strategy.accumulate(sync=i == accum - 1):
                strategy.backward(F.cross_entropy(strategy.model(x).flatten(0, 1), y.flatten()))
        assert strategy.step(lr=0.5, max_norm=1.0, guard=lambda norm: True).applied
    return {k: v.detach().clone() for k, v in strategy.module.state_dict().items()}


# SGD keeps the update proportional to the gradient, so float rounding differences stay at rounding size
# (Adam divides by sqrt(v) and blows a 1e-9 difference in a near-zero gradient up to 1e-5).
SGD = ("optim=sgd_momentum",)


def _ddp_run(dist: DistContext, micro_batch_size: int) -> dict[str, torch.Tensor]:
    return train_steps(dist, job(*SGD, "strategy=ddp", f"trainer.micro_batch_size={micro_batch_size}"))


@pytest.mark.parametrize("micro_batch_size", [4, 2])  # accumulation 1 and 2 at 2 ranks
def test_ddp_on_two_ranks_matches_one_process_on_the_whole_batch(micro_batch_size: int) -> None:
    single = train_steps(
        ONE_PROCESS, job(*SGD, "strategy=none", "launcher.num_workers=1", "trainer.micro_batch_size=8")
    )
    ranks = run_ranks(_ddp_run, micro_batch_size)
    for name, value in single.items():
        torch.testing.assert_close(ranks[0][name], value, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ranks[1][name], ranks[0][name], rtol=0, atol=0)


def _checkpoint_round_trip(dist: DistContext, root: str) -> dict:
    config = job("strategy=ddp")
    strategy = setup(config, dist)
    checkpointer = Checkpointer(
        Path(root),
        dist=dist,
        strategy=strategy,
        strategy_name="ddp",
        keep=2,
        model_shapes=state_shapes(strategy.module),
    )
    inputs, targets = global_batch(4)

    def one_step() -> None:
        strategy.backward(F.cross_entropy(strategy.model(inputs).flatten(0, 1), targets.flatten()))
        strategy.step(lr=1e-2, max_norm=1.0, guard=lambda norm: True)

    for step in range(1, 4):
        one_step()
        checkpointer.save(step, {"step": step})
    saved_weights = {k: v.clone() for k, v in strategy.module.state_dict().items()}
    saved_rng = torch.get_rng_state()
    saved_optimizer = strategy.optimizer.state_dict()["state"][0]["exp_avg"].clone()
    one_step()  # move everything away, then restore the newest checkpoint
    torch.rand(10)
    state = checkpointer.restore(checkpointer.find_resume(Resume("auto"), restarted=False))
    return {
        "state": state,
        "weights_equal": all(torch.equal(saved_weights[k], v) for k, v in strategy.module.state_dict().items()),
        "rng_equal": torch.equal(torch.get_rng_state(), saved_rng),
        "optimizer_equal": torch.equal(strategy.optimizer.state_dict()["state"][0]["exp_avg"], saved_optimizer),
        "memory": strategy.memory(),
        "num_params": sum(p.numel() for p in strategy.module.parameters()),
    }


def test_checkpoint_restores_weights_optimizer_and_rng_exactly(tmp_path: Path) -> None:
    results = run_ranks(_checkpoint_round_trip, str(tmp_path))
    for result in results:
        assert result["state"] == {"step": 3}
        assert result["weights_equal"] and result["optimizer_equal"] and result["rng_equal"]
    # keep=2: the two newest remain, each complete; `latest` names the newest.
    assert [p.name for p in manifest.checkpoint_dirs(tmp_path)] == ["step-00000003", "step-00000002"]
    assert (tmp_path / "latest").read_text().strip() == "step-00000003"
    saved = manifest.verify(tmp_path / "step-00000003")
    assert saved.world_size == 2 and saved.strategy == "ddp"
    assert {"model.pt", "optimizer.pt", "trainer_state.json", "rng/rank-00000.pt", "rng/rank-00001.pt"} == set(
        saved.files
    )
    assert saved.model_shapes["tok_emb.weight"] == [64, 32]

    # fp32 AdamW under DDP holds 16 bytes per parameter on every rank (the ZeRO paper's memory model):
    # 4 for the weights, 4 for the gradients, 8 for the two moments.
    memory, psi = results[1]["memory"], results[1]["num_params"]
    assert memory.param_bytes == 4 * psi and memory.grad_bytes >= 4 * psi
    assert 8 * psi <= memory.optimizer_bytes <= 8 * psi * 1.01  # + the step counters
    assert abs(memory.model_state_bytes - 16 * psi) / (16 * psi) < 0.05
