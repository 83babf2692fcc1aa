"""Tests of dsink_jax.data.sources: digits, npz and tfds (mocked) sources and their errors."""
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds

from dsink_jax.data import sources

SHARED_CIFAR10 = Path(__file__).parents[2].parent / "shared/data/cifar10.npz"


def _arrays(n_train=12, n_test=6, shape=(4, 5, 3), num_classes=3, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "x_train": rng.integers(0, 256, (n_train, *shape), dtype=np.uint8),
        "y_train": np.arange(n_train) % num_classes,
        "x_test": rng.integers(0, 256, (n_test, *shape), dtype=np.uint8),
        "y_test": np.arange(n_test) % num_classes,
    }


def _save(tmp_path, name="toy.npz", **arrays):
    path = tmp_path / name
    np.savez(path, **arrays)
    return path


def test_digits_is_deterministic_stratified_split():
    a = sources.load_dataset("digits")
    b = sources.load_dataset("digits")
    assert a.x_train.shape == (1347, 8, 8, 1) and a.x_test.shape == (450, 8, 8, 1)
    assert a.x_train.dtype == np.uint8 and a.y_train.dtype == np.int32
    np.testing.assert_array_equal(a.x_train, b.x_train)
    np.testing.assert_array_equal(a.y_test, b.y_test)
    # 0..16 scaled to 0..255: the brightest pixel of the digits is 16 -> 255, and only the 17
    # rescaled levels occur.
    levels = np.round(np.arange(17) * 255 / 16).astype(np.uint8)
    assert set(np.unique(a.x_train)) <= set(levels) and a.x_train.max() == 255
    # Stratified: every class has 25% +- one image in the test set.
    total = np.bincount(a.y_train, minlength=10) + np.bincount(a.y_test, minlength=10)
    assert np.all(np.abs(np.bincount(a.y_test, minlength=10) - total * 0.25) <= 1)
    assert (a.num_classes, a.name, a.source) == (10, "digits", "digits")


def test_npz_round_trip_with_extra_labels(tmp_path):
    arrays = _arrays()
    noisy = (arrays["y_train"] + 1) % 3
    path = _save(tmp_path, **arrays, worse_label=noisy.astype(np.int64))
    ds = sources.load_dataset(f"npz:{path}")
    for key in ("x_train", "x_test"):
        np.testing.assert_array_equal(getattr(ds, key), arrays[key])
    np.testing.assert_array_equal(ds.y_train, arrays["y_train"])
    assert ds.y_train.dtype == np.int32
    assert set(ds.extra_labels) == {"worse_label"}
    np.testing.assert_array_equal(ds.extra_labels["worse_label"], noisy)
    assert ds.extra_labels["worse_label"].dtype == np.int32
    assert ds.num_classes == 3 and ds.class_names == ("0", "1", "2")
    assert ds.source == f"npz:{path}" and ds.name == "toy"


def test_npz_grayscale_gets_channel_and_metadata_keys_are_read(tmp_path):
    arrays = _arrays(shape=(4, 5))
    path = _save(tmp_path, **arrays, num_classes=np.array(5),
                 class_names=np.array(list("abcde")))
    ds = sources.load_npz(path)
    assert ds.x_train.shape == (12, 4, 5, 1)
    np.testing.assert_array_equal(ds.x_train[..., 0], arrays["x_train"])
    assert ds.num_classes == 5 and ds.class_names == tuple("abcde")


def test_npz_name_guess_picks_cifar_names(tmp_path):
    arrays = _arrays(num_classes=10, n_train=20, n_test=10)
    ds = sources.load_npz(_save(tmp_path, "cifar10.npz", **arrays))
    assert ds.name == "cifar10" and ds.class_names == sources.CIFAR10_CLASS_NAMES
    arrays = _arrays(num_classes=100, n_train=100)
    ds = sources.load_npz(_save(tmp_path, "cifar100_lt.npz", **arrays))
    assert ds.name == "cifar100" and ds.class_names[:2] == ("apple", "aquarium_fish")
    ds = sources.load_npz(_save(tmp_path, "mine.npz", **_arrays(num_classes=4)))
    assert ds.name == "mine"


def test_cifar100_class_names_are_100_distinct_sorted():
    names = sources.CIFAR100_CLASS_NAMES
    assert len(set(names)) == 100 and list(names) == sorted(names)


@pytest.mark.parametrize("spec", ["mnist", "file:/tmp/x.npz", "tfds:imagenet", "digits:x", "npz:"])
def test_unknown_source_or_dataset_raises(spec):
    with pytest.raises(ValueError, match="digits|tfds|npz"):
        sources.load_dataset(spec)


def test_npz_missing_key_names_key_and_keys_present(tmp_path):
    arrays = _arrays()
    del arrays["y_test"]
    path = _save(tmp_path, **arrays)
    with pytest.raises(ValueError, match=r"'y_test'.*x_train"):
        sources.load_dataset(f"npz:{path}")


def test_npz_missing_file_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.npz"):
        sources.load_dataset(f"npz:{tmp_path / 'nothere.npz'}")


def test_npz_mismatched_lengths_raise(tmp_path):
    arrays = _arrays()
    arrays["y_train"] = arrays["y_train"][:-1]
    with pytest.raises(ValueError, match="11 labels"):
        sources.load_npz(_save(tmp_path, **arrays))
    arrays = _arrays()
    with pytest.raises(ValueError, match="'noisy'.*length 5"):
        sources.load_npz(_save(tmp_path, **arrays, noisy=np.zeros(5, np.int32)))


def test_npz_labels_out_of_range_raise(tmp_path):
    arrays = _arrays()
    with pytest.raises(ValueError, match=r"outside the allowed range \[0, 3\)"):
        sources.load_npz(_save(tmp_path, **arrays, num_classes=np.array(3),
                               noisy=np.full(12, 3, np.int32)))
    arrays["y_test"] = arrays["y_test"] - 1
    with pytest.raises(ValueError, match=r"y_test.*\[-1, 1\]"):
        sources.load_npz(_save(tmp_path, **arrays))


def test_npz_wrong_dims_and_dtypes_raise(tmp_path):
    arrays = _arrays()
    arrays["x_train"] = arrays["x_train"].reshape(12, -1)
    with pytest.raises(ValueError, match="x_train.*shape"):
        sources.load_npz(_save(tmp_path, **arrays))
    arrays = _arrays()
    arrays["x_test"] = arrays["x_test"].astype(np.float32)
    with pytest.raises(TypeError, match="x_test.*uint8"):
        sources.load_npz(_save(tmp_path, **arrays))
    arrays = _arrays()
    arrays["y_train"] = arrays["y_train"].astype(np.float32)
    with pytest.raises(TypeError, match="y_train.*integer"):
        sources.load_npz(_save(tmp_path, **arrays))


def test_dataset_checks_class_names_and_image_shapes():
    arrays = {k: (v.astype(np.int32) if k.startswith("y") else v) for k, v in _arrays().items()}
    with pytest.raises(ValueError, match="class_names has 2"):
        sources.Dataset(**arrays, num_classes=3, class_names=("a", "b"), source="x", name="x")
    arrays["x_test"] = arrays["x_test"][:, :2]
    with pytest.raises(ValueError, match="must match"):
        sources.Dataset(**arrays, num_classes=3, class_names=("a", "b", "c"), source="x", name="x")


@pytest.mark.parametrize("name", ["cifar10", "cifar10_n", "cifar100_n"])
def test_tfds_mock_data_source(name, tmp_path):
    with tfds.testing.mock_data(num_examples=6):
        ds = sources.load_dataset(f"tfds:{name}", data_dir=tmp_path)
    assert ds.x_train.shape == (6, 32, 32, 3) and ds.x_test.shape == (6, 32, 32, 3)
    assert ds.x_train.dtype == np.uint8 and ds.y_train.dtype == np.int32
    assert ds.source == f"tfds:{name}" and ds.name == name
    expected_extra = {
        "cifar10": set(),
        "cifar10_n": {"aggre_label", "random_label1", "random_label2", "random_label3",
                      "worse_label"},
        "cifar100_n": {"noise_label"},
    }[name]
    assert set(ds.extra_labels) == expected_extra
    assert ds.num_classes == (100 if name.startswith("cifar100") else 10)
    assert len(ds.class_names) == ds.num_classes
    for labels in ds.extra_labels.values():
        assert labels.shape == (6,) and labels.dtype == np.int32


def test_tfds_not_prepared_names_data_dir_and_offline_recipe(tmp_path):
    with pytest.raises(sources.DatasetNotPreparedError) as info:
        sources.load_dataset("tfds:cifar10", data_dir=tmp_path)
    message = str(info.value)
    assert str(tmp_path) in message
    assert "tfds build cifar10" in message and "array_record" in message and "npz:" in message
    assert isinstance(info.value, RuntimeError)


@pytest.mark.skipif(not SHARED_CIFAR10.exists(), reason=f"{SHARED_CIFAR10} absent")
def test_shared_cifar10_npz():
    ds = sources.load_dataset(f"npz:{SHARED_CIFAR10}")
    assert ds.x_train.shape == (50000, 32, 32, 3) and ds.x_test.shape == (10000, 32, 32, 3)
    assert ds.name == "cifar10" and ds.class_names[9] == "truck"
    np.testing.assert_array_equal(np.bincount(ds.y_train), np.full(10, 5000))
    # The "done when": CIFAR-10-LT ratio 100 with sym noise 0.4.
    from dsink_jax.data.training_set import make_training_set  # pylint: disable=g-import-not-at-top
    train = make_training_set(ds, imbalance_ratio=100, noise="sym", noise_rate=0.4, seed=0)
    np.testing.assert_array_equal(
        train.class_counts, [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50])
    assert train.is_corrupted.sum() == int(0.4 * 12406)
