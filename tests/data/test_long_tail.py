"""Tests of dsink_jax.data.long_tail: exact counts, determinism, errors."""
import numpy as np
import pytest

from dsink_jax.data import long_tail

CIFAR10_LT_100 = [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]


def _balanced(per_class, num_classes, seed=0):
    labels = np.repeat(np.arange(num_classes), per_class)
    return np.random.default_rng(seed).permutation(labels)


def test_exp_counts_cifar10_ratio_100():
    labels = _balanced(5000, 10)
    keep = long_tail.long_tail_indices(labels, 100)
    np.testing.assert_array_equal(np.bincount(labels[keep]), CIFAR10_LT_100)
    np.testing.assert_array_equal(long_tail.long_tail_counts(np.full(10, 5000), 100),
                                  CIFAR10_LT_100)


def test_exp_counts_match_formula_cifar100_and_hand_values():
    counts = long_tail.long_tail_counts(np.full(100, 500), 100)
    assert counts[0] == 500 and counts[-1] == 5 and counts[50] == int(500 * 100 ** (-50 / 99))
    assert np.all(np.diff(counts) <= 0)
    # Hand-computed: 4 * 4 ** -0.5 = 2, 4 * 4 ** -1 = 1.
    np.testing.assert_array_equal(long_tail.long_tail_counts([4, 4, 4], 4), [4, 2, 1])


def test_step_profile_counts():
    np.testing.assert_array_equal(
        long_tail.long_tail_counts(np.full(10, 100), 10, "step"), [100] * 5 + [10] * 5)
    # Odd C: the middle class is a tail class.
    np.testing.assert_array_equal(long_tail.long_tail_counts(np.full(5, 60), 3, "step"),
                                  [60, 60, 20, 20, 20])


def test_targets_are_capped_by_available_samples():
    # n_max = 10 from class 0; class 1 has 3 < int(10 * 2 ** -0.5) = 7, so it keeps all 3.
    np.testing.assert_array_equal(long_tail.long_tail_counts([10, 3, 10], 2), [10, 3, 5])


def test_ratio_one_keeps_everything():
    labels = np.array([0, 0, 1, 2, 2, 2, 1])
    np.testing.assert_array_equal(long_tail.long_tail_indices(labels, 1.0), np.arange(7))


def test_indices_sorted_unique_in_range_and_seeded():
    labels = _balanced(50, 5)
    a = long_tail.long_tail_indices(labels, 10, seed=3)
    b = long_tail.long_tail_indices(labels, 10, seed=3)
    c = long_tail.long_tail_indices(labels, 10, seed=4)
    assert a.dtype == np.int64
    np.testing.assert_array_equal(a, b)
    assert np.all(np.diff(a) > 0) and a.min() >= 0 and a.max() < labels.size
    # Same counts for every seed; a different choice of samples.
    np.testing.assert_array_equal(np.bincount(labels[a]), np.bincount(labels[c]))
    assert not np.array_equal(a, c)


@pytest.mark.parametrize("ratio", [0.5, 0.0, -3, float("nan"), float("inf")])
def test_bad_ratio_raises(ratio):
    with pytest.raises(ValueError, match="imbalance_ratio"):
        long_tail.long_tail_indices(np.arange(4) % 2, ratio)


def test_bad_profile_and_seed_raise():
    with pytest.raises(ValueError, match=r"'linear'.*exp"):
        long_tail.long_tail_indices(np.arange(4) % 2, 2, profile="linear")
    with pytest.raises(ValueError, match="seed"):
        long_tail.long_tail_indices(np.arange(4) % 2, 2, seed=-1)


def test_class_left_with_zero_samples_raises():
    # int(10 / 20) = 0 for the last class.
    with pytest.raises(ValueError, match=r"classes \[2\] with zero samples"):
        long_tail.long_tail_indices(_balanced(10, 3), 20)
    # A class absent from the labels.
    with pytest.raises(ValueError, match=r"classes \[3\] with zero samples"):
        long_tail.long_tail_indices(_balanced(10, 3), 1, num_classes=4)


def test_labels_out_of_range_or_not_integer_raise():
    with pytest.raises(ValueError, match=r"\[-1, 1\].*\[0, 3\)"):
        long_tail.long_tail_indices(np.array([0, 1, -1]), 2, num_classes=3)
    with pytest.raises(ValueError, match=r"\[0, 5\].*\[0, 3\)"):
        long_tail.long_tail_indices(np.array([0, 1, 5]), 2, num_classes=3)
    with pytest.raises(TypeError, match="float"):
        long_tail.long_tail_indices(np.array([0.0, 1.0]), 2)
