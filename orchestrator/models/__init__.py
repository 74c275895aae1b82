"""Models by name; see ``registry`` for what every model provides."""

from orchestrator.models.meta import meta_device
from orchestrator.models.registry import (
    ModelInfo,
    build_model,
    describe_model,
    model_blocks,
    pretrained_weights,
)

__all__ = ["ModelInfo", "build_model", "describe_model", "meta_device", "model_blocks", "pretrained_weights"]
