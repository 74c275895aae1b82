"""How orchestrator's own log lines look on the console."""

from __future__ import annotations

import logging
import sys


def configure_logging() -> None:
    """orchestrator's warnings as ``WARNING: ...`` lines on stderr; chatty libraries kept to warnings."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    package = logging.getLogger("orchestrator")
    package.handlers[:] = [handler]
    package.setLevel(logging.INFO)
    package.propagate = False
    for noisy in ("torch.distributed", "DeepSpeed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
