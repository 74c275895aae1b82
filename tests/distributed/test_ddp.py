"""DDP on 2 gloo ranks: the same update as one process on the whole batch, exact checkpoints, memory."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from orchestrator.config.schema import (
    DDPConfig,
    GPTConfig,
    OptimConfig,
    OptimName,
    Precision,
    SampleKind,
    SingleStrategyConfig,
)
from orchestrator.data.spec import DataSpec
from orchestrator.distributed import DistContext
from orchestrator.models import build_model
from orchestrator.strategies import build_strategy
from orchestrator.train import manifest
from orchestrator.train.checkpoint import Checkpointer
from orchestrator.train.optim import build_optimizer
from tests.distributed.ranks import run_ranks

SPEC = DataSpec(kind=SampleKind.tokens, vocab_size=64, seq_len=16)
MODEL = GPTConfig(n_layer=2, n_head=2, n_embd=32)
OPTIM = OptimConfig(name=OptimName.adamw, lr=1e-2, weight_decay=0.1)
# SGD keeps the update proportional to the gradient, so float rounding differences stay at rounding size
# (Adam divides by sqrt(v) and blows a 1e-9 difference in a near-zero gradient up to 1e-5).
SGD = OptimConfig(name=OptimName.sgd, lr=0.5, momentum=0.9)


def global_batch(size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, SPEC.vocab_size, (size, SPEC.seq_len + 1), generator=generator)
    return tokens[:, :-1], tokens[:, 1:]


def train_steps(dist: DistContext, strategy_cfg, *, accum_steps: int, steps: int = 3) -> dict[str, torch.Tensor]:
    """``steps`` optimizer steps on the same global batch of 8, split over ranks and micro-batches."""
    torch.manual_seed(0)
    model = build_model(MODEL, SPEC)
    strategy = build_strategy(strategy_cfg, dist=dist, precision=Precision.fp32, accum_steps=accum_steps)
    strategy.setup(model, build_optimizer=partial(build_optimizer, SGD))
    inputs, targets = global_batch()
    per_rank = inputs.shape[0] // dist.world_size
    mine = slice(dist.rank * per_rank, (dist.rank + 1) * per_rank)
    micro_inputs = inputs[mine].chunk(accum_steps)
    micro_targets = targets[mine].chunk(accum_steps)
    for _ in range(steps):
        for i, (x, y) in enumerate(zip(micro_inputs, micro_targets)):
            with strategy.accumulate(sync=i == accum_steps - 1):
                logits = strategy.model(x)
                strategy.backward(F.cross_entropy(logits.flatten(0, 1), y.flatten()))
        strategy.clip_grad_norm(1.0)
        strategy.step()
    return {k: v.detach().clone() for k, v in strategy.module.state_dict().items()}


def _ddp_run(dist: DistContext, accum_steps: int) -> dict[str, torch.Tensor]:
    return train_steps(dist, DDPConfig(), accum_steps=accum_steps)


def test_ddp_on_two_ranks_matches_one_process_on_the_whole_batch() -> None:
    single = train_steps(DistContext(rank=0, world_size=1, local_rank=0, local_world_size=1,
                                     device=torch.device("cpu")), SingleStrategyConfig(), accum_steps=1)
    for accum_steps in (1, 2):
        ranks = run_ranks(_ddp_run, accum_steps)
        for name, value in single.items():
            torch.testing.assert_close(ranks[0][name], value, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(ranks[1][name], ranks[0][name], rtol=0, atol=0)


def _checkpoint_round_trip(dist: DistContext, root: str) -> dict:
    torch.manual_seed(0)
    model = build_model(MODEL, SPEC)
    strategy = build_strategy(DDPConfig(), dist=dist, precision=Precision.fp32, accum_steps=1)
    strategy.setup(model, build_optimizer=partial(build_optimizer, OPTIM))
    checkpointer = Checkpointer(Path(root), dist=dist, strategy=strategy, strategy_name="ddp", keep=2)
    inputs, targets = global_batch(4)
    for step in range(1, 4):
        strategy.backward(F.cross_entropy(strategy.model(inputs).flatten(0, 1), targets.flatten()))
        strategy.step()
        checkpointer.save(step, {"step": step})
    saved_weights = {k: v.clone() for k, v in strategy.module.state_dict().items()}
    saved_rng = torch.get_rng_state()
    saved_optimizer = strategy.optimizer.state_dict()["state"][0]["exp_avg"].clone()
    # Move everything away, then restore the newest checkpoint.
    strategy.backward(F.cross_entropy(strategy.model(inputs).flatten(0, 1), targets.flatten()))
    strategy.step()
    torch.rand(10)
    state = checkpointer.restore(checkpointer.find_resume("auto"))
    weights_equal = all(torch.equal(saved_weights[k], v) for k, v in strategy.module.state_dict().items())
    rng_equal = torch.equal(torch.get_rng_state(), saved_rng)
    optimizer_equal = torch.equal(strategy.optimizer.state_dict()["state"][0]["exp_avg"], saved_optimizer)
    # Model states peak between backward and step: parameters, gradients and optimizer state all live.
    strategy.backward(F.cross_entropy(strategy.model(inputs).flatten(0, 1), targets.flatten()))
    return {
        "state": state,
        "weights_equal": weights_equal,
        "rng_equal": rng_equal,
        "optimizer_equal": optimizer_equal,
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
    assert saved.world_size == 2 and {"model.pt", "optimizer.pt", "trainer_state.json",
                                      "rng/rank-00000.pt", "rng/rank-00001.pt"} <= set(saved.files)


def test_ddp_memory_report_matches_16_bytes_per_parameter_for_fp32_adam(tmp_path: Path) -> None:
    result = run_ranks(_checkpoint_round_trip, str(tmp_path))[1]
    psi = result["num_params"]
    memory = result["memory"]
    assert memory.param_bytes == 4 * psi
    assert memory.optimizer_bytes >= 8 * psi and memory.optimizer_bytes <= 8 * psi * 1.01  # + step counters
    assert abs(memory.model_state_bytes - 16 * psi) / (16 * psi) < 0.05
