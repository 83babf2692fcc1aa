"""Tests of dsink_jax.data.training_set: long tail then noise, summaries, errors."""
import json

import numpy as np
import pytest

from dsink_jax.data import long_tail
from dsink_jax.data import sources
from dsink_jax.data import training_set


@pytest.fixture(scope="module")
def digits():
    return sources.load_digits()


def _toy_dataset(per_class=40, num_classes=4, with_extra=True):
    rng = np.random.default_rng(0)
    n = per_class * num_classes
    y = rng.permutation(np.repeat(np.arange(num_classes), per_class)).astype(np.int32)
    extra = {"human": ((y + 1) % num_classes).astype(np.int32)} if with_extra else {}
    return sources.Dataset(
        x_train=np.arange(n, dtype=np.uint8).reshape(n, 1, 1, 1), y_train=y,
        x_test=np.zeros((3, 1, 1, 1), np.uint8), y_test=np.zeros(3, np.int32),
        num_classes=num_classes, class_names=tuple("abcd")[:num_classes], source="toy",
        name="toy", extra_labels=extra)


def test_long_tail_then_sym_noise_on_digits(digits):
    train = training_set.make_training_set(digits, imbalance_ratio=10, noise="sym",
                                           noise_rate=0.4, seed=0)
    expected = long_tail.long_tail_counts(np.bincount(digits.y_train), 10)
    np.testing.assert_array_equal(train.class_counts, expected)
    k = int(expected.sum())
    assert train.clean_labels.shape == train.noisy_labels.shape == (k,)
    # Images and clean labels are the kept rows of the raw set; the test set is untouched.
    np.testing.assert_array_equal(train.x_train, digits.x_train[train.train_indices])
    np.testing.assert_array_equal(train.clean_labels, digits.y_train[train.train_indices])
    assert train.x_test is digits.x_test and train.y_test is digits.y_test
    # The mask marks exactly the changed labels; sym realises floor(rate * K).
    np.testing.assert_array_equal(train.is_corrupted, train.noisy_labels != train.clean_labels)
    assert train.is_corrupted.sum() == int(np.floor(0.4 * k))
    assert train.realised_noise_rate == pytest.approx(int(np.floor(0.4 * k)) / k)
    np.testing.assert_array_equal(train.noisy_class_counts,
                                  np.bincount(train.noisy_labels, minlength=10))


def test_seeded_and_seed_dependent(digits):
    options = dict(imbalance_ratio=5, noise="imb", noise_rate=0.3)
    a = training_set.make_training_set(digits, **options, seed=1)
    b = training_set.make_training_set(digits, **options, seed=1)
    c = training_set.make_training_set(digits, **options, seed=2)
    np.testing.assert_array_equal(a.train_indices, b.train_indices)
    np.testing.assert_array_equal(a.noisy_labels, b.noisy_labels)
    assert not np.array_equal(a.train_indices, c.train_indices)


def test_summary_is_json_and_consistent(digits):
    train = training_set.make_training_set(digits, imbalance_ratio=10, noise="flip", noise_rate=0.2)
    summary = json.loads(json.dumps(train.summary()))
    num_train = summary["num_train"]
    assert num_train == sum(summary["class_counts"]) == sum(summary["noisy_class_counts"])
    assert summary["num_corrupted"] == sum(summary["corrupted_class_counts"])
    assert summary["realised_noise_rate"] == pytest.approx(summary["num_corrupted"] / num_train)
    assert summary["class_counts"][0] / summary["class_counts"][-1] == pytest.approx(
        summary["realised_imbalance_ratio"])
    assert (summary["noise"], summary["noise_rate"], summary["num_test"]) == ("flip", 0.2, 450)


def test_summary_table_rows(digits):
    train = training_set.make_training_set(digits, imbalance_ratio=10, noise="sym", noise_rate=0.4)
    lines = train.summary_table().splitlines()
    assert len(lines) == 2 + 10 + 1
    for c, line in enumerate(lines[2:12]):
        fields = line.split()
        assert [int(f) for f in (fields[0], fields[2], fields[3], fields[4])] == [
            c, train.class_counts[c], train.noisy_class_counts[c], train.corrupted_class_counts[c]]
    total = str(train.clean_labels.size)
    assert lines[-1].split() == ["all", total, total, str(train.is_corrupted.sum())]


def test_real_noise_uses_extra_labels_of_kept_images():
    dataset = _toy_dataset()
    train = training_set.make_training_set(dataset, imbalance_ratio=4, noise="real",
                                           real_noise_key="human", seed=3)
    np.testing.assert_array_equal(train.noisy_labels,
                                  dataset.extra_labels["human"][train.train_indices])
    assert train.is_corrupted.all() and train.realised_noise_rate == 1.0
    np.testing.assert_array_equal(train.class_counts, [40, 25, 15, 10])


def test_bad_inputs_raise_before_work(digits):
    with pytest.raises(ValueError, match=r"'human'.*got None"):
        training_set.make_training_set(_toy_dataset(), noise="real")
    with pytest.raises(ValueError, match=r"\(\).*got 'human'"):
        training_set.make_training_set(_toy_dataset(with_extra=False), noise="real",
                                       real_noise_key="human")
    with pytest.raises(ValueError, match="only used with noise 'real'"):
        training_set.make_training_set(_toy_dataset(), noise="sym", real_noise_key="human")
    with pytest.raises(ValueError, match=r"\[0, 1\), got 1.0"):
        training_set.make_training_set(digits, noise="sym", noise_rate=1.0)
    with pytest.raises(ValueError, match=r"'pairflip'.*sym"):
        training_set.make_training_set(digits, noise="pairflip", noise_rate=0.2)
    with pytest.raises(ValueError, match=r"'linear'.*exp"):
        training_set.make_training_set(digits, profile="linear")
    with pytest.raises(ValueError, match="imbalance_ratio.*0.5"):
        training_set.make_training_set(digits, imbalance_ratio=0.5)
    with pytest.raises(ValueError, match="zero samples"):
        training_set.make_training_set(digits, imbalance_ratio=1000)
    with pytest.raises(TypeError, match="Dataset"):
        training_set.make_training_set({"x_train": 1})
