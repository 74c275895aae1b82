"""``launcher=local``: the job's workers as processes on this machine, through torch's elastic launch API."""

from __future__ import annotations

from dataclasses import dataclass

from orchestrator.config.schema import Config, LauncherConfig
from orchestrator.launchers.spec import LauncherSpec, check_this_machine


@dataclass(kw_only=True)
class LocalLauncherConfig(LauncherConfig):
    """N worker processes on this machine through torch's elastic launch API."""

    name: str = "local"
    num_workers: int = 2


class LocalLauncher(LauncherSpec):
    name = "local"
    config = LocalLauncherConfig
    trains = "orchestrator.launch.local:launch_local"
    runs_scripts = "orchestrator.launch.script:run_local"

    def check(self, config: Config) -> None:
        check_this_machine(config)


SPECS = (LocalLauncher(),)
