"""data=digits, data=diabetes and data=npz: small arrays held in memory by every worker.

Each splits the samples with a permutation drawn from a fixed seed, not the run's seed, so every run
of a job evaluates on the same held-out samples and eval losses compare across runs.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import torch

from orchestrator.config.paths import check_readable, expand_path
from orchestrator.config.schema import DiabetesDataConfig, DigitsDataConfig, NpzDataConfig, SampleKind, TargetKind
from orchestrator.data.augment import Augmenter, check_augment
from orchestrator.data.base import DataBundle
from orchestrator.data.spec import DataSpec
from orchestrator.errors import UserError

_SPLIT_SEED = 20240601

ArrayDataConfig = DigitsDataConfig | DiabetesDataConfig | NpzDataConfig


class ArrayDataset:
    """Inputs and targets held as tensors; a batch is a gather.

    Args:
        inputs: ``(N, *input_shape)`` float32.
        targets: ``(N,)`` integer class ids, or ``(N, k)`` float32 targets.
    """

    def __init__(self, inputs: np.ndarray, targets: np.ndarray) -> None:
        self.inputs = torch.from_numpy(np.ascontiguousarray(inputs, dtype=np.float32))
        dtype = np.int64 if np.issubdtype(targets.dtype, np.integer) else np.float32
        self.targets = torch.from_numpy(np.ascontiguousarray(targets, dtype=dtype))

    def __len__(self) -> int:
        return len(self.targets)

    def get_batch(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs ``(B, *input_shape)`` float32 and targets (``(B,)`` int64 or ``(B, k)`` float32) of the ids."""
        index = torch.from_numpy(np.asarray(indices, dtype=np.int64))
        return self.inputs[index], self.targets[index]


def split_indices(num_samples: int, *, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Train and val sample ids: a fixed permutation, its first ``round(N * val_fraction)`` (at least 1) held out.

    Args:
        num_samples: ``N``, at least 2.
        val_fraction: The share held out for validation.
    """
    order = np.random.default_rng(_SPLIT_SEED).permutation(num_samples)
    num_val = max(1, round(num_samples * val_fraction))
    return np.sort(order[num_val:]), np.sort(order[:num_val])


def prepare(cfg: ArrayDataConfig) -> DataSpec:
    """Read and check the arrays, and return their spec.

    Args:
        cfg: The digits, diabetes or npz data config.
    """
    inputs, targets = _arrays(cfg)
    spec = _spec(cfg, inputs, targets)
    assert spec.input_shape is not None  # _spec sets it
    check_augment(cfg.augment, spec.input_shape)
    return spec


def load(cfg: ArrayDataConfig) -> DataBundle:
    """Read the arrays and split them. Digits are scaled to [0, 1], then standardized with the train
    split's mean and std; diabetes features and target are standardized per column with the train
    split's; npz arrays are used as given. Training batches are augmented per ``data.augment``.

    Args:
        cfg: The digits, diabetes or npz data config.
    """
    inputs, targets = _arrays(cfg)
    train_ids, val_ids = split_indices(len(targets), val_fraction=cfg.val_fraction)
    if isinstance(cfg, DigitsDataConfig):
        train_inputs = inputs[train_ids]
        inputs = (inputs - train_inputs.mean()) / train_inputs.std()
    elif isinstance(cfg, DiabetesDataConfig):
        inputs, targets = _standardize(inputs, train_ids), _standardize(targets, train_ids)
    spec = _spec(cfg, inputs, targets)
    assert spec.input_shape is not None  # _spec sets it
    check_augment(cfg.augment, spec.input_shape)
    return DataBundle(
        spec=spec,
        train=ArrayDataset(inputs[train_ids], targets[train_ids]),
        val=ArrayDataset(inputs[val_ids], targets[val_ids]),
        augment=Augmenter(cfg.augment) if cfg.augment.enabled else None,
    )


def _standardize(array: np.ndarray, train_ids: np.ndarray) -> np.ndarray:
    """Each column shifted and scaled to the train split's mean 0 and std 1."""
    mean, std = array[train_ids].mean(axis=0), array[train_ids].std(axis=0)
    return ((array - mean) / np.where(std > 0, std, 1.0)).astype(np.float32)


def _spec(cfg: ArrayDataConfig, inputs: np.ndarray, targets: np.ndarray) -> DataSpec:
    input_shape = tuple(int(size) for size in inputs.shape[1:])
    if cfg.targets is TargetKind.classes:
        return DataSpec(kind=SampleKind.images, input_shape=input_shape, num_classes=int(targets.max()) + 1)
    return DataSpec(
        kind=SampleKind.images, input_shape=input_shape, targets=cfg.targets, target_dim=int(targets.shape[1])
    )


def _arrays(cfg: ArrayDataConfig) -> tuple[np.ndarray, np.ndarray]:
    """Inputs ``(N, ...)`` float32, and ``(N,)`` int64 class ids or ``(N, k)`` float32 targets."""
    if isinstance(cfg, DigitsDataConfig):
        from sklearn.datasets import load_digits

        digits = load_digits()
        # Pixel values are 0..16; one channel of 8x8.
        return (digits.data / 16.0).astype(np.float32).reshape(-1, 1, 8, 8), digits.target.astype(np.int64)
    if isinstance(cfg, DiabetesDataConfig):
        from sklearn.datasets import load_diabetes

        features, progression = load_diabetes(return_X_y=True)
        return features.astype(np.float32), progression.astype(np.float32).reshape(-1, 1)
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
        inputs, targets = archive[cfg.x_key], archive[cfg.y_key]
    if inputs.ndim < 2 or not _is_real(inputs):
        raise UserError(
            f"data.x_key={cfg.x_key!r}: the array in {path} must be real numbers shaped (N, ...), "
            f"got {inputs.dtype} {inputs.shape}"
        )
    if len(inputs) < 2:
        raise UserError(f"data.path: {path} holds {len(inputs)} sample(s); a train and a val split need at least 2")
    if not np.isfinite(inputs).all():
        raise UserError(f"data.x_key={cfg.x_key!r}: {path} holds NaN or infinite inputs")
    read = _class_ids if cfg.targets is TargetKind.classes else _float_targets
    return inputs.astype(np.float32), read(cfg, targets, num_samples=len(inputs), path=path)


def _class_ids(cfg: NpzDataConfig, labels: np.ndarray, *, num_samples: int, path: Path) -> np.ndarray:
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer) or len(labels) != num_samples:
        hint = (
            "; float targets need data.targets=values (or probabilities, for trainer.loss=bce)"
            if np.issubdtype(labels.dtype, np.floating)
            else ""
        )
        raise UserError(
            f"data.y_key={cfg.y_key!r}: the array in {path} must be integers shaped (N,) with N={num_samples} "
            f"as in {cfg.x_key!r}, got {labels.dtype} {labels.shape}{hint}"
        )
    if labels.min() < 0:
        raise UserError(f"data.y_key={cfg.y_key!r}: labels in {path} must be class ids >= 0, got {labels.min()}")
    return labels.astype(np.int64)


def _float_targets(cfg: NpzDataConfig, targets: np.ndarray, *, num_samples: int, path: Path) -> np.ndarray:
    """``targets`` as ``(N, k)`` float32; a ``(N,)`` array is one target per sample."""
    if targets.ndim not in (1, 2) or not _is_real(targets) or len(targets) != num_samples or targets.size == 0:
        raise UserError(
            f"data.y_key={cfg.y_key!r}: with data.targets={cfg.targets.value} the array in {path} must be real "
            f"numbers shaped (N,) or (N, k) with N={num_samples} as in {cfg.x_key!r}, got {targets.dtype} "
            f"{targets.shape}"
        )
    targets = targets.astype(np.float32).reshape(num_samples, -1)
    if not np.isfinite(targets).all():
        raise UserError(f"data.y_key={cfg.y_key!r}: {path} holds NaN or infinite targets")
    if cfg.targets is TargetKind.probabilities and not (0 <= targets.min() and targets.max() <= 1):
        raise UserError(
            f"data.y_key={cfg.y_key!r}: data.targets=probabilities needs targets in [0, 1], but {path} holds "
            f"[{targets.min():g}, {targets.max():g}]; use data.targets=values for unbounded targets"
        )
    return targets


def _is_real(array: np.ndarray) -> bool:
    return np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)
