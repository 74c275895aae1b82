"""The driver's last checks before workers start, the ones that need torch and the data."""

from __future__ import annotations

import torch

from orchestrator.config.schema import Config
from orchestrator.data import prepare_data
from orchestrator.models import build_model
from orchestrator.train.finetune import freeze_modules


def preflight(config: Config) -> None:
    """Prepares the data (cached) and builds the model on the meta device, allocating nothing.

    Catches what only the built model can tell (a model that does not fit the data, a ``trainer.freeze``
    name that is not a module) in the driver, in seconds, rather than in every worker.
    """
    spec = prepare_data(config.data)
    with torch.device("meta"):
        model = build_model(config.model, spec)
    freeze_modules(model, config.trainer.freeze)
