"""Fuzzed data interfaces: long tail, label noise, the training set, batching, augmentation."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import assume
from hypothesis import example
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from dsink_jax import data
from tests.fuzz import fuzz_settings

# ----------------------------------------------------------------------------- strategies

ratios = st.one_of(
    st.sampled_from([1, 1.0, 10, 100.0, 1000]),
    st.floats(min_value=1.0, max_value=1000.0, allow_nan=False),
)
bad_ratios = st.one_of(
    st.floats(max_value=1.0, exclude_max=True),  # includes -inf
    st.sampled_from([math.nan, math.inf, 1.0 - 1e-12, 0, -5]),
)
seeds = st.integers(0, 2**63 - 1)
rates = st.floats(min_value=0.0, max_value=1.0, exclude_max=True)
bad_rates = st.one_of(
    st.floats(min_value=1.0),  # includes inf
    st.floats(max_value=0.0, exclude_max=True),  # includes -inf
    st.just(math.nan),
)


@st.composite
def shuffled_labels(draw, *, min_count=1, max_classes=50):
    """Labels [N] whose class c occurs counts[c] times (1..200), in a drawn order."""
    num_classes = draw(st.integers(2, max_classes))
    counts = draw(hnp.arrays(np.int64, num_classes, elements=st.integers(min_count, 200)))
    assume(counts.sum() > 0)
    labels = np.repeat(np.arange(num_classes), counts)
    order = np.random.default_rng(draw(st.integers(0, 2**32 - 1))).permutation(labels.size)
    return labels[order], counts


def expected_long_tail_counts(counts, ratio, profile):
    """The documented formula, in plain Python: exp int(n_max r^(-c/(C-1))), step n_max / r."""
    num_classes, n_max = len(counts), int(max(counts))
    if profile == "exp":
        targets = [int(n_max * float(ratio) ** (-c / (num_classes - 1)))
                   for c in range(num_classes)]
    else:
        targets = [n_max if c < num_classes // 2 else int(n_max / float(ratio))
                   for c in range(num_classes)]
    return np.minimum(targets, counts)


# ----------------------------------------------------------------------------- long tail


@fuzz_settings(50)
@given(drawn=shuffled_labels(), ratio=ratios, profile=st.sampled_from(data.LONG_TAIL_PROFILES),
       seed=seeds)
@example(drawn=(np.repeat(np.arange(10), 200), np.full(10, 200)), ratio=1000, profile="exp",
         seed=0)  # 200 / 1000 rounds to 0: the tail class is emptied.
@example(drawn=(np.repeat(np.arange(3), [5, 1, 9]), np.array([5, 1, 9])), ratio=1.0,
         profile="step", seed=0)  # r = 1 keeps everything, whatever the source's imbalance.
def test_long_tail_keeps_the_formula_or_names_the_empty_class(drawn, ratio, profile, seed):
    labels, counts = drawn
    expected = expected_long_tail_counts(counts, ratio, profile)
    if np.any(expected == 0):
        empty = np.flatnonzero(expected == 0).tolist()
        with pytest.raises(ValueError, match="zero samples") as info:
            data.long_tail_indices(labels, ratio, profile, seed, num_classes=len(counts))
        assert str(empty) in str(info.value)
        return
    kept = data.long_tail_indices(labels, ratio, profile, seed, num_classes=len(counts))
    assert kept.dtype == np.int64
    assert np.all(np.diff(kept) > 0)  # sorted and unique
    assert kept.size == 0 or (kept[0] >= 0 and kept[-1] < labels.size)
    np.testing.assert_array_equal(np.bincount(labels[kept], minlength=len(counts)), expected)
    np.testing.assert_array_equal(data.long_tail_counts(counts, ratio, profile), expected)
    if float(ratio) == 1.0:
        np.testing.assert_array_equal(kept, np.arange(labels.size))
    np.testing.assert_array_equal(
        data.long_tail_indices(labels, ratio, profile, seed, num_classes=len(counts)), kept)


@fuzz_settings(30)
@given(drawn=shuffled_labels(max_classes=20), missing=st.data(), ratio=ratios, seed=seeds)
def test_long_tail_names_a_class_absent_from_the_labels(drawn, missing, ratio, seed):
    labels, counts = drawn
    absent = missing.draw(st.integers(0, len(counts) - 1), label="absent class")
    labels = labels[labels != absent]
    assume(labels.size > 0)
    with pytest.raises(ValueError, match="zero samples") as info:
        data.long_tail_indices(labels, ratio, "exp", seed, num_classes=len(counts))
    assert str(absent) in str(info.value)


@fuzz_settings(30)
@given(ratio=bad_ratios, profile=st.sampled_from(data.LONG_TAIL_PROFILES))
def test_long_tail_rejects_bad_ratio_by_name(ratio, profile):
    with pytest.raises(ValueError, match="imbalance_ratio") as info:
        data.long_tail_indices(np.arange(20) % 4, ratio, profile)
    assert repr(ratio) in str(info.value)


@fuzz_settings(25)
@given(value=st.sampled_from(["10", "", None, True, False, [10.0], b"10", 10j]))
def test_long_tail_rejects_non_numeric_ratio(value):
    with pytest.raises(TypeError, match="imbalance_ratio"):
        data.long_tail_indices(np.arange(20) % 4, value)


# ----------------------------------------------------------------------------- noise

# CIFAR-10 pairs of docs/method.md section 3: truck->automobile, bird->airplane, deer->horse, cat<->dog.
CIFAR10_PAIRS = {9: 1, 2: 0, 4: 7, 3: 5, 5: 3}


def expected_asym_map(num_classes, asym_map, dataset_name):
    """Source -> target class of `asym`, or None when the map does not fit C."""
    base = (dataset_name or "").removesuffix("_n")
    if asym_map == "auto":
        asym_map = {("cifar10", 10): "cifar10", ("cifar100", 100): "cifar100"}.get(
            (base, num_classes), "next")
    if asym_map == "cifar10":
        if num_classes != 10:
            return None
        return np.array([CIFAR10_PAIRS.get(c, c) for c in range(10)])
    if asym_map == "cifar100":
        if num_classes != 100:
            return None
        coarse = data.CIFAR100_COARSE
        # The next fine class of the same superclass, circular in index order.
        return np.array([
            (lambda fine: fine[(list(fine).index(c) + 1) % 5])(np.flatnonzero(coarse == coarse[c]))
            for c in range(100)])
    return (np.arange(num_classes) + 1) % num_classes


@st.composite
def noise_problems(draw):
    num_classes = draw(st.one_of(st.sampled_from([2, 10, 100]), st.integers(2, 100)))
    size = draw(st.integers(1, 300))
    dtype = draw(st.sampled_from([np.int32, np.int64, np.uint8]))
    labels = draw(hnp.arrays(dtype, size, elements=st.integers(0, num_classes - 1)))
    return labels, num_classes


@fuzz_settings(50)
@given(problem=noise_problems(), kind=st.sampled_from(data.NOISE_KINDS), rate=rates, seed=seeds,
       asym_map=st.sampled_from(data.ASYM_MAPS),
       dataset_name=st.sampled_from([None, "digits", "cifar10", "cifar100", "cifar10_n"]),
       real=st.data())
@example(problem=(np.zeros(7, np.int32), 3), kind="imb", rate=0.5, seed=0, asym_map="auto",
         dataset_name=None, real=None)  # one class present: nowhere to move a sample to
def test_noise_invariants_per_kind(problem, kind, rate, seed, asym_map, dataset_name, real):
    labels, num_classes = problem
    size = labels.size
    num_chosen = math.floor(rate * size)
    noisy_given = None
    if kind == "real":
        noisy_given = real.draw(hnp.arrays(np.int32, size, elements=st.integers(
            0, num_classes - 1)), label="noisy_labels")
    kwargs = dict(noisy_labels=noisy_given, asym_map=asym_map, dataset_name=dataset_name)
    mapping = expected_asym_map(num_classes, asym_map, dataset_name)
    if kind == "asym" and mapping is None:
        with pytest.raises(ValueError, match="asym_map"):
            data.corrupt_labels(labels, kind, rate, num_classes, seed, **kwargs)
        return
    if kind == "imb" and num_chosen and np.unique(labels).size == 1:
        with pytest.raises(ValueError, match="at least two classes"):
            data.corrupt_labels(labels, kind, rate, num_classes, seed, **kwargs)
        return

    noisy = data.corrupt_labels(labels, kind, rate, num_classes, seed, **kwargs)
    assert noisy.dtype == np.int32 and noisy.shape == labels.shape
    assert np.all((noisy >= 0) & (noisy < num_classes))
    np.testing.assert_array_equal(
        data.corrupt_labels(labels, kind, rate, num_classes, seed, **kwargs), noisy)
    changed = noisy != labels
    if kind == "real":
        np.testing.assert_array_equal(noisy, noisy_given)
    elif kind == "none" or rate == 0.0:
        np.testing.assert_array_equal(noisy, labels)
    elif kind == "sym":
        # Exactly floor(rate N) samples are relabelled, none to its own class.
        assert changed.sum() == num_chosen
    elif kind == "imb":
        assert changed.sum() == num_chosen
        # Drawn proportionally to class sizes: a class absent from the labels is never drawn.
        assert set(noisy[changed].tolist()) <= set(labels.tolist())
    elif kind in ("asym", "flip"):
        for c in range(num_classes):
            members = labels == c
            moved = noisy[members & changed]
            if kind == "asym" and mapping[c] == c:
                assert moved.size == 0
                continue
            assert moved.size == math.floor(rate * members.sum())
            assert np.unique(moved).size <= 1  # one target class per source class
            if kind == "asym" and moved.size:
                assert moved[0] == mapping[c]
    else:  # unif: any class, own class included, so only the range is fixed.
        assert kind == "unif"


@fuzz_settings(30)
@given(kind=st.sampled_from(data.NOISE_KINDS), rate=bad_rates)
def test_noise_rejects_rate_outside_unit_interval_by_value(kind, rate):
    labels = np.arange(12) % 3
    extra = dict(noisy_labels=labels) if kind == "real" else {}
    with pytest.raises(ValueError, match=r"noise rate must be in \[0, 1\)") as info:
        data.corrupt_labels(labels, kind, rate, 3, **extra)
    assert repr(rate) in str(info.value)


@fuzz_settings(25)
@given(problem=noise_problems(), kind=st.sampled_from(data.NOISE_KINDS), rate=rates,
       excess=st.integers(0, 5))
def test_noise_rejects_labels_out_of_range(problem, kind, rate, excess):
    labels, num_classes = problem
    labels = labels.astype(np.int64)
    labels[0] = num_classes + excess
    with pytest.raises(ValueError, match=f"num_classes={num_classes}"):
        data.corrupt_labels(labels, kind, rate, num_classes,
                            noisy_labels=labels if kind == "real" else None)


# ----------------------------------------------------------------------------- training set


@pytest.fixture(scope="module")
def digits():
    return data.load_dataset("digits")


@fuzz_settings(25)
@given(ratio=ratios, profile=st.sampled_from(data.LONG_TAIL_PROFILES),
       noise=st.sampled_from(data.NOISE_KINDS), rate=rates, seed=st.integers(0, 2**32))
def test_training_set_on_digits_is_consistent_or_refused(digits, ratio, profile, noise, rate,
                                                         seed):
    expected = expected_long_tail_counts(np.bincount(digits.y_train), ratio, profile)
    if noise == "real":  # digits has no real noisy labels
        with pytest.raises(ValueError, match="real_noise_key"):
            data.make_training_set(digits, imbalance_ratio=ratio, profile=profile, noise=noise,
                                   noise_rate=rate, seed=seed)
        return
    if np.any(expected == 0):
        with pytest.raises(ValueError, match="zero samples"):
            data.make_training_set(digits, imbalance_ratio=ratio, profile=profile, noise=noise,
                                   noise_rate=rate, seed=seed)
        return
    ts = data.make_training_set(digits, imbalance_ratio=ratio, profile=profile, noise=noise,
                                noise_rate=rate, seed=seed)
    np.testing.assert_array_equal(ts.class_counts, expected)
    np.testing.assert_array_equal(ts.x_train, digits.x_train[ts.train_indices])
    np.testing.assert_array_equal(ts.clean_labels, digits.y_train[ts.train_indices])
    np.testing.assert_array_equal(ts.is_corrupted, ts.noisy_labels != ts.clean_labels)
    assert ts.x_test is digits.x_test or np.array_equal(ts.x_test, digits.x_test)
    if noise in ("sym", "imb"):
        assert ts.is_corrupted.sum() == math.floor(rate * ts.clean_labels.size)
    summary = ts.summary()
    assert summary["num_train"] == int(expected.sum())
    assert summary["realised_imbalance_ratio"] == expected.max() / expected.min()


# ----------------------------------------------------------------------------- batching


@fuzz_settings(50)
@given(seed=st.integers(0, 2**32), epoch=st.integers(0, 1000), num_examples=st.integers(1, 300),
       batch_size=st.integers(-3, 400))
def test_epoch_batches_partition_or_refuse(seed, epoch, num_examples, batch_size):
    if batch_size < 1:
        with pytest.raises(ValueError, match=f"batch_size must be a positive int, got {batch_size}"
                           ):
            data.epoch_batches(seed, epoch, num_examples, batch_size)
        return
    if batch_size > num_examples:
        with pytest.raises(ValueError, match=f"batch_size={batch_size} exceeds"):
            data.epoch_batches(seed, epoch, num_examples, batch_size)
        return
    batches = data.epoch_batches(seed, epoch, num_examples, batch_size)
    assert batches.shape == (num_examples // batch_size, batch_size)
    assert batches.dtype == np.int32
    flat = batches.ravel()
    assert np.unique(flat).size == flat.size
    assert flat.min() >= 0 and flat.max() < num_examples
    np.testing.assert_array_equal(data.epoch_batches(seed, epoch, num_examples, batch_size),
                                  batches)


# ----------------------------------------------------------------------------- augmentation

IMAGE_SHAPES = ((3, 5, 6, 3),)  # one shape: each (shape, pad, flip) compiles once


@fuzz_settings(25)
@given(shape=st.sampled_from(IMAGE_SHAPES), pad=st.sampled_from([0, 2]), flip=st.booleans(),
       key=st.integers(0, 2**32 - 1), pixels=st.data())
def test_augment_output_is_a_normalised_window_of_the_padded_image(shape, pad, flip, key,
                                                                   pixels):
    images = pixels.draw(hnp.arrays(np.uint8, shape), label="images")
    channels = shape[-1]
    mean = pixels.draw(hnp.arrays(np.float32, channels, elements=st.floats(0, 1, width=32)))
    std = pixels.draw(hnp.arrays(np.float32, channels, elements=st.floats(0.0625, 2, width=32)))
    out = np.asarray(data.augment_batch(jax.random.PRNGKey(key), images, mean=mean, std=std,
                                        crop_padding=pad, flip=flip))
    assert out.shape == shape and out.dtype == np.float32 and np.all(np.isfinite(out))
    # Undo the normalisation: every pixel is an integer 0..255.
    raw = (out * std + mean) * 255.0
    np.testing.assert_allclose(raw, np.round(raw), atol=2e-3)
    raw = np.round(raw).astype(np.int64)
    _, height, width, _ = shape
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0))).astype(np.int64)
    for b in range(shape[0]):
        windows = [padded[b, dy:dy + height, dx:dx + width]
                   for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)]
        if flip:
            windows += [w[:, ::-1] for w in windows]
        assert any(np.array_equal(raw[b], w) for w in windows), f"image {b}"


@fuzz_settings(25)
@given(pad=st.one_of(st.integers(max_value=-1), st.floats(allow_nan=True), st.just(True)))
def test_augment_rejects_bad_padding_by_value(pad):
    images = jnp.zeros((1, 4, 4, 1), jnp.uint8)
    with pytest.raises(ValueError, match="crop_padding must be a non-negative int"):
        data.augment_batch(jax.random.PRNGKey(0), images, mean=[0.5], std=[0.5],
                           crop_padding=pad)


@fuzz_settings(25)
@given(std=st.floats(max_value=0.0))
def test_augment_rejects_non_positive_std(std):
    images = jnp.zeros((1, 4, 4, 1), jnp.uint8)
    with pytest.raises(ValueError, match="std must be > 0"):
        data.augment_batch(jax.random.PRNGKey(0), images, mean=[0.5], std=[std])
