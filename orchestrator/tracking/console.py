"""Rank 0's console: a progress bar while training, a summary table at the end."""

from __future__ import annotations

import sys
import time
from typing import Any

from tqdm import tqdm


class Progress:
    """A tqdm bar on a terminal; on a pipe or in a log file, a plain line every 5% of the run.

    Args:
        total: the run's last step.
        initial: the step training starts (or resumes) from.
        enabled: False silences it (``logger.progress=false``).
    """

    def __init__(self, *, total: int, initial: int, enabled: bool) -> None:
        self.total = total
        self.enabled = enabled
        self.interactive = enabled and sys.stderr.isatty()
        self._every = max(1, total // 20)
        self._start = time.perf_counter()
        self._initial = initial
        self._bar = (
            tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, leave=True)
            if self.interactive
            else None
        )

    def update(self, step: int, *, loss: float, tokens_per_s: float) -> None:
        if self._bar is not None:
            self._bar.set_postfix_str(f"loss {loss:.4f} | {format_si(tokens_per_s)} tok/s", refresh=False)
            self._bar.update(step - self._bar.n)
        elif self.enabled and (step % self._every == 0 or step == self.total):
            elapsed = time.perf_counter() - self._start
            eta = elapsed / max(1, step - self._initial) * (self.total - step)
            print(
                f"step {step}/{self.total} | loss {loss:.4f} | {format_si(tokens_per_s)} tok/s | eta {_duration(eta)}",
                flush=True,
            )

    def write(self, message: str) -> None:
        """A line that does not break the bar."""
        if self._bar is not None:
            self._bar.write(message)
        elif self.enabled:
            print(message, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def format_summary(rows: list[tuple[str, Any]]) -> str:
    """A two-column table; ``None`` values are left out."""
    rows = [(k, v) for k, v in rows if v is not None]
    width = max(len(k) for k, _ in rows)
    lines = [f"  {k:<{width}}  {_format_value(v)}" for k, v in rows]
    rule = "-" * (width + 4 + max(len(line) - width - 4 for line in lines))
    return "\n".join([rule, *lines, rule])


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def format_si(value: float, digits: int = 1) -> str:
    """``value`` with a k, M or G suffix: 12345 -> 12.3k."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.{digits}f}{unit}"
    return f"{value:.0f}"


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


def format_bytes(n: float) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def format_duration(seconds: float) -> str:
    return _duration(seconds) if seconds >= 60 else f"{seconds:.1f}s"
