"""The private APIs orchestrator uses are those of the versions it is tested against: an upgrade fails here first."""

from __future__ import annotations

from importlib.metadata import version

import pytest

from orchestrator.config import hydra_compat
from orchestrator.errors import UserError
from orchestrator.launchers import ray_compat


@pytest.mark.parametrize(
    ("distribution", "tested"), [("hydra-core", hydra_compat.TESTED_VERSIONS), ("ray", ray_compat.TESTED_VERSIONS)]
)
def test_the_installed_version_is_a_tested_one(distribution: str, tested: tuple[str, ...]) -> None:
    major_minor = ".".join(version(distribution).split(".")[:2])
    assert major_minor in tested, (
        f"{distribution} {version(distribution)} is not among the versions whose private "
        f"APIs orchestrator is tested against ({', '.join(tested)}): check its compat "
        f"module, then add the version there and in pyproject.toml"
    )


def test_hydra_expands_a_sweep_and_refuses_a_bad_override() -> None:
    assert hydra_compat.sweep_points(["optim.lr=0.1,0.2", "seed=1,2"]) == [
        ["optim.lr=0.1", "seed=1"],
        ["optim.lr=0.1", "seed=2"],
        ["optim.lr=0.2", "seed=1"],
        ["optim.lr=0.2", "seed=2"],
    ]
    assert hydra_compat.args_parser().parse_args(["-m", "seed=1,2"]).multirun
    with pytest.raises(UserError, match="no viable alternative at input"):
        hydra_compat.parse_overrides(["optim.lr=[1,"])
