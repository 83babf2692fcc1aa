"""Streaming sources: file lists of JPEGs, tfds mock data, bad input, host augmentation, feeds."""

import os

import jax
import numpy as np
import pytest
from PIL import Image

from dsink_jax import data
from dsink_jax.data import streaming
from dsink_jax.train import feed as feed_lib
from dsink_jax.train import parallel

NUM_CLASSES = 4


def write_tree(root, *, num_train=160, num_test=40, seed=0):
    """A folder of small JPEGs of mixed sizes (class-coloured noise) with OLTR-style lists."""
    rng = np.random.default_rng(seed)
    colors = rng.integers(0, 256, (NUM_CLASSES, 3))
    for split, n in (("train", num_train), ("test", num_test)):
        lines = []
        for i in range(n):
            c = i % NUM_CLASSES
            h, w = int(rng.integers(20, 48)), int(rng.integers(20, 48))
            image = np.clip(colors[c] + rng.normal(0, 30, (h, w, 3)), 0, 255).astype(np.uint8)
            rel = f"{split}/{c}/{i:04d}.jpg"
            os.makedirs(os.path.join(root, split, str(c)), exist_ok=True)
            Image.fromarray(image).save(os.path.join(root, rel), quality=90)
            lines.append(f"{rel} {c}")
        with open(os.path.join(root, f"{split}.txt"), "w") as f:
            f.write("\n".join(lines) + "\n")
    return str(root)


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return write_tree(tmp_path_factory.mktemp("tree"))


def test_a_file_list_loads_labels_up_front_and_images_on_demand(tree):
    ds = data.load_dataset(f"filelist:{tree}")
    assert isinstance(ds, data.StreamingDataset)
    assert ds.num_classes == NUM_CLASSES and len(ds.train) == 160 and len(ds.test) == 40
    np.testing.assert_array_equal(ds.y_train, np.arange(160) % NUM_CLASSES)
    record = ds.train[5]
    image = streaming.decode_image(record["image"], record["path"])
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[-1] == 3
    assert record["path"].endswith("train/1/0005.jpg")


def test_the_long_tail_and_the_noise_apply_to_a_stream(tree):
    ds = data.load_dataset(f"filelist:{tree}")
    ts = data.make_training_set(ds, imbalance_ratio=4, noise="sym", noise_rate=0.25, seed=0,
                                image_size=32)
    assert ts.stream is ds and ts.x_train is None
    np.testing.assert_array_equal(ts.class_counts, [40, 25, 15, 10])
    assert 0.2 < ts.realised_noise_rate < 0.3
    np.testing.assert_array_equal(ts.clean_labels, ds.y_train[ts.train_indices])
    assert ts.image_shape == (32, 32, 3) and ts.sample_images.shape == (1, 32, 32, 3)


@pytest.mark.parametrize("line,message", [
    ("train/0/0000.jpg x", r"train.txt:1: label 'x' of train/0/0000.jpg is not an integer"),
    ("justonefield", r"train.txt:1: 'justonefield' is not 'path label'"),
    ("train/0/0000.jpg -1", r"train.txt:1: label -1 of train/0/0000.jpg is out of range"),
    ("train/0/missing.jpg 0", r"1 image\(s\) named in .*train.txt do not exist: .*missing.jpg"),
])
def test_bad_lists_fail_before_training_naming_the_line(tmp_path, tree, line, message):
    import shutil
    root = tmp_path / "bad"
    shutil.copytree(tree, root)
    (root / "train.txt").write_text(line + "\n")
    with pytest.raises(data.BadInputError, match=message):
        data.load_dataset(f"filelist:{root}")


def test_a_label_beyond_the_class_list_is_refused(tmp_path, tree):
    import shutil
    root = tmp_path / "named"
    shutil.copytree(tree, root)
    (root / "classes.txt").write_text("a\nb\nc\n")  # 3 names, labels go up to 3
    with pytest.raises(data.BadInputError, match=r"label 3 of .* is out of range \(allowed: 0..2\)"):
        data.load_dataset(f"filelist:{root}")


def test_an_unreadable_image_fails_naming_it_or_is_skipped_and_counted(tmp_path, tree):
    import shutil
    root = tmp_path / "corrupt"
    shutil.copytree(tree, root)
    (root / "train" / "2" / "0006.jpg").write_bytes(b"not a jpeg at all")
    ds = data.load_dataset(f"filelist:{root}")
    with pytest.raises(data.BadInputError, match=r"cannot decode image .*train/2/0006.jpg"):
        streaming.decode_image(ds.train[6]["image"], ds.train[6]["path"])
    skipping = data.load_dataset(f"filelist:{root}", bad_images="skip")
    assert len(skipping.train) == 159 and len(skipping.skipped) == 1
    assert skipping.skipped[0].endswith("train/2/0006.jpg")
    ts = data.make_training_set(skipping, image_size=16)
    assert ts.summary()["skipped_unreadable_images"] == list(skipping.skipped)


def test_host_augmentation_shapes_and_determinism():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    a = streaming.random_resized_crop(image, 24, np.random.default_rng(1))
    b = streaming.random_resized_crop(image, 24, np.random.default_rng(1))
    assert a.shape == (24, 24, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    assert streaming.center_crop(image, 24).shape == (24, 24, 3)
    gray = streaming.decode_image(image[..., 0])
    assert gray.shape == (37, 53, 3)


@pytest.mark.parametrize("workers", [0, 2])
def test_the_streaming_feed_serves_the_in_memory_order(tree, workers):
    ds = data.load_dataset(f"filelist:{tree}")
    ts = data.make_training_set(ds, imbalance_ratio=2, seed=3, image_size=16)
    mesh = parallel.make_mesh(0)
    feed = feed_lib.StreamingFeed(ts, mesh, batch_size=16, seed=3, image_size=16, num_views=2,
                                  workers=workers, eval_batch_size=32)
    batches = list(feed.epoch(0)) + list(feed.epoch(1))[:2]
    assert feed.steps_per_epoch == ts.num_train // 16 == len(batches) - 2
    order = data.epoch_batches(3, 0, ts.num_train, 16)
    for k, batch in enumerate(batches[:feed.steps_per_epoch]):
        np.testing.assert_array_equal(batch["indices"], order[k])
        np.testing.assert_array_equal(batch["labels"], ts.noisy_labels[order[k]])
        assert batch["images"].shape == (16, 2, 16, 16, 3) and batch["images"].dtype == np.uint8
    np.testing.assert_array_equal(batches[-2]["indices"], data.epoch_batches(
        3, 1, ts.num_train, 16)[0])
    # Predictions come back in record order, the padding dropped.
    logits = feed.predict(jax.jit(lambda s, x: x[:, :2, 0, 0].astype(np.float32)), None, "test")
    assert logits.shape == (40, 2)


def test_a_killed_decoding_worker_stops_the_stream_instead_of_hanging(tree):
    """kill -9 of a grain worker mid-epoch: the next batches raise (the training loop does not
    catch it, so the run stops with this error) within seconds, instead of waiting forever."""
    import signal
    import subprocess
    import time

    ds = data.load_dataset(f"filelist:{tree}")
    ts = data.make_training_set(ds, seed=0, image_size=16)
    feed = feed_lib.StreamingFeed(ts, parallel.make_mesh(0), batch_size=8, seed=0,
                                  image_size=16, workers=2, eval_batch_size=8)
    children = lambda: set(subprocess.run(["pgrep", "-P", str(os.getpid()), "-f", "spawn_main"],
                                          capture_output=True, text=True).stdout.split())
    before = children()
    stream = (batch for epoch in range(100) for batch in feed.epoch(epoch))
    next(stream)
    workers = children() - before
    assert len(workers) == 2, workers
    os.kill(int(min(workers, key=int)), signal.SIGKILL)
    killed_at = time.time()
    with pytest.raises(RuntimeError, match="Worker process was terminated unexpectedly"):
        while time.time() - killed_at < 60:  # batches that keep coming fail here; a hang blocks
            next(stream)
    assert time.time() - killed_at < 60


def test_a_restored_iterator_continues_the_same_stream(tree):
    ds = data.load_dataset(f"filelist:{tree}")
    ts = data.make_training_set(ds, seed=0, image_size=16)
    mesh = parallel.make_mesh(0)
    make = lambda: feed_lib.StreamingFeed(ts, mesh, batch_size=8, seed=0, image_size=16)
    first = make()
    stream = first.epoch(0)
    for _ in range(5):
        next(stream)
    saved = first.data_iterator.get_state()
    expected = next(stream)
    second = make()
    second.data_iterator.set_state(saved)
    again = next(second.epoch(0, start=5))
    np.testing.assert_array_equal(again["indices"], expected["indices"])
    np.testing.assert_array_equal(again["images"], expected["images"])  # same augmentation


def test_a_crashing_worker_fails_the_run_instead_of_hanging(tree):
    import multiprocessing
    import signal
    import time
    ds = data.load_dataset(f"filelist:{tree}")
    ts = data.make_training_set(ds, seed=0, image_size=16)
    feed = feed_lib.StreamingFeed(ts, parallel.make_mesh(0), batch_size=8, seed=0,
                                  image_size=16, workers=2)
    stream = feed.epoch(0)
    next(stream)
    workers = multiprocessing.active_children()
    assert workers, "the feed should run its workers as child processes"
    for worker in workers:  # as the OOM killer, or a segfault in a codec, would
        os.kill(worker.pid, signal.SIGKILL)
    start = time.time()
    with pytest.raises(RuntimeError, match="terminated unexpectedly"):
        for _ in range(feed.steps_per_epoch):
            next(stream)
    assert time.time() - start < 60


def test_pytest_can_report_a_destructors_error_inside_tfds_lazy_imports():
    # tests/conftest.py imports tracemalloc; without it this raises TypeError ('LazyModule'
    # object is not callable), as the tfds test below once did under load.
    from _pytest.tracemalloc import tracemalloc_message
    from etils import epy
    with epy.lazy_imports():
        assert "tracemalloc" in tracemalloc_message(object())


def test_tfds_imagenet_lt_streams_under_mock_data():
    import tensorflow_datasets as tfds
    with tfds.testing.mock_data(num_examples=24):
        ds = data.load_dataset("tfds:imagenet_lt")
    assert isinstance(ds, data.StreamingDataset) and ds.num_classes == 1000
    assert len(ds.train) == 24 and ds.y_train.shape == (24,)
    with tfds.testing.mock_data(num_examples=24):
        image = streaming.decode_image(ds.train[3]["image"], ds.train[3]["path"])
    assert image.ndim == 3 and image.shape[-1] == 3
