"""Models by name; see ``registry`` for what every model provides."""

from orchestrator.models.registry import (
    ModelInfo,
    build_model,
    describe_model,
    model_blocks,
)

__all__ = ["ModelInfo", "build_model", "describe_model", "model_blocks"]
