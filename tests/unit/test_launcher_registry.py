"""The launcher registry: every launcher is a module under orchestrator/launchers/ and a YAML file under
conf/launcher/, and nothing else names it."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import yaml

from orchestrator.launchers import launcher_names, launcher_spec
from tests.helpers import REPO, tiny_job


def test_every_launcher_has_a_yaml_file_that_extends_its_schema() -> None:
    files = {path.stem: path for path in (REPO / "conf" / "launcher").glob("*.yaml")}
    assert sorted(files) == sorted(launcher_names())
    for name, path in files.items():
        assert f"/schema/launcher/{launcher_spec(name).name}" in yaml.safe_load(path.read_text())["defaults"], path


def test_a_new_launcher_is_one_module_and_one_yaml_file(tmp_path: Path, cache_dir: Path) -> None:
    """A launcher defined outside the package's own files, in its two places only: composing, its own
    capacity check (before any worker starts) and training through it find it."""
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "solo.py").write_text(
        textwrap.dedent(
            """
            from dataclasses import dataclass

            from orchestrator.config.schema import LauncherConfig
            from orchestrator.errors import UserError
            from orchestrator.launchers.spec import LauncherSpec


            @dataclass(kw_only=True)
            class SoloConfig(LauncherConfig):
                name: str = "solo"
                num_workers: int = 1


            class Solo(LauncherSpec):
                name = "solo"
                config = SoloConfig
                trains = "orchestrator.launch.local:launch_local"
                runs_scripts = "orchestrator.launch.script:run_local"

                def check(self, config):
                    if config.launcher.num_workers != 1:
                        raise UserError(f"launcher.num_workers={config.launcher.num_workers}: solo runs one worker")


            SPECS = (Solo(),)
            """
        )
    )
    conf = tmp_path / "conf" / "launcher"
    conf.mkdir(parents=True)
    (conf / "solo.yaml").write_text("defaults:\n  - /schema/launcher/solo\n  - _self_\n")
    job = [*tiny_job(cache_dir), "trainer.max_steps=2", "scheduler.warmup_steps=0", "trainer.checkpoint.every=0"]
    args = [*job, "launcher=solo", f"hydra.searchpath=[file://{tmp_path / 'conf'}]"]
    code = textwrap.dedent(
        """
        import sys
        import orchestrator.launchers as launchers

        launchers.__path__.append(sys.argv[1])
        from orchestrator.cli import main

        sys.exit(main(["train", *sys.argv[2:]]))
        """
    )

    def train(*extra: str) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-c", code, str(plugins), *args, *extra]
        return subprocess.run(argv, capture_output=True, text=True, cwd=tmp_path)

    refused = train("launcher.num_workers=2", f"hydra.run.dir={tmp_path / 'refused'}")
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines()[-1] == "error: launcher.num_workers=2: solo runs one worker"
    assert not (tmp_path / "refused").exists()

    trained = train("launcher.num_workers=1", f"hydra.run.dir={tmp_path / 'run'}")
    assert trained.returncode == 0, trained.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert (summary["launcher"], summary["status"], summary["steps"]) == ("solo", "completed", 2)
