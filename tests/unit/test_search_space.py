"""A search space in Hydra's sweep syntax: what each expression means, what is refused, and the points a
random or grid search draws (the same on every start of the search)."""

from __future__ import annotations

import math
import random

import pytest

from orchestrator.errors import UserError
from orchestrator.search.space import CHOICE, INT, LOG_UNIFORM, UNIFORM, check_points, parse_dimension, split_command


def test_each_expression_is_a_dimension_of_its_kind() -> None:
    base, space = split_command(
        [
            "job=gpt_tiny_cpu",
            "optim.lr=tag(log,interval(1e-4,1e-2))",
            "optim=choice(adam,adamw)",
            "model.n_layer=range(1,7,2)",
            "optim.weight_decay=interval(0,0.1)",
            "seed=1,2",
        ],
        job_space={},
    )
    assert base == ["job=gpt_tiny_cpu"]
    kinds = {dimension.key: dimension.kind for dimension in space}
    assert kinds == {
        "optim.lr": LOG_UNIFORM,
        "optim": CHOICE,
        "model.n_layer": INT,
        "optim.weight_decay": UNIFORM,
        "seed": CHOICE,
    }
    by_key = {dimension.key: dimension for dimension in space}
    assert by_key["model.n_layer"].grid() == [1, 3, 5]
    assert by_key["optim"].grid() == ["adam", "adamw"]
    assert by_key["optim.lr"].optuna_distribution().log


def test_the_command_line_adds_to_and_replaces_the_jobs_space() -> None:
    _, space = split_command(
        ["optim.lr=interval(1e-3,1e-2)"],
        job_space={"optim.lr": "tag(log,interval(1e-5,1e-1))", "optim": "choice(adam,sgd)"},
    )
    by_key = {dimension.key: dimension for dimension in space}
    assert by_key["optim.lr"].kind == UNIFORM and by_key["optim.lr"].low == 1e-3
    assert by_key["optim"].values == ("adam", "sgd")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("optim.lr=interval(1e-2,1e-4)", "an empty interval"),
        ("model.n_layer=range(4,4)", "an empty range"),
        ("optim.lr=range(0.1,0.5,0.1)", "range() takes integers"),
        ("optim.lr=tag(log,interval(0,1))", "a log scale needs a low end above 0"),
        ("optim.lr=tag(sqrt,interval(1,2))", "only tag(log,interval(lo,hi))"),
        ("optim=glob(*)", "not a search space"),
        ("optim.lr=3e-4", "not a search space"),
        ("+optim.foo=choice(1,2)", "drop the +"),
    ],
)
def test_a_bad_dimension_is_one_line_naming_it(text: str, message: str) -> None:
    with pytest.raises(UserError) as caught:
        parse_dimension(text, where=text)
    assert message in str(caught.value) and str(caught.value).startswith(text)
    assert "\n" not in str(caught.value)


def test_a_float_interval_has_no_grid() -> None:
    with pytest.raises(UserError, match="search.algorithm=grid needs choice"):
        parse_dimension("optim.lr=interval(1e-4,1e-2)", where="optim.lr").grid()


def test_samples_stay_inside_their_ranges_and_repeat_with_the_seed() -> None:
    _, space = split_command(
        ["optim.lr=tag(log,interval(1e-4,1e-2))", "model.n_layer=range(1,4)", "optim=choice(adam,adamw)"], job_space={}
    )

    def draw(seed: int) -> list[dict]:
        rng = random.Random(seed)
        return [{d.key: d.sample(rng) for d in space} for _ in range(50)]

    points = draw(0)
    assert points == draw(0) and points != draw(1)
    assert all(1e-4 <= p["optim.lr"] <= 1e-2 and p["model.n_layer"] in (1, 2, 3) for p in points)
    logs = [math.log10(p["optim.lr"]) for p in points]
    assert min(logs) < -3.3 and max(logs) > -2.7  # spread over the decades, not bunched at the top


def test_the_checks_cover_every_choice_and_range_end_one_dimension_at_a_time() -> None:
    base, space = split_command(
        ["job=x", "optim=choice(adam,adamw,sgd)", "model.n_layer=range(1,5)", "optim.lr=tag(log,interval(1e-4,1e-2))"],
        job_space={},
    )
    points = check_points(base, space)
    assert points[0] == ["job=x", "optim=adam", "model.n_layer=1", "optim.lr=0.0001"]
    assert ["job=x", "optim=sgd", "model.n_layer=1", "optim.lr=0.0001"] in points
    assert ["job=x", "optim=adam", "model.n_layer=4", "optim.lr=0.0001"] in points
    assert len(points) == 1 + 2 + 1
