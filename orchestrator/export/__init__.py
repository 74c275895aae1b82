"""``orchestrator export``: trained weights out, as a directory transformers loads (safetensors, config.json,
the run's tokenizer)."""

from orchestrator.export.build import ExportResult, export_checkpoint
from orchestrator.export.command import export_command

__all__ = ["ExportResult", "export_checkpoint", "export_command"]
