"""A search trial's channel: its run's rank 0 reports each eval and waits for the search's decision.

``orchestrator search`` runs each trial as an ordinary ``launcher=ray`` run. The trial's driver (a Ray
Tune trainable, ``search/trial.py``) creates a channel, a Ray actor named after the run dir, before the
run starts; the run's workers find it by that name (a run without one is no trial). At each eval rank 0
puts the step and the eval's metrics on it and waits: the trainable hands them to Ray Tune, whose
scheduler answers through the search driver (``search/tune.py``) with go on or stop. A stopped run
ends at that step like a finished one (its checkpoint written, ``summary.json`` status
``stopped_early_by_search``): Ray Tune never kills a trial that is still training.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from pathlib import Path
from typing import Any, Callable

# A decision comes within milliseconds of the report; past this the run goes on without one.
DECISION_TIMEOUT_S = 300.0

log = logging.getLogger(__name__)


def channel_name(run_dir: Path | str) -> str:
    """The channel actor's name for the run in ``run_dir`` (an absolute path)."""
    return "orchestrator-trial-" + hashlib.sha256(str(run_dir).encode()).hexdigest()[:20]


class TrialChannel:
    """The channel, run as an async Ray actor (``ray.remote(num_cpus=0)(TrialChannel)``).

    Reports and decisions carry the eval's step, so a decision that came after its report timed out
    never answers a later report.
    """

    def __init__(self) -> None:
        self._reports: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._decisions: asyncio.Queue[tuple[int, bool]] = asyncio.Queue()

    async def report(self, result: dict[str, Any]) -> bool:
        """Rank 0's eval (with its ``step``); returns the decision for it: True to go on."""
        await self._reports.put(result)
        while True:
            step, go_on = await self._decisions.get()
            if step == result["step"]:
                return go_on

    async def next_report(self) -> dict[str, Any]:
        """The trial's driver: the next eval rank 0 reported."""
        return await self._reports.get()

    async def decide(self, step: int, go_on: bool) -> None:
        """The search driver: the scheduler's decision on the eval at ``step``."""
        self._decisions.put_nowait((step, go_on))


def open_channel(run_dir: Path) -> Any:
    """The trial driver's side: creates the run's channel (an actor handle); it lives as long as its creator."""
    import ray

    return ray.remote(num_cpus=0)(TrialChannel).options(name=channel_name(run_dir)).remote()


def find_channel(run_dir: Path | str) -> Any:
    """The channel of the run in ``run_dir``, or None when the run is no search trial."""
    import ray

    try:
        return ray.get_actor(channel_name(run_dir))
    except ValueError:
        return None


def eval_reporter(run_dir: str) -> Callable[[int, dict[str, float]], bool] | None:
    """In a Ray Train worker: the loop's ``on_eval`` for a search trial's run, None for any other run.

    Every rank gets it (the loop calls it on rank 0 only and shares the answer), so every rank must
    find the channel or none.
    """
    import ray
    from ray.exceptions import GetTimeoutError, RayActorError

    channel = find_channel(run_dir)
    if channel is None:
        return None

    def on_eval(step: int, metrics: dict[str, float]) -> bool:
        try:
            return ray.get(channel.report.remote({"step": step, **metrics}), timeout=DECISION_TIMEOUT_S)
        except (GetTimeoutError, RayActorError) as exc:
            log.warning("no decision from the search for step %d (%s): training goes on", step, type(exc).__name__)
            return True

    return on_eval
