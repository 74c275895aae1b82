"""Composing a job's config with Hydra, and turning every way that can fail into one line.

The CLI composes each run's config here first (Hydra's Compose API), converts it to the typed
schema and checks it, before Hydra's own ``main`` creates a run directory: bad input never leaves
a half-made run behind.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import (
    ConfigAttributeError,
    ConfigKeyError,
    MissingMandatoryValue,
    OmegaConfBaseException,
    ValidationError,
)

from orchestrator.config.schema import Config
from orchestrator.config.store import SCHEMAS, register, schema_for
from orchestrator.errors import UserError

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
# What save_pretrained writes into a model directory (models/pretrained.py and data/bpe.py read them).
PRETRAINED_CONFIG_FILE = "config.json"
PRETRAINED_TOKENIZER_FILE = "tokenizer.json"


def compose(overrides: list[str], *, with_hydra: bool = False) -> DictConfig:
    """The composed (unresolved) config for ``overrides``; UserError on bad input.

    Args:
        overrides: Hydra overrides (``job=NAME``, ``group=option``, ``key=value``).
        with_hydra: keep the ``hydra`` node (run dir, job name, mode): what Hydra's ``run_job`` takes.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    register()
    register_resolvers()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name="train"):
            return hydra_compose(config_name="config", overrides=overrides, return_hydra_config=with_hydra)
    except Exception as exc:  # Hydra raises several unrelated types; each becomes one line
        raise UserError(describe_error(exc)) from None


def override_value(overrides: list[str], key: str) -> str | None:
    """The value a command line's override gives ``key`` (a group, ``job``, or a dotted key), if one does."""
    for override in overrides:
        name, _, value = override.partition("=")
        if name.lstrip("+~") == key:
            return value
    return None


def without_hydra(cfg: DictConfig) -> DictConfig:
    """The job's own config: ``cfg`` less its ``hydra`` node."""
    job = copy.deepcopy(cfg)
    with open_dict(job):
        job.pop("hydra", None)
    return job


def to_config(cfg: DictConfig) -> Config:
    """Converts a composed config to the typed schema, running every ``__post_init__`` check."""
    register_resolvers()  # a sweep's runs are composed by Hydra's main, not by compose()
    _reject_unknown_keys(cfg, prefix="")
    try:
        config = OmegaConf.to_object(cfg)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    except OmegaConfBaseException as exc:
        raise UserError(describe_error(exc)) from None
    assert isinstance(config, Config)
    return config


def load_resolved(text: str) -> Config:
    """A resolved config (a run's config.yaml, a submitted job's) back to the typed schema, checked again."""
    raw = OmegaConf.create(text)
    cfg = OmegaConf.structured(Config)
    for group in SCHEMAS:
        if group in raw:
            cfg[group] = OmegaConf.structured(schema_for(group, raw[group].get("name")))
    try:
        cfg = OmegaConf.merge(cfg, raw)
    except OmegaConfBaseException as exc:
        raise UserError(describe_error(exc)) from None
    return to_config(cfg)


def register_resolvers() -> None:
    """Idempotent: the resolvers through which a pretrained directory fills in settings.

    ``conf/model/gpt.yaml`` takes the sizes from ``model.pretrained``'s config.json (``gpt2_config``), and
    ``conf/data/text.yaml`` picks its tokenizer.json when there is one (``pretrained_tokenizer_or``): the
    resolved config, the run's config.yaml included, then says which sizes and which tokenizer a run has.
    Both are lenient (a missing or unreadable file gives the default): the model and the data check the
    directory and say what is wrong with it.
    """
    if not OmegaConf.has_resolver("gpt2_config"):
        OmegaConf.register_new_resolver("gpt2_config", _gpt2_config_field)
    if not OmegaConf.has_resolver("pretrained_tokenizer_or"):
        OmegaConf.register_new_resolver("pretrained_tokenizer_or", _pretrained_tokenizer_or)


def _gpt2_config_field(directory: str | None, name: str, default: Any) -> Any:
    """``directory``'s config.json's integer ``name``, or ``default`` without a directory or such a field."""
    if not directory:
        return default
    try:
        value = json.loads((Path(directory).expanduser() / PRETRAINED_CONFIG_FILE).read_text()).get(name)
    except (OSError, ValueError, AttributeError):
        return default
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def _pretrained_tokenizer_or(directory: str | None, default: str) -> str:
    """``pretrained`` when ``directory`` holds a tokenizer.json, else ``default``."""
    found = bool(directory and (Path(directory).expanduser() / PRETRAINED_TOKENIZER_FILE).is_file())
    return "pretrained" if found else default


def describe_error(exc: BaseException) -> str:
    """One line naming the key and what is allowed, from a Hydra or OmegaConf exception."""
    cause = exc
    while cause.__cause__ is not None and isinstance(cause.__cause__, Exception):
        cause = cause.__cause__
    options = getattr(exc, "options", None)
    missing_cfg_file = getattr(exc, "missing_cfg_file", None)
    if options is not None and missing_cfg_file:
        group, _, name = str(missing_cfg_file).rpartition("/")
        allowed = ", ".join(sorted(options)) or "(none)"
        return f"{group}={name}: no such option; choose one of: {allowed}"
    if isinstance(cause, OmegaConfBaseException):
        return _describe_omegaconf(cause)
    if isinstance(cause, ValueError) and cause is not exc:
        return str(cause)
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    useful = [line for line in lines if not line.startswith(("Set the environment", "To append", "Config search"))]
    return "; ".join(useful[:2]) if useful else type(exc).__name__


def _describe_omegaconf(exc: OmegaConfBaseException) -> str:
    key = getattr(exc, "full_key", None) or "config"
    message = str(getattr(exc, "msg", None) or exc).strip().splitlines()[0]
    if isinstance(exc, MissingMandatoryValue):
        return f"{key}: missing required value (set {key}=...)"
    if isinstance(exc, (ConfigKeyError, ConfigAttributeError)):
        object_type = getattr(exc, "object_type", None)
        allowed = _field_names(object_type)
        hint = f"; allowed keys: {', '.join(allowed)}" if allowed else ""
        return f"{key}: unknown key{hint}"
    if isinstance(exc, ValidationError):
        return f"{key}: {message}"
    return f"{key}: {message}"


def _reject_unknown_keys(node: DictConfig, *, prefix: str) -> None:
    # Hydra's `+key=value` opens the struct flag, and OmegaConf.to_object then sets unknown keys as
    # plain attributes on the dataclass. A schema that silently grows keys is no schema: refuse them.
    object_type = OmegaConf.get_type(node)
    allowed = set(_field_names(object_type)) if dataclasses.is_dataclass(object_type) else None
    for key in node.keys():
        full_key = f"{prefix}{key}"
        if allowed is not None and key not in allowed:
            raise UserError(f"{full_key}: unknown key; allowed keys: {', '.join(sorted(allowed))}")
        child = node._get_node(key)
        if isinstance(child, DictConfig) and not child._is_missing() and not child._is_none():
            _reject_unknown_keys(child, prefix=f"{full_key}.")


def _field_names(object_type: object) -> list[str]:
    if not dataclasses.is_dataclass(object_type):
        return []
    return sorted(f.name for f in dataclasses.fields(object_type))
