"""What every data source hands the training loop: a map-style dataset per split, and the spec."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from orchestrator.data.spec import DataSpec

if TYPE_CHECKING:
    import numpy as np
    import torch

    from orchestrator.data.augment import Augmenter
    from orchestrator.data.sampler import Draw


class Dataset(Protocol):
    """Map-style dataset indexed by sample id; every worker holds its own (cheap) copy.

    ``get_batch`` returns CPU tensors. Tokens: ``(B, seq_len)`` int64 inputs and ``(B, seq_len)`` int64
    targets (the inputs shifted by one). Images and feature vectors: ``(B, *input_shape)`` float32 inputs,
    and ``(B,)`` int64 class ids or ``(B, target_dim)`` float32 targets.
    """

    def __len__(self) -> int: ...

    def get_batch(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]: ...


@dataclass(frozen=True)
class DataBundle:
    """The train and val splits of one data config, with the spec the model is built from.

    ``augment`` (``data.augment``) changes training batches only: ``val`` is served as it is.
    """

    spec: DataSpec
    train: Dataset
    val: Dataset
    augment: Augmenter | None = None

    def train_batch(self, draw: Draw) -> tuple[torch.Tensor, torch.Tensor]:
        """The training micro-batch the sampler drew, augmented when the data config asks for it."""
        inputs, targets = self.train.get_batch(draw.ids)
        if self.augment is not None:
            inputs = self.augment(inputs, draw)
        return inputs, targets
