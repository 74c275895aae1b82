"""data=digits and data=npz: small labelled arrays held in memory by every worker.

Both split the samples with a permutation drawn from a fixed seed, not the run's seed, so every run
of a job evaluates on the same held-out samples and eval losses compare across runs.
"""

from __future__ import annotations

import zipfile

import numpy as np
import torch

from orchestrator.config.schema import DigitsDataConfig, NpzDataConfig, SampleKind
from orchestrator.data.base import DataBundle
from orchestrator.data.paths import check_readable, expand_path
from orchestrator.data.spec import DataSpec
from orchestrator.errors import UserError

_SPLIT_SEED = 20240601


class ArrayDataset:
    """Inputs and integer labels held as tensors; a batch is a gather.

    Args:
        inputs: ``(N, *input_shape)`` float32.
        labels: ``(N,)`` integer class ids.
    """

    def __init__(self, inputs: np.ndarray, labels: np.ndarray) -> None:
        self.inputs = torch.from_numpy(np.ascontiguousarray(inputs, dtype=np.float32))
        self.labels = torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64))

    def __len__(self) -> int:
        return len(self.labels)

    def get_batch(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs ``(B, *input_shape)`` float32 and labels ``(B,)`` int64 for the given sample ids."""
        index = torch.from_numpy(np.asarray(indices, dtype=np.int64))
        return self.inputs[index], self.labels[index]


def split_indices(num_samples: int, *, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Train and val sample ids: a fixed permutation, its first ``round(N * val_fraction)`` (at least 1) held out.

    Args:
        num_samples: ``N``, at least 2.
        val_fraction: The share held out for validation.
    """
    order = np.random.default_rng(_SPLIT_SEED).permutation(num_samples)
    num_val = max(1, round(num_samples * val_fraction))
    return np.sort(order[num_val:]), np.sort(order[:num_val])


def prepare(cfg: DigitsDataConfig | NpzDataConfig) -> DataSpec:
    """Read and check the arrays, and return their spec.

    Args:
        cfg: The digits or npz data config.
    """
    inputs, labels = _arrays(cfg)
    return _spec(inputs, labels)


def load(cfg: DigitsDataConfig | NpzDataConfig) -> DataBundle:
    """Read the arrays and split them. Digits are scaled to [0, 1], then standardized with the train
    split's mean and std; npz arrays are used as given.

    Args:
        cfg: The digits or npz data config.
    """
    inputs, labels = _arrays(cfg)
    train_ids, val_ids = split_indices(len(labels), val_fraction=cfg.val_fraction)
    if isinstance(cfg, DigitsDataConfig):
        train_inputs = inputs[train_ids]
        inputs = (inputs - train_inputs.mean()) / train_inputs.std()
    return DataBundle(
        spec=_spec(inputs, labels),
        train=ArrayDataset(inputs[train_ids], labels[train_ids]),
        val=ArrayDataset(inputs[val_ids], labels[val_ids]),
    )


def _spec(inputs: np.ndarray, labels: np.ndarray) -> DataSpec:
    return DataSpec(
        kind=SampleKind.images,
        input_shape=tuple(int(size) for size in inputs.shape[1:]),
        num_classes=int(labels.max()) + 1,
    )


def _arrays(cfg: DigitsDataConfig | NpzDataConfig) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(cfg, DigitsDataConfig):
        from sklearn.datasets import load_digits

        digits = load_digits()
        # Pixel values are 0..16; one channel of 8x8.
        return (digits.data / 16.0).astype(np.float32).reshape(-1, 1, 8, 8), digits.target.astype(np.int64)
    return _read_npz(cfg)


def _read_npz(cfg: NpzDataConfig) -> tuple[np.ndarray, np.ndarray]:
    path = expand_path(cfg.path)
    check_readable(path, key="data.path", what="file")
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        raise UserError(f"data.path: cannot read {path} as a .npz archive ({err})") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise UserError(
            f"data.path: {path} is a single .npy array; expected a .npz holding {cfg.x_key!r} and {cfg.y_key!r}"
        )
    with archive:
        for key, name in (("data.x_key", cfg.x_key), ("data.y_key", cfg.y_key)):
            if name not in archive.files:
                raise UserError(f"{key}={name!r}: {path} has no such array; it holds {sorted(archive.files)}")
        inputs, labels = archive[cfg.x_key], archive[cfg.y_key]
    if inputs.ndim < 2 or not (np.issubdtype(inputs.dtype, np.floating) or np.issubdtype(inputs.dtype, np.integer)):
        raise UserError(
            f"data.x_key={cfg.x_key!r}: the array in {path} must be real numbers shaped (N, ...), "
            f"got {inputs.dtype} {inputs.shape}"
        )
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer) or len(labels) != len(inputs):
        raise UserError(
            f"data.y_key={cfg.y_key!r}: the array in {path} must be integers shaped (N,) with N={len(inputs)} "
            f"as in {cfg.x_key!r}, got {labels.dtype} {labels.shape}"
        )
    if len(labels) < 2:
        raise UserError(f"data.path: {path} holds {len(labels)} sample(s); a train and a val split need at least 2")
    if labels.min() < 0:
        raise UserError(f"data.y_key={cfg.y_key!r}: labels in {path} must be class ids >= 0, got {labels.min()}")
    if not np.isfinite(inputs).all():
        raise UserError(f"data.x_key={cfg.x_key!r}: {path} holds NaN or infinite inputs")
    return inputs.astype(np.float32), labels.astype(np.int64)
