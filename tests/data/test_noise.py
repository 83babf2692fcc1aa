"""Tests of dsink_jax.data.noise: exact counts, maps, proportions, determinism, errors."""
import numpy as np
import pytest

from dsink_jax.data import noise

SYNTHETIC = ("sym", "unif", "asym", "flip", "imb")


def _long_tailed_labels(counts, seed=0):
    labels = np.repeat(np.arange(len(counts)), counts)
    return np.random.default_rng(seed).permutation(labels).astype(np.int32)


LABELS = _long_tailed_labels([2000, 1200, 700, 400, 250, 150, 100, 60, 40, 25])  # N = 4925


@pytest.mark.parametrize("kind", SYNTHETIC)
def test_determinism_for_a_seed_and_difference_across_seeds(kind):
    a = noise.corrupt_labels(LABELS, kind, 0.3, 10, seed=1)
    b = noise.corrupt_labels(LABELS, kind, 0.3, 10, seed=1)
    c = noise.corrupt_labels(LABELS, kind, 0.3, 10, seed=2)
    assert a.dtype == np.int32 and a.shape == LABELS.shape
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert a.min() >= 0 and a.max() < 10


@pytest.mark.parametrize("kind", SYNTHETIC)
def test_zero_rate_and_none_return_a_copy(kind):
    out = noise.corrupt_labels(LABELS, kind, 0.0, 10)
    np.testing.assert_array_equal(out, LABELS)
    out = noise.corrupt_labels(LABELS, "none", 0.0, 10)
    np.testing.assert_array_equal(out, LABELS)
    assert out is not LABELS and not np.shares_memory(out, LABELS)


def test_sym_exact_count_never_own_class_and_uniform_targets():
    rate = 0.4
    out = noise.corrupt_labels(LABELS, "sym", rate, 10, seed=0)
    corrupted = out != LABELS
    # Exactly floor(rate * N) samples relabelled, each to a different class.
    assert corrupted.sum() == int(np.floor(rate * LABELS.size))
    # Targets uniform over the other 9 classes: class 0's 800-odd corrupted samples.
    targets = out[corrupted & (LABELS == 0)]
    freq = np.bincount(targets, minlength=10)
    assert freq[0] == 0
    expected = targets.size / 9
    assert np.all(np.abs(freq[1:] - expected) < 5 * np.sqrt(expected))


def test_sym_realised_rate_exact_for_many_rates():
    for rate in (0.1, 0.25, 0.5, 0.9):
        out = noise.corrupt_labels(LABELS, "sym", rate, 10, seed=5)
        assert (out != LABELS).sum() == int(np.floor(rate * LABELS.size))


def test_unif_realised_rate_within_tolerance():
    labels = _long_tailed_labels([2000] * 10)
    rate = 0.5
    out = noise.corrupt_labels(labels, "unif", rate, 10, seed=0)
    # The uniform redraw keeps the own class with probability 1/C.
    expected = rate * 9 / 10
    std = np.sqrt(expected * (1 - expected) / labels.size)
    assert abs((out != labels).mean() - expected) < 4 * std
    # The new label is uniform over all classes: noisy class counts of a balanced set stay flat.
    assert np.all(np.abs(np.bincount(out, minlength=10) - 2000) < 4 * np.sqrt(2000))


def test_asym_cifar10_follows_its_map_with_exact_per_class_counts():
    labels = _long_tailed_labels([300] * 10)
    rate = 0.3
    out = noise.corrupt_labels(labels, "asym", rate, 10, dataset_name="cifar10")
    corrupted = out != labels
    mapping = {9: 1, 2: 0, 4: 7, 3: 5, 5: 3}
    for c in range(10):
        members = labels == c
        if c in mapping:
            assert corrupted[members].sum() == int(np.floor(rate * 300))
            assert np.all(out[members & corrupted] == mapping[c])
        else:
            assert not corrupted[members].any()
    np.testing.assert_array_equal(noise.asym_class_map(10, "cifar10"),
                                  [0, 1, 0, 5, 7, 3, 6, 7, 8, 1])


def test_asym_cifar100_next_class_in_superclass():
    mapping = noise.asym_class_map(100, "auto", dataset_name="cifar100_n")
    coarse = noise.CIFAR100_COARSE
    assert np.all(np.bincount(coarse) == 5)
    assert np.all(coarse[mapping] == coarse) and np.all(mapping != np.arange(100))
    # Fruit and vegetables: apple 0, mushroom 51, orange 53, pear 57, sweet_pepper 83.
    np.testing.assert_array_equal(mapping[[0, 51, 53, 57, 83]], [51, 53, 57, 83, 0])
    # Aquatic mammals: beaver 4, dolphin 30, otter 55, seal 72, whale 95.
    np.testing.assert_array_equal(mapping[[4, 30, 55, 72, 95]], [30, 55, 72, 95, 4])
    # Each superclass is one cycle of length 5.
    c, orbit = 0, []
    for _ in range(5):
        orbit.append(c)
        c = mapping[c]
    assert c == 0 and len(set(orbit)) == 5


def test_asym_auto_picks_next_for_other_datasets():
    np.testing.assert_array_equal(noise.asym_class_map(10, "auto", dataset_name="digits"),
                                  (np.arange(10) + 1) % 10)
    np.testing.assert_array_equal(noise.asym_class_map(4, "next"), [1, 2, 3, 0])
    labels = _long_tailed_labels([100, 100, 100, 100])
    out = noise.corrupt_labels(labels, "asym", 0.2, 4, dataset_name="mine")
    corrupted = out != labels
    np.testing.assert_array_equal(out[corrupted], (labels[corrupted] + 1) % 4)
    assert corrupted.sum() == 4 * 20


def test_flip_one_other_class_per_class_exact_counts():
    rate = 0.35
    out = noise.corrupt_labels(LABELS, "flip", rate, 10, seed=3)
    corrupted = out != LABELS
    counts = np.bincount(LABELS, minlength=10)
    for c in range(10):
        members = LABELS == c
        assert corrupted[members].sum() == int(np.floor(rate * counts[c]))
        targets = np.unique(out[members & corrupted])
        assert targets.size == 1 and targets[0] != c


def test_imb_sends_relabelled_samples_in_proportion_to_class_size():
    rate = 0.5
    out = noise.corrupt_labels(LABELS, "imb", rate, 10, seed=0)
    corrupted = out != LABELS
    n = LABELS.size
    assert corrupted.sum() == int(np.floor(rate * n))
    counts = np.bincount(LABELS, minlength=10).astype(float)
    chosen_per_class = np.bincount(LABELS[corrupted], minlength=10)
    # Expected arrivals at class j: sum_c k_c * n_j / (N - n_c), own class excluded.
    transition = counts[None, :] / (n - counts[:, None])
    np.fill_diagonal(transition, 0.0)
    expected = chosen_per_class @ transition
    received = np.bincount(out[corrupted], minlength=10)
    assert np.all(np.abs(received - expected) < 4 * np.sqrt(expected) + 1)
    # Not uniform: the head class receives far more than the tail.
    assert received[0] > 10 * received[9]
    # Within a source class, targets exclude the source and follow n_j / (N - n_0).
    from_head = np.bincount(out[corrupted & (LABELS == 0)], minlength=10)
    assert from_head[0] == 0 and from_head[1] > from_head[2] > from_head[3]


def test_real_returns_given_labels():
    given = (LABELS + 3) % 10
    out = noise.corrupt_labels(LABELS, "real", 0.0, 10, noisy_labels=given.astype(np.int64))
    np.testing.assert_array_equal(out, given)
    assert out.dtype == np.int32


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match=r"'gauss'.*sym"):
        noise.corrupt_labels(LABELS, "gauss", 0.2, 10)
    for rate in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match=r"\[0, 1\)"):
            noise.corrupt_labels(LABELS, "sym", rate, 10)
    with pytest.raises(ValueError, match=r"\[0, 9\].*\[0, 5\)"):
        noise.corrupt_labels(LABELS, "sym", 0.2, 5)
    with pytest.raises(ValueError, match="needs noisy_labels"):
        noise.corrupt_labels(LABELS, "real", 0.0, 10)
    with pytest.raises(ValueError, match="length 3"):
        noise.corrupt_labels(LABELS, "real", 0.0, 10, noisy_labels=np.zeros(3, np.int32))
    with pytest.raises(ValueError, match=r"noisy_labels range \[10, 10\].*\[0, 10\)"):
        noise.corrupt_labels(LABELS, "real", 0.0, 10, noisy_labels=np.full(LABELS.size, 10))
    with pytest.raises(ValueError, match="only used by kind 'real'"):
        noise.corrupt_labels(LABELS, "sym", 0.2, 10, noisy_labels=LABELS)
    with pytest.raises(ValueError, match="num_classes=10"):
        noise.corrupt_labels(np.arange(5), "asym", 0.2, 5, asym_map="cifar10")
    with pytest.raises(ValueError, match=r"'cifar20'.*auto"):
        noise.corrupt_labels(LABELS, "sym", 0.2, 10, asym_map="cifar20")
    with pytest.raises(ValueError, match="num_classes >= 2"):
        noise.corrupt_labels(np.zeros(4, np.int32), "sym", 0.2, 1)
