"""Which sample ids each rank reads: one resumable stream, the same at every world size.

The train set is read as one endless stream: epoch ``e`` is a permutation of all ``N`` sample ids,
drawn from a generator seeded with ``(seed, e)``, and the stream is epoch 0's permutation, then
epoch 1's, and so on. A micro-step consumes ``micro_batch_size * world_size`` consecutive stream
positions and rank ``r`` takes the ``r``-th run of ``micro_batch_size`` of them. The whole state is
``cursor``, the number of positions all ranks have consumed together. So:

- every sample is used exactly once per epoch across all ranks, and nothing is dropped or padded
  (a micro-batch may straddle two epochs);
- a checkpoint taken at one world size resumes at another on the same stream: one micro-step at
  world 2 with micro-batch 4 reads the same 8 positions (rank 0's 4, then rank 1's) as one
  micro-step at world 1 with micro-batch 8, or two at world 1 with micro-batch 4.

Each draw says which epoch every sample came from, so that per-sample randomness (augmentation)
can be keyed on ``(seed, epoch, sample id)``: a function of the stream, restored with it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Draw:
    """One rank's micro-batch from the stream: the sample ids, the epoch each was drawn in, and the stream's seed."""

    ids: np.ndarray
    epochs: np.ndarray
    seed: int


class StreamSampler:
    """This rank's share of the shuffled, endless stream of train sample ids.

    Args:
        num_samples: ``N``, the length of the train set.
        micro_batch_size: Samples per rank per micro-step.
        rank: This worker's rank.
        world_size: The number of data-parallel ranks.
        seed: The run's seed; with the epoch it fixes each epoch's order.
        shuffle: False reads every epoch in id order.
    """

    def __init__(
        self, num_samples: int, *, micro_batch_size: int, rank: int, world_size: int, seed: int, shuffle: bool = True
    ) -> None:
        if num_samples < 1:
            raise ValueError(f"the train split holds no samples (num_samples={num_samples})")
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.num_samples = num_samples
        self.micro_batch_size = micro_batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.shuffle = shuffle
        self.cursor = 0
        # The current epoch's permutation, and the next one while a micro-step straddles the two.
        self._permutations: dict[int, np.ndarray] = {}

    @property
    def epoch(self) -> int:
        """The epoch the next micro-step starts in."""
        return self.cursor // self.num_samples

    def next_draw(self) -> Draw:
        """This rank's ``micro_batch_size`` samples for the next micro-step; advances the cursor for all ranks."""
        ids, epochs = self._take(self.cursor + self.rank * self.micro_batch_size, self.micro_batch_size)
        self.cursor += self.micro_batch_size * self.world_size
        for epoch in [e for e in self._permutations if e < self.epoch]:
            del self._permutations[epoch]
        return Draw(ids=ids, epochs=epochs, seed=self.seed)

    def state_dict(self) -> dict:
        """The position in the stream, JSON-serializable: ``{"cursor", "num_samples", "seed"}``."""
        return {"cursor": self.cursor, "num_samples": self.num_samples, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        """Continue the stream a checkpoint was taken at, at any world size or micro-batch size.

        The checkpoint's seed replaces this sampler's, so the resumed run reads the same stream.

        Args:
            state: What ``state_dict`` returned.

        Raises:
            ValueError: The checkpoint was taken on a train set of a different length (the data changed).
        """
        if state["num_samples"] != self.num_samples:
            raise ValueError(
                f"the checkpoint's train set had {state['num_samples']} samples, this one has {self.num_samples}: "
                f"the data changed since the checkpoint was taken"
            )
        self.cursor = int(state["cursor"])
        self.seed = int(state["seed"])
        self._permutations.clear()

    def _take(self, start: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """The sample ids at ``count`` stream positions from ``start``, and the epoch of each."""
        pieces: list[np.ndarray] = []
        epochs: list[np.ndarray] = []
        while count:
            epoch, offset = divmod(start, self.num_samples)
            taken = min(count, self.num_samples - offset)
            pieces.append(self._permutation(epoch)[offset : offset + taken])
            epochs.append(np.full(taken, epoch, dtype=np.int64))
            start, count = start + taken, count - taken
        return np.concatenate(pieces), np.concatenate(epochs)

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._permutations:
            if self.shuffle:
                generator = torch.Generator()
                # Modulo 2**64: manual_seed takes at most 64 bits, whatever the run's seed.
                generator.manual_seed((self.seed * 1_000_003 + epoch) % 2**64)
                order = torch.randperm(self.num_samples, generator=generator).numpy()
            else:
                order = np.arange(self.num_samples)
            self._permutations[epoch] = order
        return self._permutations[epoch]


def eval_indices(
    num_samples: int, *, batches: int, micro_batch_size: int, rank: int, world_size: int
) -> list[np.ndarray]:
    """This rank's micro-batches of val sample ids: the same on every run, so eval losses compare.

    The first ``batches * micro_batch_size * world_size`` val ids in order, cut into micro-steps as
    training cuts the stream (rank ``r`` takes the ``r``-th run of ``micro_batch_size``), wrapping
    around to id 0 when the val set is smaller.

    Args:
        num_samples: The length of the val set.
        batches: Micro-steps to evaluate.
        micro_batch_size: Samples per rank per micro-step.
        rank: This worker's rank.
        world_size: The number of data-parallel ranks.
    """
    if num_samples < 1:
        raise ValueError(f"the val split holds no samples (num_samples={num_samples})")
    step = micro_batch_size * world_size
    first = rank * micro_batch_size
    return [np.arange(b * step + first, b * step + first + micro_batch_size) % num_samples for b in range(batches)]
