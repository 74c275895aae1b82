"""The train stream: every sample once per epoch across ranks, exact resume at any world size."""

from __future__ import annotations

import json

import numpy as np
import pytest

from orchestrator.data.sampler import StreamSampler, eval_indices


def make_ranks(num_samples: int, *, world_size: int, micro_batch_size: int, seed: int = 7) -> list[StreamSampler]:
    return [
        StreamSampler(num_samples, micro_batch_size=micro_batch_size, rank=rank, world_size=world_size, seed=seed)
        for rank in range(world_size)
    ]


def global_steps(samplers: list[StreamSampler], steps: int) -> list[np.ndarray]:
    """Per micro-step, the ranks' batches concatenated in rank order: the global batch."""
    return [np.concatenate([s.next_draw().ids for s in samplers]) for _ in range(steps)]


@pytest.mark.parametrize("world_size", [2, 3])
def test_one_epoch_covers_every_sample_once_with_disjoint_ranks(world_size):
    num_samples, micro_batch_size = 60, 5  # 60 = 2 * 6 * 5 = 3 * 4 * 5: whole micro-steps per epoch
    samplers = make_ranks(num_samples, world_size=world_size, micro_batch_size=micro_batch_size)
    seen = []
    for _ in range(num_samples // (micro_batch_size * world_size)):
        batches = [s.next_draw().ids for s in samplers]
        assert all(len(b) == micro_batch_size for b in batches)
        step_ids = np.concatenate(batches)
        assert len(set(step_ids.tolist())) == len(step_ids), "two ranks read the same sample in one micro-step"
        seen.extend(step_ids.tolist())
    assert sorted(seen) == list(range(num_samples))
    assert all(s.epoch == 1 for s in samplers)


def test_epochs_are_different_permutations():
    (sampler,) = make_ranks(50, world_size=1, micro_batch_size=50)
    first, second = sampler.next_draw().ids, sampler.next_draw().ids
    assert sorted(first.tolist()) == sorted(second.tolist()) == list(range(50))
    assert not np.array_equal(first, second)


def test_same_seed_same_stream_other_seed_other_stream():
    a, b, c = (make_ranks(40, world_size=1, micro_batch_size=8, seed=s)[0] for s in (1, 1, 2))
    assert np.array_equal(a.next_draw().ids, b.next_draw().ids)
    assert not np.array_equal(a.next_draw().ids, c.next_draw().ids)


def test_no_shuffle_reads_in_order():
    sampler = StreamSampler(6, micro_batch_size=4, rank=0, world_size=1, seed=0, shuffle=False)
    assert sampler.next_draw().ids.tolist() == [0, 1, 2, 3]
    assert sampler.next_draw().ids.tolist() == [4, 5, 0, 1]


def test_resume_mid_epoch_continues_identically():
    reference = make_ranks(37, world_size=2, micro_batch_size=4)
    expected = global_steps(reference, 20)

    first = make_ranks(37, world_size=2, micro_batch_size=4)
    got = global_steps(first, 3)
    state = json.loads(json.dumps(first[0].state_dict()))  # checkpoints store it as JSON
    assert state == {"cursor": 24, "num_samples": 37, "seed": 7}
    resumed = make_ranks(37, world_size=2, micro_batch_size=4, seed=999)  # the checkpoint's seed wins
    for sampler in resumed:
        sampler.load_state_dict(state)
    got += global_steps(resumed, 17)
    for step, (a, b) in enumerate(zip(expected, got)):
        assert np.array_equal(a, b), f"micro-step {step} differs after resume"


def test_resume_at_another_world_size_continues_the_global_stream():
    """World 2 with micro-batch 4 and world 1 with micro-batch 8 read the same positions per micro-step:
    the concatenation of rank 0's and rank 1's batches at world 2 is the world-1 batch. So a checkpoint
    taken at world 2 resumes at world 1 on the same global stream, and the other way round."""
    num_samples = 30
    (single,) = make_ranks(num_samples, world_size=1, micro_batch_size=8)
    expected = global_steps([single], 12)  # crosses three epoch boundaries

    pair = make_ranks(num_samples, world_size=2, micro_batch_size=4)
    got = global_steps(pair, 5)
    (resumed,) = make_ranks(num_samples, world_size=1, micro_batch_size=8)
    resumed.load_state_dict(pair[1].state_dict())
    got += global_steps([resumed], 4)
    back = make_ranks(num_samples, world_size=2, micro_batch_size=4)
    for sampler in back:
        sampler.load_state_dict(resumed.state_dict())
    got += global_steps(back, 3)
    for step, (a, b) in enumerate(zip(expected, got)):
        assert np.array_equal(a, b), f"micro-step {step} differs"

    # Keeping micro-batch 4 at world 1 (twice the accumulation) reads the same stream in halves.
    (halves,) = make_ranks(num_samples, world_size=1, micro_batch_size=4)
    assert np.array_equal(np.concatenate(global_steps([halves], 2)), expected[0])


def test_micro_batch_straddling_an_epoch_boundary():
    num_samples = 10
    samplers = make_ranks(num_samples, world_size=2, micro_batch_size=3)  # 6 per step: step 1 spans epochs 0, 1
    steps = global_steps(samplers, 5)  # 30 positions = 3 whole epochs
    stream = np.concatenate(steps)
    epochs = stream.reshape(3, num_samples)
    for epoch in epochs:
        assert sorted(epoch.tolist()) == list(range(num_samples))
    assert not np.array_equal(epochs[0], epochs[1])
    assert [s.epoch for s in samplers] == [3, 3]


def test_micro_batch_larger_than_the_dataset():
    (sampler,) = make_ranks(3, world_size=1, micro_batch_size=7)
    batch = sampler.next_draw().ids
    assert len(batch) == 7
    assert sorted(batch[:3].tolist()) == sorted(batch[3:6].tolist()) == [0, 1, 2]


def test_draws_name_each_samples_epoch_and_the_streams_seed():
    """What per-sample randomness (augmentation) is keyed on: a micro-batch straddling two epochs says which
    sample came from which, and a resumed sampler draws the same (id, epoch) pairs under the checkpoint's seed."""
    (sampler,) = make_ranks(10, world_size=1, micro_batch_size=4, seed=5)
    draws = [sampler.next_draw() for _ in range(5)]  # 20 positions: epochs 0 and 1
    assert [d.epochs.tolist() for d in draws] == [[0] * 4, [0] * 4, [0, 0, 1, 1], [1] * 4, [1] * 4]
    assert all(d.seed == 5 for d in draws)
    for epoch in (0, 1):
        ids = np.concatenate([d.ids[d.epochs == epoch] for d in draws])
        assert sorted(ids.tolist()) == list(range(10))

    (fresh,) = make_ranks(10, world_size=1, micro_batch_size=4, seed=99)
    restart = make_ranks(10, world_size=1, micro_batch_size=4, seed=5)[0]
    for _ in range(2):
        restart.next_draw()
    fresh.load_state_dict(restart.state_dict())
    for expected in draws[2:]:
        got = fresh.next_draw()
        assert (got.ids.tolist(), got.epochs.tolist(), got.seed) == (expected.ids.tolist(), expected.epochs.tolist(), 5)


def test_resume_on_changed_data_is_refused():
    (sampler,) = make_ranks(40, world_size=1, micro_batch_size=8)
    state = sampler.state_dict()
    (other,) = make_ranks(41, world_size=1, micro_batch_size=8)
    with pytest.raises(ValueError, match="data changed"):
        other.load_state_dict(state)


def test_eval_indices_are_fixed_sharded_and_wrap():
    per_rank = [eval_indices(10, batches=2, micro_batch_size=3, rank=r, world_size=2) for r in range(2)]
    assert [b.tolist() for b in per_rank[0]] == [[0, 1, 2], [6, 7, 8]]
    assert [b.tolist() for b in per_rank[1]] == [[3, 4, 5], [9, 0, 1]]
    assert all(
        np.array_equal(a, b)
        for a, b in zip(per_rank[0], eval_indices(10, batches=2, micro_batch_size=3, rank=0, world_size=2))
    )
