"""data=synthetic: random tokens or random labelled images, for benchmarks that must not wait on data."""

from __future__ import annotations

import numpy as np
import torch

from orchestrator.config.schema import SampleKind, SyntheticDataConfig
from orchestrator.data.augment import Augmenter, check_augment
from orchestrator.data.base import DataBundle
from orchestrator.data.spec import DataSpec

# Fixed, not the run's seed: every run and every worker sees the same samples, so runs compare.
_SEED = 0x5EED
_TRAIN_SPLIT, _VAL_SPLIT = 0, 1
_MAX_VAL_SAMPLES = 256


class SyntheticDataset:
    """Sample ``i`` of a split is drawn from its own generator, seeded with ``(seed, split, i)``.

    Nothing is stored, so a huge ``num_samples`` costs no memory, and a sample is the same whichever
    rank or batch asks for it. Seeding a generator costs ~45 us, ~1.5 ms for a batch of 32: small
    next to a training step.

    Args:
        cfg: The synthetic data config: kind, seq_len and vocab_size, or image_shape and num_classes.
        split: Which split, so train and val samples differ.
        num_samples: The split's length.
    """

    def __init__(self, cfg: SyntheticDataConfig, *, split: int, num_samples: int) -> None:
        self.cfg = cfg
        self.split = split
        self.num_samples = num_samples

    def __len__(self) -> int:
        return self.num_samples

    def get_batch(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens: int64 inputs and targets ``(B, seq_len)``. Images: float32 ``(B, C, H, W)`` and int64 labels."""
        indices = np.asarray(indices, dtype=np.int64)
        if indices.size and not 0 <= indices.min() <= indices.max() < self.num_samples:
            raise IndexError(f"sample ids must be in [0, {self.num_samples}), got [{indices.min()}, {indices.max()}]")
        generators = [np.random.default_rng([_SEED, self.split, int(i)]) for i in indices]
        cfg = self.cfg
        if cfg.kind is SampleKind.tokens:
            windows = torch.from_numpy(np.stack([g.integers(0, cfg.vocab_size, cfg.seq_len + 1) for g in generators]))
            return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()
        labels = np.array([g.integers(0, cfg.num_classes) for g in generators], dtype=np.int64)
        images = np.stack([g.standard_normal(cfg.image_shape, dtype=np.float32) for g in generators])
        return torch.from_numpy(images), torch.from_numpy(labels)


def prepare(cfg: SyntheticDataConfig) -> DataSpec:
    """The spec; nothing to build, since samples are generated when asked for.

    Args:
        cfg: The synthetic data config.
    """
    if cfg.kind is SampleKind.tokens:
        return DataSpec(kind=SampleKind.tokens, vocab_size=cfg.vocab_size, seq_len=cfg.seq_len)
    check_augment(cfg.augment, tuple(cfg.image_shape))
    return DataSpec(kind=SampleKind.images, input_shape=tuple(cfg.image_shape), num_classes=cfg.num_classes)


def load(cfg: SyntheticDataConfig) -> DataBundle:
    """``num_samples`` train samples and a separate val set of up to 256; images augmented per ``data.augment``.

    Args:
        cfg: The synthetic data config.
    """
    return DataBundle(
        spec=prepare(cfg),
        train=SyntheticDataset(cfg, split=_TRAIN_SPLIT, num_samples=cfg.num_samples),
        val=SyntheticDataset(cfg, split=_VAL_SPLIT, num_samples=min(cfg.num_samples, _MAX_VAL_SAMPLES)),
        augment=Augmenter(cfg.augment) if cfg.augment.enabled else None,
    )
