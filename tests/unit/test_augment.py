"""data.augment: each change does what it says, and every sample's change is a function of (seed, epoch, id)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from orchestrator.config.schema import (
    AugmentConfig,
    DiabetesDataConfig,
    DigitsDataConfig,
    NpzDataConfig,
    SampleKind,
    SyntheticDataConfig,
)
from orchestrator.data import load_data, prepare_data
from orchestrator.data.augment import Augmenter, check_augment
from orchestrator.data.sampler import Draw
from orchestrator.errors import UserError


def images(batch: int = 6, *, channels: int = 2, size: int = 8) -> torch.Tensor:
    return torch.randn(batch, channels, size, size, generator=torch.Generator().manual_seed(0))


def draw(ids, *, epoch: int = 0, seed: int = 1) -> Draw:
    ids = np.asarray(ids, dtype=np.int64)
    return Draw(ids=ids, epochs=np.full(len(ids), epoch, dtype=np.int64), seed=seed)


EVERYTHING = AugmentConfig(crop_padding=1, flip=True, rotate_degrees=15, noise_std=0.1)


def test_a_samples_change_depends_on_seed_epoch_and_id_only():
    augment, x = Augmenter(EVERYTHING), images()
    first = augment(x, draw([0, 1, 2, 3, 4, 5]))
    assert torch.equal(first, augment(x, draw([0, 1, 2, 3, 4, 5])))
    # The same sample, wherever it sits in whatever micro-batch (another rank, another micro-batch size).
    reordered = augment(x[[5, 2]], draw([5, 2]))
    assert torch.equal(reordered[0], first[5]) and torch.equal(reordered[1], first[2])
    assert not torch.equal(first, augment(x, draw([0, 1, 2, 3, 4, 5], epoch=1)))
    assert not torch.equal(first, augment(x, draw([0, 1, 2, 3, 4, 5], seed=2)))


def test_inputs_are_left_as_they_are():
    x = images()
    before = x.clone()
    Augmenter(EVERYTHING)(x, draw(range(6)))
    assert torch.equal(x, before)


def test_crop_padding_shifts_each_image_filling_with_its_edge_pixels():
    x = images(batch=32)
    out = Augmenter(AugmentConfig(crop_padding=1))(x, draw(range(32)))
    padded = F.pad(x, (1, 1, 1, 1), mode="replicate")
    shifts = set()
    for b in range(32):
        matches = [
            (dy, dx)
            for dy in range(3)
            for dx in range(3)
            if torch.equal(out[b], padded[b, :, dy : dy + 8, dx : dx + 8])
        ]
        assert matches, f"image {b} is not a shift of its input"
        shifts.add(matches[0])
    assert len(shifts) > 3  # the shifts vary


def test_flip_mirrors_about_half_of_the_images_and_only_when_asked():
    x = images(batch=40)
    out = Augmenter(AugmentConfig(flip=True))(x, draw(range(40)))
    flipped = [torch.equal(out[b], x[b].flip(-1)) for b in range(40)]
    assert all(flipped[b] or torch.equal(out[b], x[b]) for b in range(40))
    assert 8 <= sum(flipped) <= 32
    rotated_only = Augmenter(AugmentConfig(rotate_degrees=1e-4))(x, draw(range(40)))
    assert torch.allclose(rotated_only, x, atol=1e-3)  # no flip without flip=true


def test_rotation_turns_the_image_about_its_centre():
    # A horizontal bar through the centre, rotated by up to 90 degrees, is no longer the same bar.
    bar = torch.zeros(16, 1, 9, 9)
    bar[:, :, 4, :] = 1.0
    out = Augmenter(AugmentConfig(rotate_degrees=90))(bar, draw(range(16)))
    assert out.shape == bar.shape
    assert torch.allclose(out[:, :, 4, 4], torch.ones(16))  # the centre stays
    assert (out - bar).abs().amax(dim=(1, 2, 3)).gt(0.1).sum() >= 12


def test_noise_has_the_configured_scale():
    x = torch.zeros(64, 1, 8, 8)
    out = Augmenter(AugmentConfig(noise_std=0.5))(x, draw(range(64)))
    assert abs(out.std().item() - 0.5) < 0.03 and abs(out.mean().item()) < 0.03


def test_turning_noise_on_leaves_the_other_changes_draws_alone():
    x = images(batch=16)
    moved = Augmenter(AugmentConfig(crop_padding=1, flip=True))(x, draw(range(16)))
    noisy = Augmenter(AugmentConfig(crop_padding=1, flip=True, noise_std=1e-6))(x, draw(range(16)))
    assert torch.allclose(moved, noisy, atol=1e-4)


def test_feature_vectors_take_noise_only():
    check_augment(AugmentConfig(noise_std=0.1), (10,))
    diabetes = load_data(DiabetesDataConfig(augment=AugmentConfig(noise_std=0.1)))
    noisy, clean = diabetes.train_batch(draw(range(4)))[0], diabetes.train.get_batch(np.arange(4))[0]
    assert noisy.shape == (4, 10) and 0 < (noisy - clean).abs().max() < 1
    for cfg in (AugmentConfig(flip=True), AugmentConfig(crop_padding=1), AugmentConfig(rotate_degrees=5)):
        with pytest.raises(UserError, match=r"^data\.augment\.crop_padding, flip and rotate_degrees need images"):
            check_augment(cfg, (10,))
    with pytest.raises(UserError, match=r"^data\.augment\.crop_padding=8 must be smaller .* \(8 x 8\)"):
        check_augment(AugmentConfig(crop_padding=8), (1, 8, 8))


def test_the_schema_checks_the_settings():
    assert not AugmentConfig().enabled and AugmentConfig(noise_std=0.1).enabled
    for bad, message in (
        (dict(crop_padding=-1), "data.augment.crop_padding must be >= 0"),
        (dict(rotate_degrees=200), r"data.augment.rotate_degrees must be in \[0, 180\]"),
        (dict(noise_std=float("inf")), "data.augment.noise_std must be >= 0 and finite"),
    ):
        with pytest.raises(ValueError, match=message):
            AugmentConfig(**bad)
    with pytest.raises(ValueError, match="data.augment applies to images and feature vectors; data.kind=tokens"):
        SyntheticDataConfig(kind=SampleKind.tokens, augment=AugmentConfig(flip=True))


def test_only_training_batches_are_augmented():
    plain = load_data(DigitsDataConfig())
    assert plain.augment is None
    augmented = load_data(DigitsDataConfig(augment=AugmentConfig(crop_padding=1, noise_std=0.1)))
    batch = draw(range(8))
    assert torch.equal(plain.train_batch(batch)[0], plain.train.get_batch(batch.ids)[0])
    inputs, labels = augmented.train_batch(batch)
    assert not torch.equal(inputs, plain.train.get_batch(batch.ids)[0])
    assert torch.equal(labels, plain.train.get_batch(batch.ids)[1])
    ids = np.arange(len(plain.val))
    assert all(torch.equal(a, b) for a, b in zip(augmented.val.get_batch(ids), plain.val.get_batch(ids)))


def test_synthetic_images_are_augmented_and_npz_vectors_refuse_spatial_changes(tmp_path):
    cfg = SyntheticDataConfig(
        kind=SampleKind.images, num_samples=8, image_shape=[3, 6, 6], augment=AugmentConfig(flip=True)
    )
    bundle = load_data(cfg)
    assert bundle.augment is not None and bundle.train_batch(draw(range(8)))[0].shape == (8, 3, 6, 6)
    np.savez(tmp_path / "v.npz", x=np.zeros((10, 4), dtype=np.float32), y=np.arange(10) % 2)
    with pytest.raises(UserError, match="samples are shaped \\(4,\\): only data.augment.noise_std applies"):
        prepare_data(NpzDataConfig(path=str(tmp_path / "v.npz"), augment=AugmentConfig(flip=True)))
