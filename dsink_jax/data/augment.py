"""Augmentation and batching: random crop (zero padding), horizontal flip, normalisation.

The image functions are pure JAX and jittable, so the train step can augment on device: a
CIFAR-scale uint8 training set fits in device memory, and a batch is gathered there with
``x_train[batch_indices]``; no host pipeline sits on the hot path. Batch order comes from
:func:`epoch_batches` (numpy, seeded by ``(seed, epoch)``).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from dsink_jax.data.long_tail import check_seed
from dsink_jax.data.long_tail import is_int

_BATCH_STREAM = 0x4254


def channel_stats(images_uint8) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and standard deviation on the [0, 1] scale.

    Exact (from a 256-bin histogram per channel), with no float copy of the images.

    Args:
      images_uint8: uint8 [N, H, W, C] images.

    Returns:
      ``(mean, std)``, each float32 [C]; std is the population standard deviation.
    """
    images = np.asarray(images_uint8)
    if images.dtype != np.uint8:
        raise TypeError(f"images must be uint8, got dtype {images.dtype}.")
    if images.ndim != 4 or images.size == 0:
        raise ValueError(f"images must be a non-empty [N, H, W, C] array, got shape {images.shape}.")
    values = np.arange(256, dtype=np.float64) / 255.0
    means, stds = [], []
    for c in range(images.shape[-1]):
        hist = np.bincount(images[..., c].ravel(), minlength=256).astype(np.float64)
        weights = hist / hist.sum()
        mean = weights @ values
        means.append(mean)
        stds.append(np.sqrt(weights @ (values - mean) ** 2))
    return np.asarray(means, np.float32), np.asarray(stds, np.float32)


def _check_images(images) -> None:
    if images.dtype != jnp.uint8 or images.ndim != 4:
        raise TypeError(
            f"images must be uint8 [B, H, W, C], got dtype {images.dtype} and shape "
            f"{images.shape}.")


def _check_stats(mean, std, channels: int) -> tuple[jnp.ndarray, jnp.ndarray]:
    for what, value in (("mean", mean), ("std", std)):
        if np.shape(value) not in ((channels,), ()):
            raise ValueError(
                f"{what} must have shape ({channels},) (one per channel) or be a scalar, got shape "
                f"{np.shape(value)}.")
    # Concrete std can be checked before any work; a traced one is the caller's contract.
    try:
        std_values = np.asarray(std, np.float64)
    except jax.errors.TracerArrayConversionError:
        std_values = None
    if std_values is not None and np.any(std_values <= 0):
        raise ValueError(f"std must be > 0 in every channel, got {std_values.tolist()}.")
    return jnp.asarray(mean, jnp.float32), jnp.asarray(std, jnp.float32)


def normalize(images_uint8, *, mean, std) -> jnp.ndarray:
    """``(x / 255 - mean) / std`` per channel.

    Args:
      images_uint8: uint8 [..., H, W, C] images.
      mean: float [C] channel means on the [0, 1] scale (see :func:`channel_stats`).
      std: float [C] channel standard deviations on the [0, 1] scale.

    Returns:
      float32 array of the images' shape.
    """
    images = jnp.asarray(images_uint8)
    if images.dtype != jnp.uint8:
        raise TypeError(f"images must be uint8, got dtype {images.dtype}.")
    mean, std = _check_stats(mean, std, images.shape[-1])
    return _normalize(images, mean, std)


@jax.jit
def _normalize(images, mean, std):
    return (images.astype(jnp.float32) / 255.0 - mean) / std


def augment_batch(rng, images_uint8, *, mean, std, crop_padding: int = 4,
                  flip: bool = True) -> jnp.ndarray:
    """Random crop after zero padding, random horizontal flip, then :func:`normalize`.

    The crop pads each side with ``crop_padding`` zero pixels (as torchvision's
    ``RandomCrop(padding=4)`` before ``Normalize``) and takes an H x W window at an offset
    drawn uniformly from ``{0, ..., 2 * crop_padding}^2`` per image; each image is flipped left
    to right with probability 1/2. Deterministic in ``rng``. Jit with
    ``static_argnames=("crop_padding", "flip")``.

    Args:
      rng: a JAX PRNG key.
      images_uint8: uint8 [B, H, W, C] images.
      mean: float [C] channel means on the [0, 1] scale.
      std: float [C] channel standard deviations on the [0, 1] scale.
      crop_padding: non-negative int; 0 disables the crop.
      flip: whether to flip at random.

    Returns:
      float32 [B, H, W, C] augmented, normalised images.
    """
    images = jnp.asarray(images_uint8)
    _check_images(images)
    if not is_int(crop_padding) or crop_padding < 0:
        raise ValueError(f"crop_padding must be a non-negative int, got {crop_padding!r}.")
    if not isinstance(flip, (bool, np.bool_)):
        raise TypeError(f"flip must be a bool, got {flip!r}.")
    mean, std = _check_stats(mean, std, images.shape[-1])
    return _augment(rng, images, mean, std, crop_padding=int(crop_padding), flip=bool(flip))


# Validation above runs in Python on every call; the work is jitted here so that eager calls
# (and tests) do not dispatch op by op. Inside a caller's jit this is simply inlined.
@functools.partial(jax.jit, static_argnames=("crop_padding", "flip"))
def _augment(rng, images, mean, std, *, crop_padding, flip):
    batch, height, width, channels = images.shape
    crop_rng, flip_rng = jax.random.split(rng)
    if crop_padding:
        pad = crop_padding
        padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
        offsets = jax.random.randint(crop_rng, (batch, 2), 0, 2 * pad + 1)

        def crop(image, offset):
            return jax.lax.dynamic_slice(image, (offset[0], offset[1], 0),
                                         (height, width, channels))

        images = jax.vmap(crop)(padded, offsets)
    if flip:
        flips = jax.random.bernoulli(flip_rng, 0.5, (batch,))
        images = jnp.where(flips[:, None, None, None], images[:, :, ::-1, :], images)
    return _normalize(images, mean, std)


def epoch_batches(seed: int, epoch: int, num_examples: int, batch_size: int) -> np.ndarray:
    """Batch indices of one epoch: a fresh seeded permutation, the last partial batch dropped.

    The permutation depends only on ``(seed, epoch)``, so a run resumed at an epoch sees the
    same order as an uninterrupted one. The ``num_examples % batch_size`` examples left at the
    end of the permutation are dropped: every batch has the same static shape, so a jitted
    train step never retraces; since the permutation changes every epoch, a dropped example
    is seen in the next epochs (each is dropped with probability < batch_size / num_examples).

    Args:
      seed: non-negative int.
      epoch: non-negative int.
      num_examples: N >= batch_size.
      batch_size: B >= 1.

    Returns:
      int32 [N // B, B] indices into the training set, no index repeated.
    """
    seed = check_seed(seed)
    if isinstance(epoch, bool) or not isinstance(epoch, (int, np.integer)) or epoch < 0:
        raise ValueError(f"epoch must be a non-negative int, got {epoch!r}.")
    for what, value in (("num_examples", num_examples), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{what} must be a positive int, got {value!r}.")
    if batch_size > num_examples:
        raise ValueError(
            f"batch_size={batch_size} exceeds num_examples={num_examples}: no full batch; use "
            f"batch_size <= {num_examples}.")
    rng = np.random.default_rng((seed, _BATCH_STREAM, int(epoch)))
    num_batches = num_examples // batch_size
    order = rng.permutation(num_examples)[: num_batches * batch_size]
    return order.reshape(num_batches, batch_size).astype(np.int32)
