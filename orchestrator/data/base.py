"""What every data source hands the training loop: a map-style dataset per split, and the spec."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from orchestrator.data.spec import DataSpec

if TYPE_CHECKING:
    import numpy as np
    import torch


class Dataset(Protocol):
    """Map-style dataset indexed by sample id; every worker holds its own (cheap) copy.

    ``get_batch`` returns CPU tensors. Tokens: ``(B, seq_len)`` int64 inputs and ``(B, seq_len)`` int64
    targets (the inputs shifted by one). Images: ``(B, *input_shape)`` float32 and ``(B,)`` int64 labels.
    """

    def __len__(self) -> int: ...

    def get_batch(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]: ...


@dataclass(frozen=True)
class DataBundle:
    """The train and val splits of one data config, with the spec the model is built from."""

    spec: DataSpec
    train: Dataset
    val: Dataset
