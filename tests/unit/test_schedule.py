"""Learning-rate schedules and optimizer construction."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from orchestrator.config.schema import (
    OptimConfig,
    OptimName,
    ScheduleName,
    SchedulerConfig,
)
from orchestrator.train.optim import build_optimizer, lr_at


def lrs(cfg: SchedulerConfig, steps: int = 100, base_lr: float = 1.0) -> list[float]:
    return [lr_at(cfg, base_lr=base_lr, step=s, max_steps=steps) for s in range(steps)]


def test_warmup_is_linear_and_never_zero() -> None:
    values = lrs(SchedulerConfig(name=ScheduleName.constant, warmup_steps=10))
    assert values[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert values[10:] == [1.0] * 90


def test_cosine_decays_from_peak_to_the_floor_at_the_last_step() -> None:
    values = lrs(SchedulerConfig(name=ScheduleName.cosine, warmup_steps=10, min_lr_ratio=0.1))
    assert values[10] == pytest.approx(1.0)
    assert values[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(values[10:], values[11:]))


def test_exponential_multiplies_by_gamma_per_step() -> None:
    values = lrs(SchedulerConfig(name=ScheduleName.exponential, gamma=0.9))
    assert values[5] == pytest.approx(0.9**5)


def test_onecycle_rises_then_falls_like_torch_onecycle() -> None:
    cfg = SchedulerConfig(name=ScheduleName.onecycle, pct_start=0.3, div_factor=25.0, final_div_factor=1e4)
    values = lrs(cfg)
    param = nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=1.0)
    reference = torch.optim.lr_scheduler.OneCycleLR(
        optimizer,
        max_lr=1.0,
        total_steps=100,
        pct_start=0.3,
        div_factor=25.0,
        final_div_factor=1e4,
        cycle_momentum=False,
        three_phase=False,
    )
    expected = []
    for _ in range(100):
        expected.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        reference.step()
    assert values[0] == pytest.approx(1 / 25)
    assert max(values) == pytest.approx(1.0)
    assert values == pytest.approx(expected, rel=1e-9)


def test_weight_decay_skips_biases_and_norms_and_frozen_params() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    model[2].requires_grad_(False)
    optimizer = build_optimizer(OptimConfig(name=OptimName.adamw, weight_decay=0.1), model)
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.1 and [p.shape for p in decay["params"]] == [torch.Size([4, 4])]
    assert no_decay["weight_decay"] == 0.0 and len(no_decay["params"]) == 3
    assert isinstance(optimizer, torch.optim.AdamW)


@pytest.mark.parametrize(("name", "cls"), [(OptimName.sgd, torch.optim.SGD), (OptimName.adam, torch.optim.Adam)])
def test_optimizers_by_name(name: OptimName, cls: type) -> None:
    model = nn.Linear(3, 3)
    assert isinstance(build_optimizer(OptimConfig(name=name), model), cls)
    sgd = build_optimizer(OptimConfig(name=OptimName.sgd, momentum=0.9, nesterov=True), model)
    assert sgd.param_groups[0]["momentum"] == 0.9 and sgd.param_groups[0]["nesterov"]


def test_lr_is_finite_everywhere() -> None:
    for name in ScheduleName:
        warmup = 0 if name is ScheduleName.onecycle else 5
        assert all(math.isfinite(v) and v > 0 for v in lrs(SchedulerConfig(name=name, warmup_steps=warmup), steps=7))
