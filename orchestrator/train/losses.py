"""``trainer.loss``: how a model's outputs are scored against the data's targets.

Every loss is the mean over target elements: over tokens for a language model, over samples for a
classifier, over samples and columns for float targets. Eval sums per rank and divides by the count
over all ranks, so an eval loss is the same mean over the eval set at any world size. Which loss fits
which targets is the schema's rule (``LOSSES_FOR``), checked when the config is composed.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F

from orchestrator.config.schema import LossName, SampleKind, TrainerConfig, loss_problem
from orchestrator.data.spec import DataSpec
from orchestrator.errors import UserError


def _cross_entropy(outputs: torch.Tensor, targets: torch.Tensor, *, reduction: str) -> torch.Tensor:
    # Token models give (B, T, V) logits and (B, T) targets, classifiers (B, C) and (B,): flatten both alike.
    return F.cross_entropy(outputs.flatten(0, -2), targets.flatten(), reduction=reduction)


def _class_hits(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return (outputs.argmax(dim=-1) == targets).sum()


def _label_hits(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    # A label counts as predicted when its logit is positive (probability above one half).
    return ((outputs > 0) == (targets > 0.5)).sum()


_LOSSES: dict[LossName, Callable[..., torch.Tensor]] = {
    LossName.cross_entropy: _cross_entropy,
    LossName.mse: F.mse_loss,
    LossName.l1: F.l1_loss,
    LossName.huber: F.huber_loss,
    LossName.bce: F.binary_cross_entropy_with_logits,
}


@dataclass(frozen=True)
class Loss:
    """``trainer.loss`` for one dataset's targets.

    ``hits(outputs, targets)`` counts the target elements predicted right, of which accuracy is the share;
    None where accuracy means nothing (float targets) or is not reported (language models).
    """

    name: LossName
    compute: Callable[..., torch.Tensor]
    hits: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None

    def __call__(self, outputs: torch.Tensor, targets: torch.Tensor, *, reduction: str = "mean") -> torch.Tensor:
        """The loss of ``outputs`` against ``targets``, in fp32 whatever the autocast precision."""
        return self.compute(outputs.float(), targets, reduction=reduction)


def build_loss(cfg: TrainerConfig, spec: DataSpec, *, data_name: str) -> Loss:
    """The loss ``trainer.loss`` names, for data that yields ``spec``.

    Accuracy is counted for image and feature-vector classifiers (class ids with cross-entropy, labels
    with bce), not for language models, whose eval loss (perplexity) is the usual measure.

    Args:
        cfg: the trainer settings.
        spec: what the data yields.
        data_name: the data config's name, for the error.

    Raises:
        UserError: the loss does not fit the targets (the schema refuses such a config already).
    """
    tokens = spec.kind is SampleKind.tokens
    problem = loss_problem(cfg.loss, spec.targets, data=data_name, tokens=tokens)
    if problem is not None:
        raise UserError(problem)
    compute = _LOSSES[cfg.loss]
    if cfg.loss is LossName.huber:
        compute = partial(compute, delta=cfg.huber_delta)
    hits = None
    if not tokens and cfg.loss is LossName.cross_entropy:
        hits = _class_hits
    elif cfg.loss is LossName.bce:
        hits = _label_hits
    return Loss(cfg.loss, compute, hits)
