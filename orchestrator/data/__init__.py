"""Data: what the workers train and evaluate on.

``prepare_data`` runs once in the driver, before any worker starts, and builds whatever is expensive
(a tokenizer, token files) into a cache. ``load_data`` runs in every worker and only opens what
``prepare_data`` built. ``check_data_paths`` is the CLI's first, millisecond check of the paths.

The modules behind each data config import torch, tokenizers or scikit-learn, so they are imported
inside the functions: importing this package, or ``orchestrator.config.paths``, stays cheap.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from orchestrator.config.paths import check_data_paths
from orchestrator.config.schema import (
    DataConfig,
    DiabetesDataConfig,
    DigitsDataConfig,
    MemmapDataConfig,
    NpzDataConfig,
    SampleKind,
    SyntheticDataConfig,
    TextDataConfig,
    TokenizerKind,
)
from orchestrator.data.base import DataBundle, Dataset
from orchestrator.data.spec import DataSpec
from orchestrator.errors import UserError

__all__ = ["DataBundle", "DataSpec", "Dataset", "check_data_paths", "describe_data", "load_data", "prepare_data"]

# The module serving each data config; each has prepare(cfg) -> DataSpec and load(cfg) -> DataBundle.
_SOURCES: dict[type[DataConfig], str] = {
    TextDataConfig: "text",
    MemmapDataConfig: "memmap",
    DigitsDataConfig: "images",
    DiabetesDataConfig: "images",
    NpzDataConfig: "images",
    SyntheticDataConfig: "synthetic",
}


def _source(cfg: DataConfig) -> ModuleType:
    for config_type, module in _SOURCES.items():
        if isinstance(cfg, config_type):
            return importlib.import_module(f"orchestrator.data.{module}")
    raise UserError(
        f"data={cfg.name}: no data source for {type(cfg).__name__}; known: text, memmap, digits, "
        f"diabetes, npz, synthetic"
    )


def prepare_data(cfg: DataConfig) -> DataSpec:
    """Check the data and build its cache (tokenizer, token files) once, in the driver.

    Idempotent: with a complete cache for the same config it returns in well under a second. Caches
    are written under a temporary name and renamed into place, so a killed or concurrent prepare
    never leaves a half-written cache that a later run trusts.

    Args:
        cfg: The job's data config.

    Returns:
        What one sample looks like, for building the model.

    Raises:
        UserError: Bad input, with the key named: a missing or unreadable path, a corpus folder with
            no matching files, an npz without the configured arrays or with targets that are not what
            ``data.targets`` says, data too small for one train and one val sample, token ids that do not
            fit the vocabulary, ``data.augment`` that does not fit the samples' shape.
    """
    return _source(cfg).prepare(cfg)


def describe_data(cfg: DataConfig) -> DataSpec:
    """What one sample will look like, without building anything that ``prepare_data`` would cache.

    For a text corpus the vocabulary is the configured one (a BPE tokenizer trained on a small corpus
    may end up with fewer tokens); every other source is cheap to prepare and is asked directly.
    Used by ``orchestrator estimate``, which must answer in seconds for any job.
    """
    if isinstance(cfg, TextDataConfig):
        vocab_size = cfg.vocab_size if cfg.tokenizer is TokenizerKind.bpe else 256
        return DataSpec(kind=SampleKind.tokens, vocab_size=vocab_size, seq_len=cfg.seq_len)
    return prepare_data(cfg)


def load_data(cfg: DataConfig) -> DataBundle:
    """Open the data ``prepare_data`` built, in a worker: cheap, never trains or encodes.

    Args:
        cfg: The job's data config, the same one ``prepare_data`` saw. Splits and synthetic samples come
            from fixed seeds, not the run's, so eval sets are the same across runs; the sampler shuffles.

    Returns:
        The spec and the train and val datasets.
    """
    return _source(cfg).load(cfg)
