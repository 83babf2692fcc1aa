"""Tests of dsink_jax.data.augment: statistics, crop/flip correctness, jit, batching."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsink_jax.data import augment

MEAN = np.array([0.4, 0.5, 0.6], np.float32)
STD = np.array([0.2, 0.25, 0.3], np.float32)


def _images(batch=16, height=6, width=5, channels=3, seed=0):
    shape = (batch, height, width, channels)
    return np.random.default_rng(seed).integers(1, 256, shape, dtype=np.uint8)


def test_channel_stats_matches_float_computation():
    images = _images(batch=7)
    mean, std = augment.channel_stats(images)
    as_float = images.astype(np.float64) / 255.0
    assert mean.dtype == np.float32 and mean.shape == (3,)
    np.testing.assert_allclose(mean, as_float.mean(axis=(0, 1, 2)), rtol=1e-6)
    np.testing.assert_allclose(std, as_float.std(axis=(0, 1, 2)), rtol=1e-6)


def test_normalize_hand_values():
    images = np.array([0, 51, 255], np.uint8).reshape(1, 1, 3, 1)
    out = augment.normalize(images, mean=np.array([0.5]), std=np.array([0.25]))
    np.testing.assert_allclose(np.asarray(out).ravel(), [-2.0, -1.2, 2.0], rtol=1e-6)
    assert out.dtype == jnp.float32


def test_no_crop_no_flip_equals_normalize():
    images = _images()
    out = augment.augment_batch(jax.random.key(0), images, mean=MEAN, std=STD, crop_padding=0,
                                flip=False)
    np.testing.assert_array_equal(out, augment.normalize(images, mean=MEAN, std=STD))


def test_flip_only_gives_original_or_mirrored_images_both_occurring():
    images = _images(batch=32)
    out = np.asarray(augment.augment_batch(jax.random.key(1), images, mean=MEAN, std=STD,
                                           crop_padding=0))
    plain = np.asarray(augment.normalize(images, mean=MEAN, std=STD))
    mirrored = plain[:, :, ::-1]
    is_plain = np.all(out == plain, axis=(1, 2, 3))
    is_mirrored = np.all(out == mirrored, axis=(1, 2, 3))
    assert np.all(is_plain | is_mirrored)
    assert is_plain.any() and is_mirrored.any()


def test_crop_is_a_window_of_the_zero_padded_image():
    pad = 2
    images = _images(batch=24)
    out = np.asarray(augment.augment_batch(jax.random.key(2), images, mean=MEAN, std=STD,
                                           crop_padding=pad, flip=False))
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))  # Zero pixels.
    expected = np.asarray(augment.normalize(padded, mean=MEAN, std=STD))
    offsets = set()
    for i in range(images.shape[0]):
        matches = [(dy, dx) for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)
                   if np.array_equal(out[i], expected[i, dy:dy + 6, dx:dx + 5])]
        # Pixels are >= 1, so a window is identified uniquely by where the zeros are.
        assert len(matches) == 1, i
        offsets.add(matches[0])
    assert len(offsets) > 5  # Offsets vary across the batch.


def test_determinism_shape_and_key_dependence():
    images = _images()
    a = augment.augment_batch(jax.random.key(3), images, mean=MEAN, std=STD)
    b = augment.augment_batch(jax.random.key(3), images, mean=MEAN, std=STD)
    c = augment.augment_batch(jax.random.key(4), images, mean=MEAN, std=STD)
    assert a.shape == images.shape and a.dtype == jnp.float32
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_jit_matches_eager_and_does_not_retrace():
    images = jnp.asarray(_images())

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(rng, batch):
        return augment.augment_batch(rng, batch, mean=MEAN, std=STD)

    for seed in range(3):
        key = jax.random.key(seed)
        np.testing.assert_allclose(
            step(key, images), augment.augment_batch(key, images, mean=MEAN, std=STD),
            rtol=1e-6, atol=1e-6)


def test_bad_inputs_raise():
    images = _images()
    key = jax.random.key(0)
    with pytest.raises(TypeError, match="uint8"):
        augment.augment_batch(key, images.astype(np.float32), mean=MEAN, std=STD)
    with pytest.raises(ValueError, match=r"mean must have shape \(3,\)"):
        augment.augment_batch(key, images, mean=MEAN[:2], std=STD)
    with pytest.raises(ValueError, match="std must be > 0"):
        augment.normalize(images, mean=MEAN, std=np.array([0.2, 0.0, 0.3]))
    with pytest.raises(ValueError, match="crop_padding.*-1"):
        augment.augment_batch(key, images, mean=MEAN, std=STD, crop_padding=-1)
    with pytest.raises(TypeError, match="uint8"):
        augment.channel_stats(images.astype(np.float32))
    with pytest.raises(ValueError, match=r"\(16, 6, 5\)"):
        augment.channel_stats(images[..., 0])


def test_epoch_batches_is_a_seeded_permutation_dropping_the_remainder():
    n, b = 103, 10
    batches = augment.epoch_batches(0, 0, n, b)
    assert batches.shape == (10, 10) and batches.dtype == np.int32
    flat = batches.ravel()
    assert np.unique(flat).size == flat.size and flat.min() >= 0 and flat.max() < n
    # Same (seed, epoch) -> same order (a resumed run); other epoch or seed -> another one.
    np.testing.assert_array_equal(batches, augment.epoch_batches(0, 0, n, b))
    assert not np.array_equal(batches, augment.epoch_batches(0, 1, n, b))
    assert not np.array_equal(batches, augment.epoch_batches(1, 0, n, b))
    # Exactly n % b examples are dropped, and not always the same ones.
    dropped = [set(range(n)) - set(augment.epoch_batches(0, e, n, b).ravel()) for e in range(4)]
    assert all(len(d) == 3 for d in dropped) and len(set.union(*dropped)) > 3
    # Not the identity order.
    assert not np.array_equal(flat, np.arange(100))


def test_epoch_batches_bad_inputs_raise():
    with pytest.raises(ValueError, match="batch_size=20 exceeds num_examples=10"):
        augment.epoch_batches(0, 0, 10, 20)
    with pytest.raises(ValueError, match="batch_size must be a positive int, got 0"):
        augment.epoch_batches(0, 0, 10, 0)
    with pytest.raises(ValueError, match="epoch"):
        augment.epoch_batches(0, -1, 10, 2)
