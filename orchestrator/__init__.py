"""orchestrator: distributed PyTorch training from one Hydra config."""

__version__ = "0.1.0"
