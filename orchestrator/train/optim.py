"""Optimizers by name, and learning-rate schedules as pure functions of the step.

A schedule that is a function of the step alone needs no state in a checkpoint, so a resumed run
uses exactly the learning rates the uninterrupted run would have.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from orchestrator.config.schema import (
    OptimConfig,
    OptimName,
    ScheduleName,
    SchedulerConfig,
)


def build_optimizer(cfg: OptimConfig, model: nn.Module) -> torch.optim.Optimizer:
    """The optimizer over ``model``'s trainable parameters.

    Weight decay applies to matrices only (linear and embedding weights), never to biases and norm
    gains, which is what GPT-style training does and what makes AdamW's decay meaningful.

    Args:
        cfg: the optim config node.
        model: the (unwrapped or sharded) module whose parameters to optimize.
    """
    trainable = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in trainable if _logical_dim(p) >= 2]
    no_decay = [p for p in trainable if _logical_dim(p) < 2]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    on_gpu = any(p.is_cuda for p in trainable)
    if cfg.name is OptimName.sgd:
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    optimizer_class = torch.optim.AdamW if cfg.name is OptimName.adamw else torch.optim.Adam
    # The fused CUDA kernel is the fastest Adam on GPUs; on CPU the default (foreach) is.
    return optimizer_class(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=on_gpu or None)


def _logical_dim(param: torch.Tensor) -> int:
    # A ZeRO-3 partitioned parameter is a flat 1-D shard; DeepSpeed keeps its real shape in ds_shape.
    return len(getattr(param, "ds_shape", param.shape))


def lr_at(cfg: SchedulerConfig, *, base_lr: float, step: int, max_steps: int) -> float:
    """The learning rate for optimizer step ``step`` (0-based) of ``max_steps``.

    Args:
        cfg: the scheduler config node.
        base_lr: the peak learning rate (``optim.lr``).
        step: the step about to be taken.
        max_steps: the run's length.
    """
    if cfg.name is ScheduleName.onecycle:
        return _one_cycle(cfg, base_lr=base_lr, step=step, max_steps=max_steps)
    if step < cfg.warmup_steps:
        return base_lr * (step + 1) / cfg.warmup_steps
    after_warmup = step - cfg.warmup_steps
    if cfg.name is ScheduleName.constant:
        return base_lr
    if cfg.name is ScheduleName.exponential:
        return base_lr * cfg.gamma**after_warmup
    progress = min(1.0, after_warmup / max(1, max_steps - cfg.warmup_steps - 1))
    min_lr = base_lr * cfg.min_lr_ratio
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (base_lr - min_lr)


def _one_cycle(cfg: SchedulerConfig, *, base_lr: float, step: int, max_steps: int) -> float:
    # The phase boundaries of torch's OneCycleLR (two-phase), so the curves agree step for step.
    initial_lr = base_lr / cfg.div_factor
    final_lr = initial_lr / cfg.final_div_factor
    peak_step = max(1.0, cfg.pct_start * max_steps - 1)
    if step <= peak_step:
        return _cosine_between(initial_lr, base_lr, step / peak_step)
    fall_progress = (step - peak_step) / max(1.0, max_steps - 1 - peak_step)
    return _cosine_between(base_lr, final_lr, min(1.0, fall_progress))


def _cosine_between(start: float, end: float, progress: float) -> float:
    return end + 0.5 * (1.0 + math.cos(math.pi * progress)) * (start - end)
