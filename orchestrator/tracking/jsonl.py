"""Append-only JSON-lines files in the run dir (``metrics.jsonl``, ``resources.jsonl``)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Iterable

from orchestrator.rundir import RunDir


def _clean(value: Any) -> Any:
    # JSON has no NaN or Infinity; a non-finite loss is recorded as null rather than breaking readers.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class JsonlWriter:
    """One JSON object per line, flushed per write so a dashboard can read a run in progress."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = open(path, "a", buffering=1)

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps({k: _clean(v) for k, v in record.items()}) + "\n")

    def close(self) -> None:
        self._file.close()


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Every complete line of ``path`` (a torn last line of a killed run is ignored)."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def set_aside(run_dir: Path, names: Iterable[str]) -> Path | None:
    """Moves the files ``names`` an earlier run left in ``run_dir`` to ``run_dir/replaced/<n>/`` (the
    lowest free number); returns that directory, or None when there was nothing to move."""
    present = [name for name in names if (run_dir / name).exists() and (run_dir / name).stat().st_size > 0]
    if not present:
        return None
    number = 0
    replaced = RunDir(run_dir).replaced
    while (replaced / str(number)).exists():
        number += 1
    target = replaced / str(number)
    target.mkdir(parents=True)
    for name in present:
        os.replace(run_dir / name, target / name)
    return target


def truncate_after_step(path: Path, step: int) -> None:
    """Drops records with ``step`` > ``step``: a resumed run recomputes them, and the file stays monotonic."""
    if not path.exists():
        return
    kept: Iterable[dict[str, Any]] = (r for r in read_jsonl(path) if r.get("step", 0) <= step)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        for record in kept:
            f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
