"""Launchers by name. The config group ``launcher`` picks one; the driver asks its spec, never its name.

Every module under ``orchestrator/launchers/`` with ``SPECS`` (``spec.LauncherSpec``) is a launcher,
found here: a new launcher is its module and its YAML file under ``conf/launcher/``. Importing this
package imports neither torch nor Ray.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil

from orchestrator.errors import UserError
from orchestrator.launchers.spec import LauncherSpec


@functools.cache
def _registry() -> dict[str, LauncherSpec]:
    specs: dict[str, LauncherSpec] = {}
    for module in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        for spec in getattr(importlib.import_module(f"{__name__}.{module.name}"), "SPECS", ()):
            if spec.name in specs:
                raise RuntimeError(f"launcher={spec.name} is defined twice ({module.name} and another module)")
            specs[spec.name] = spec
    return specs


def launcher_names() -> list[str]:
    """Every name ``launcher=`` takes."""
    return list(_registry())


def launcher_specs() -> list[LauncherSpec]:
    return list(_registry().values())


def launcher_spec(name: str) -> LauncherSpec:
    """The spec of ``launcher=name``; ``UserError`` listing the names there are."""
    spec = _registry().get(name)
    if spec is None:
        raise UserError(f"launcher={name}: no such launcher; choose one of: {', '.join(_registry())}")
    return spec
