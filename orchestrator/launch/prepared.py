"""A job made ready to launch, once per run, in the driver."""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import DictConfig, OmegaConf

from orchestrator.config.checks import check_environment
from orchestrator.config.compose import load_resolved, to_config
from orchestrator.config.schema import Config


@dataclass(frozen=True)
class PreparedJob:
    """A job ready to launch: composed, converted to the typed schema, checked against this machine, its data
    prepared, its model built on the meta device and every checkpoint it names verified. Every command makes
    one per run (``prepare_composed`` or ``prepare_resolved``) and ``launch.run_job`` takes it.

    Attributes:
        config: the typed job.
        resolved_yaml: the resolved config, as the run saves it (``config.yaml``).
        job_name: the ``job=`` choice, if any.
        model_shapes: the model's state-dict shapes as it trains (with its adapters); None for a script job.
    """

    config: Config
    resolved_yaml: str
    job_name: str | None
    model_shapes: dict[str, list[int]] | None


def prepare_composed(cfg: DictConfig, *, job_name: str | None) -> PreparedJob:
    """From a composed config (without its ``hydra`` node): converted once, checked, prepared."""
    return prepare(to_config(cfg), resolved_yaml=OmegaConf.to_yaml(cfg, resolve=True), job_name=job_name)


def prepare_resolved(text: str, *, job_name: str | None) -> PreparedJob:
    """From a resolved config (a submitted job's): converted back to the schema, checked again, prepared."""
    return prepare(load_resolved(text), resolved_yaml=text, job_name=job_name)


def prepare(config: Config, *, resolved_yaml: str, job_name: str | None) -> PreparedJob:
    """Checks ``config`` against this machine, prepares its data and builds its model on the meta device.

    Raises:
        UserError: the job cannot run here (one line, naming the key).
    """
    from orchestrator.launch.preflight import preflight  # lazy: imports torch

    check_environment(config)
    return PreparedJob(config, resolved_yaml, job_name, preflight(config))
