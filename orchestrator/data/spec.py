"""The contract between data and models: what one sample looks like.

Each dataset describes its samples with a ``DataSpec``; the model registry builds the model for it (vocabulary
size, sequence length, input shape, number of outputs), the loop picks and checks its loss with it, and the
throughput meter counts tokens with it.
"""

from __future__ import annotations

from dataclasses import dataclass

from orchestrator.config.schema import SampleKind, TargetKind
from orchestrator.errors import UserError


@dataclass(frozen=True, kw_only=True)
class DataSpec:
    """What a dataset yields, which is what a model is built for."""

    kind: SampleKind
    vocab_size: int | None = None  # tokens: token ids are in [0, vocab_size)
    seq_len: int | None = None  # tokens: inputs and targets are (B, seq_len) int64
    input_shape: tuple[int, ...] | None = None  # images: one sample's shape, (C, H, W) or (D,)
    targets: TargetKind = TargetKind.classes  # images: class ids, or float targets
    num_classes: int | None = None  # images, targets=classes: (B,) int64 in [0, num_classes)
    target_dim: int | None = None  # images, float targets: (B, target_dim) float32

    def __post_init__(self) -> None:
        # Checked here once, so that no model builder has to handle a half-described dataset.
        if self.kind is SampleKind.tokens:
            if not (self.vocab_size and self.vocab_size > 0 and self.seq_len and self.seq_len > 0):
                raise ValueError(
                    f"DataSpec(kind=tokens) needs vocab_size > 0 and seq_len > 0, "
                    f"got vocab_size={self.vocab_size}, seq_len={self.seq_len}"
                )
            if self.targets is not TargetKind.classes:
                raise ValueError(
                    f"DataSpec(kind=tokens) has class-id targets (the next token), got {self.targets.value}"
                )
            return
        shape = self.input_shape
        if not (isinstance(shape, tuple) and shape and all(size > 0 for size in shape)):
            raise ValueError(
                f"DataSpec(kind=images) needs input_shape, a non-empty tuple of positive sizes, "
                f"got input_shape={self.input_shape}"
            )
        if self.targets is TargetKind.classes:
            if not (self.num_classes and self.num_classes > 0 and self.target_dim is None):
                raise ValueError(
                    f"DataSpec(targets=classes) needs num_classes > 0 and no target_dim, "
                    f"got num_classes={self.num_classes}, target_dim={self.target_dim}"
                )
        elif not (self.target_dim and self.target_dim > 0 and self.num_classes is None):
            raise ValueError(
                f"DataSpec(targets={self.targets.value}) needs target_dim > 0 and no num_classes, "
                f"got target_dim={self.target_dim}, num_classes={self.num_classes}"
            )

    @property
    def tokens_per_sample(self) -> int:
        """Targets per sample, the unit of throughput: ``seq_len`` for tokens, 1 for images."""
        if self.kind is not SampleKind.tokens:
            return 1
        assert self.seq_len is not None  # token data has one (__post_init__)
        return self.seq_len

    @property
    def num_outputs(self) -> int:
        """What an image or vector model outputs per sample: a logit per class, or one value per float target."""
        assert self.kind is SampleKind.images, "token models output a logit per vocabulary entry"
        outputs = self.num_classes if self.targets is TargetKind.classes else self.target_dim
        assert outputs is not None  # the one of the two these targets need (__post_init__)
        return outputs

    def model_vocab_size(self, requested: int | None, *, key: str) -> int:
        """The vocabulary a token model is built with: ``requested`` if set (never smaller than the data's).

        Args:
            requested: the model config's own vocabulary size, or None for the data's.
            key: the config key ``requested`` came from, for the error.
        """
        assert self.vocab_size is not None, "only token data has a vocabulary"
        vocab_size = requested or self.vocab_size
        if vocab_size < self.vocab_size:
            raise UserError(f"{key}={vocab_size} is smaller than the data's vocabulary ({self.vocab_size})")
        return vocab_size
