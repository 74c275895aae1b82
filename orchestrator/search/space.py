"""A search space in Hydra's sweep syntax, from the command line and the job's ``search.space``.

Each dimension is a key (``optim.lr``) or a group (``optim``) with one of::

    choice(a,b,c)  or  a,b,c          one of the values
    range(lo,hi[,step])               an integer in [lo, hi), every step-th
    interval(lo,hi)                   a float, uniform in [lo, hi]
    tag(log,interval(lo,hi))          a float, log-uniform in [lo, hi] (lo > 0)

Every malformed or empty dimension is a UserError naming it, in one line.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any

from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, Override, RangeSweep

from orchestrator.config.hydra_compat import parse_overrides
from orchestrator.errors import UserError

CHOICE, INT, UNIFORM, LOG_UNIFORM = "choice", "int", "uniform", "loguniform"
ALLOWED = "use choice(a,b), range(lo,hi[,step]), interval(lo,hi) or tag(log,interval(lo,hi))"


@dataclass(frozen=True)
class Dimension:
    """One searched key and the values it may take."""

    key: str  # as an override names it: optim.lr, optim (a group)
    kind: str  # CHOICE, INT, UNIFORM or LOG_UNIFORM
    expression: str  # as written, for messages and the search record
    values: tuple[Any, ...] = ()  # CHOICE
    low: float = 0.0  # INT, UNIFORM, LOG_UNIFORM: the ends (INT: high is excluded)
    high: float = 0.0
    step: int = 1  # INT

    def override(self, value: Any) -> str:
        """The Hydra override that sets this dimension to ``value``."""
        return f"{self.key}={_format(value)}"

    def reachable(self) -> list[Any]:
        """The values the CLI checks before any trial: every choice, each end of a range, an interval's low end
        (its high end is a limit the samplers approach, not a value they draw)."""
        if self.kind == CHOICE:
            return list(self.values)
        if self.kind == INT:
            return sorted({int(self.low), int(self.grid()[-1])})
        return [self.low]

    def grid(self) -> list[Any]:
        """Every value, for ``search.algorithm=grid``.

        Raises:
            UserError: a float interval, which has no finite grid.
        """
        if self.kind == CHOICE:
            return list(self.values)
        if self.kind == INT:
            return list(range(int(self.low), int(self.high), self.step))
        raise UserError(f"{self.expression}: search.algorithm=grid needs choice(...) or range(...), not an interval")

    def sample(self, rng: random.Random) -> Any:
        """One value drawn uniformly (log-uniformly for LOG_UNIFORM)."""
        if self.kind == UNIFORM:
            return rng.uniform(self.low, self.high)
        if self.kind == LOG_UNIFORM:
            return math.exp(rng.uniform(math.log(self.low), math.log(self.high)))
        return rng.choice(self.grid())

    def optuna_distribution(self) -> Any:
        """The dimension as an Optuna distribution (Optuna is imported here: only a search needs it)."""
        from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

        if self.kind == CHOICE:
            return CategoricalDistribution(list(self.values))
        if self.kind == INT:
            return IntDistribution(int(self.low), int(self.grid()[-1]), step=self.step)
        return FloatDistribution(self.low, self.high, log=self.kind == LOG_UNIFORM)


def split_command(overrides: list[str], job_space: dict[str, str]) -> tuple[list[str], list[Dimension]]:
    """The command's plain overrides (the job every trial trains) and the search space: ``job_space``
    (the job config's ``search.space``) with the command line's sweep overrides added or replacing keys.

    Raises:
        UserError: a dimension that is not a search space, or is empty.
    """
    base: list[str] = []
    space: dict[str, Dimension] = {}
    for key, expression in job_space.items():
        space[key] = parse_dimension(f"{key}={expression}", where=f"search.space.{key}")
    for override in parse_overrides(overrides):
        if override.is_sweep_override():
            dimension = _dimension(override, where=override.input_line)
            space[dimension.key] = dimension
        else:
            base.append(override.input_line)
    return base, list(space.values())


def parse_dimension(text: str, *, where: str) -> Dimension:
    """One ``key=expression`` as a dimension; ``where`` names it in errors."""
    parsed = parse_overrides([text])[0]
    if not parsed.is_sweep_override():
        raise UserError(f"{where}: not a search space; {ALLOWED}")
    return _dimension(parsed, where=where)


def _dimension(override: Override, *, where: str) -> Dimension:
    if override.is_add() or override.is_force_add() or override.is_delete():
        raise UserError(f"{where}: a search dimension sets a key the job has; drop the {override.input_line[0]}")
    key, value, expression = override.get_key_element(), override.value(), override.input_line
    tags = set(getattr(value, "tags", ()) or ())
    if tags - {"log"} or (tags and not isinstance(value, IntervalSweep)):
        raise UserError(f"{where}: only tag(log,interval(lo,hi)) is understood; {ALLOWED}")
    if isinstance(value, ChoiceSweep):
        if not value.list:
            raise UserError(f"{where}: an empty choice; give at least one value")
        return Dimension(key, CHOICE, expression, values=tuple(value.list))
    if isinstance(value, RangeSweep):
        if not all(isinstance(v, int) for v in (value.start, value.stop, value.step)):
            raise UserError(f"{where}: range() takes integers; use interval(lo,hi) for a float")
        if not range(value.start, value.stop, value.step):
            raise UserError(
                f"{where}: an empty range (no integer from {value.start} up to {value.stop}, which is excluded)"
            )
        return Dimension(key, INT, expression, low=value.start, high=value.stop, step=value.step)
    if isinstance(value, IntervalSweep):
        low, high = float(value.start), float(value.end)
        if not (math.isfinite(low) and math.isfinite(high) and low < high):
            raise UserError(f"{where}: an empty interval (the low end must be below the high end)")
        if "log" in tags:
            if low <= 0:
                raise UserError(f"{where}: a log scale needs a low end above 0")
            return Dimension(key, LOG_UNIFORM, expression, low=low, high=high)
        return Dimension(key, UNIFORM, expression, low=low, high=high)
    raise UserError(f"{where}: not a search space; {ALLOWED}")


def check_points(base: list[str], space: list[Dimension]) -> list[list[str]]:
    """What the CLI composes and checks before any trial: every dimension at its first reachable value,
    then each other reachable value, one dimension at a time."""
    firsts = [dimension.override(dimension.reachable()[0]) for dimension in space]
    points = [[*base, *firsts]]
    for i, dimension in enumerate(space):
        for value in dimension.reachable()[1:]:
            points.append([*base, *firsts[:i], dimension.override(value), *firsts[i + 1 :]])
    return points


def trial_overrides(base: list[str], space: list[Dimension], params: dict[str, Any]) -> list[str]:
    """A trial's overrides: the job's, then its sampled values."""
    return [*base, *(dimension.override(params[dimension.key]) for dimension in space)]


def _format(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return "true" if value is True else "false" if value is False else "null"
    if isinstance(value, float):
        return repr(value)
    return str(value)
