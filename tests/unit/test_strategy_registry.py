"""The strategy registry: every strategy is a package under orchestrator/strategies/ and a YAML file per
option under conf/strategy/, and nothing else names it."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import yaml

from orchestrator.strategies import strategy_names, strategy_spec
from tests.helpers import REPO


def test_every_option_has_a_yaml_file_that_extends_its_specs_schema() -> None:
    files = {path.stem: path for path in (REPO / "conf" / "strategy").glob("*.yaml")}
    assert sorted(files) == sorted(strategy_names())
    for name, path in files.items():
        defaults = yaml.safe_load(path.read_text())["defaults"]
        assert f"/schema/strategy/{strategy_spec(name).schema}" in defaults, path


def test_a_new_strategy_is_one_package_and_one_yaml_file(tmp_path: Path) -> None:
    """A strategy defined outside the package's own files, as its two places only: composing, converting,
    checkpoint formats, the estimate's plans and building find it."""
    package = tmp_path / "plugins" / "bucketless"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(
        textwrap.dedent(
            """
            from dataclasses import dataclass

            from orchestrator.strategies.ddp import DDPConfig, DDPSpec


            @dataclass(kw_only=True)
            class BucketlessConfig(DDPConfig):
                name: str = "bucketless"
                bucket_cap_mb: int = 1


            class BucketlessSpec(DDPSpec):
                options = ("bucketless",)
                schema = "bucketless"
                config = BucketlessConfig


            SPECS = (BucketlessSpec(),)
            """
        )
    )
    (package / "engine.py").write_text(
        "from orchestrator.strategies.ddp.engine import DDPStrategy, check_files, read_weights, stored_weights\n\n"
        'STRATEGIES = {"bucketless": DDPStrategy}\n'
    )
    conf = tmp_path / "conf" / "strategy"
    conf.mkdir(parents=True)
    (conf / "bucketless.yaml").write_text("defaults:\n  - /schema/strategy/bucketless\n  - _self_\n")
    code = textwrap.dedent(
        f"""
        import orchestrator.strategies as strategies

        strategies.__path__.append({str(package.parent)!r})
        from orchestrator.config.compose import compose, to_config
        from orchestrator.experiments.estimate import plans
        from orchestrator.distributed import DistContext

        config = to_config(compose(["strategy=bucketless", "hydra.searchpath=[file://{tmp_path / "conf"}]"]))
        assert type(config.strategy).__name__ == "BucketlessConfig" and config.strategy.bucket_cap_mb == 1
        assert strategies.resume_problem(written_by="bucketless", world_size=2, resuming_with="ddp", num_workers=4) is None
        assert ("bucketless", "none") in plans()
        built = strategies.build_strategy(config, dist=DistContext.from_env(config.trainer.device))
        print(type(built).__name__, built.cfg.bucket_cap_mb)
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["DDPStrategy", "1"]
