"""Registers the schema in Hydra's ConfigStore.

Each YAML option extends its schema through its defaults list (``- /schema/model/gpt``), which is what
makes a misspelled key or a value of the wrong type fail at composition, with the key named.
"""

from __future__ import annotations

import os

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from orchestrator.config import schema
from orchestrator.errors import UserError
from orchestrator.launchers import launcher_specs
from orchestrator.strategies import strategy_names, strategy_spec, strategy_specs

SCHEMAS: dict[str, dict[str, type]] = {
    "model": {
        "gpt": schema.GPTConfig,
        "mlp": schema.MLPConfig,
        "cnn": schema.CNNConfig,
        "lstm": schema.LSTMConfig,
        "hf": schema.HFConfig,
    },
    "data": {
        "text": schema.TextDataConfig,
        "memmap": schema.MemmapDataConfig,
        "digits": schema.DigitsDataConfig,
        "npz": schema.NpzDataConfig,
        "diabetes": schema.DiabetesDataConfig,
        "synthetic": schema.SyntheticDataConfig,
    },
    # Each strategy's package names its own (orchestrator/strategies/<package>/__init__.py).
    "strategy": {spec.schema: spec.config for spec in strategy_specs()},
    "optim": {"optim": schema.OptimConfig},
    "scheduler": {"scheduler": schema.SchedulerConfig},
    "trainer": {"trainer": schema.TrainerConfig},
    # Each launcher's module names its own (orchestrator/launchers/<module>.py).
    "launcher": {spec.name: spec.config for spec in launcher_specs()},
    "logger": {"logger": schema.LoggerConfig},
}


def schema_for(group: str, name: str | None) -> type:
    """The schema dataclass of a group's option named ``name`` (``zero1`` is a ``zero`` strategy)."""
    options = SCHEMAS[group]
    if len(options) == 1:
        return next(iter(options.values()))
    if group == "strategy" and name in strategy_names():
        return strategy_spec(name).config
    if name not in options:
        raise UserError(f"{group}.name={name}: no such {group}; choose one of: {', '.join(options)}")
    return options[name]


def _or_default(value: object, default: str) -> object:
    return default if value in (None, "None", "null") else value


def register() -> None:
    """Idempotent: stores the schema nodes and the resolvers the YAML files use."""
    store = ConfigStore.instance()
    store.store(name="schema", node=schema.Config)
    for group, options in SCHEMAS.items():
        for name, node in options.items():
            store.store(group=f"schema/{group}", name=name, node=node, package=group)
    if not OmegaConf.has_resolver("or_default"):
        OmegaConf.register_new_resolver("or_default", _or_default)
    if not OmegaConf.has_resolver("pid"):
        # Default run dirs end in the process id: two runs started in the same second never share one.
        OmegaConf.register_new_resolver("pid", os.getpid, use_cache=True)
