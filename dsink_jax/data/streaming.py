"""Streaming sources for data that does not fit on a device: file lists and large tfds sets.

CIFAR-scale data is held whole on the device (`dsink_jax.data.sources`). ImageNet-LT (115,846
training images), iNaturalist 2018 (437,513 images, 8,142 classes) and Places-LT are read image by
image instead: a random-access source gives each record's encoded image and label, grain workers
decode and augment it on the host, and `dsink_jax.train.feed` assembles the global batch.

Sources (`load_streaming`):

* ``filelist:DIR``: the OLTR-style lists every long-tail codebase ships: ``DIR/train.txt`` and
  ``DIR/test.txt``, one ``relative/path.jpg label`` per line, paths relative to DIR; optional
  ``DIR/classes.txt`` (one class name per line). ImageNet-LT, Places-LT, iNaturalist 2018 and
  the real-noise sets that come as lists (mini-WebVision, Clothing1M) all load this way.
* ``tfds:imagenet_lt``, ``tfds:i_naturalist2018``, ``tfds:places365_small``: prepared tfds data
  read with ``tfds.data_source`` (array_record, images left encoded), test split = the builder's
  ``test`` split when it has labels, else ``validation``.

Only the labels are read up front (so the long tail and the label noise of
`dsink_jax.data.make_training_set` apply to any source); images are read when a batch needs
them. Bad input fails before training where it can be seen without reading every image (a
malformed line, a label out of range, a missing file: named with its list and line); an image
that cannot be decoded fails naming its file when a worker meets it, or, with
``bad_images="skip"``, every image is checked once at set-up and the unreadable ones are left
out and counted (`StreamingDataset.skipped`).
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
from typing import Any, Mapping, Sequence

import numpy as np

from dsink_jax.data import sources

# Host-side normalisation of large-image sources (the statistics of ImageNet, in [0, 1] units):
# computing them over hundreds of thousands of images at start-up is not worth it.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# tfds datasets read as streams, and the split each tests on.
STREAMING_TFDS = {"imagenet_lt": "test", "i_naturalist2018": "validation",
                  "places365_small": "validation"}
BAD_IMAGE_POLICIES = ("error", "skip")


class BadInputError(ValueError):
    """A list line, label or image that cannot be used; the message names it."""


@dataclasses.dataclass(frozen=True, eq=False)
class StreamingDataset:
    """A raw streaming source: random-access train and test records, labels up front.

    Attributes:
      train, test: random-access sources, ``len(source)`` records, ``source[i]`` a dict with
        "image" (encoded bytes, or a decoded uint8 [H, W, 3] array) and "path" (for messages).
      y_train, y_test: int32 labels of the records, in order.
      num_classes, class_names, source, name: as for :class:`~dsink_jax.data.Dataset`.
      extra_labels: further int32 [N] training-label arrays (e.g. human noisy labels).
      skipped: paths left out as unreadable (``bad_images="skip"``).
    """

    train: Any
    test: Any
    y_train: np.ndarray
    y_test: np.ndarray
    num_classes: int
    class_names: tuple[str, ...]
    source: str
    name: str
    extra_labels: Mapping[str, np.ndarray] = dataclasses.field(default_factory=dict)
    skipped: tuple[str, ...] = ()

    def __post_init__(self):
        sources.check_labels(self.num_classes, self.class_names, self.y_train, self.y_test,
                             self.extra_labels)
        for split in ("train", "test"):
            labels, records = getattr(self, f"y_{split}"), getattr(self, split)
            if len(records) != labels.shape[0]:
                raise ValueError(f"{split}: {len(records)} records but {labels.shape[0]} labels")


class FileListSource:
    """The records of one OLTR-style list: ``relative/path label`` per line.

    Args:
      root: the directory the paths are relative to.
      list_path: the list file.
      num_classes: labels must lie in [0, num_classes) (None: no upper check here).
      check_files: stat every listed file at construction (fails before training, naming the
        missing ones); False defers it to the first read.
    """

    def __init__(self, root: str, list_path: str, *, num_classes: int | None = None,
                 check_files: bool = True):
        self.root = os.path.abspath(root)
        self.list_path = list_path
        paths, labels = [], []
        if not os.path.exists(list_path):
            raise BadInputError(f"file list {list_path} does not exist")
        with open(list_path) as f:
            for number, line in enumerate(f, 1):
                line = line.strip()
                if not line or line.startswith("#"):
                    continue
                path, _, label = line.rpartition(" ")
                if not path:
                    raise BadInputError(f"{list_path}:{number}: {line!r} is not 'path label'")
                try:
                    value = int(label)
                except ValueError:
                    raise BadInputError(f"{list_path}:{number}: label {label!r} of {path} is "
                                        "not an integer") from None
                if value < 0 or (num_classes is not None and value >= num_classes):
                    allowed = f"0..{num_classes - 1}" if num_classes else ">= 0"
                    raise BadInputError(f"{list_path}:{number}: label {value} of {path} is out "
                                        f"of range (allowed: {allowed})")
                paths.append(path.strip())
                labels.append(value)
        if not paths:
            raise BadInputError(f"file list {list_path} has no 'path label' lines")
        self.paths = tuple(paths)
        self.labels = np.asarray(labels, np.int32)
        if check_files:
            missing = [p for p in self.paths if not os.path.isfile(os.path.join(self.root, p))]
            if missing:
                shown = ", ".join(os.path.join(self.root, p) for p in missing[:5])
                raise BadInputError(f"{len(missing)} image(s) named in {list_path} do not exist: "
                                    f"{shown}{' ...' if len(missing) > 5 else ''}")

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict:
        path = os.path.join(self.root, self.paths[index])
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as err:
            raise BadInputError(f"cannot read image {path} (listed in {self.list_path}): "
                                f"{err.strerror or err}") from err
        return {"image": data, "path": path}


class Subset:
    """Records `indices` of a source, in that order (record k is `source[indices[k]]`)."""

    def __init__(self, source, indices: np.ndarray):
        self.source, self.indices = source, np.asarray(indices, np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict:
        return self.source[int(self.indices[index])]


class _TfdsRecords:
    """A `tfds.data_source` split as records {"image": encoded bytes, "path": "NAME/SPLIT/i"}."""

    def __init__(self, source, name: str):
        self.source, self.name = source, name

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict:
        example = self.source[index]
        return {"image": example["image"], "path": f"{self.name}[{index}]"}

    def __getstate__(self):  # grain workers pickle the source; tfds sources reopen lazily
        return self.__dict__


def decode_image(data, path: str = "image") -> np.ndarray:
    """Encoded bytes (JPEG, PNG, ...) or an array -> uint8 [H, W, 3]; BadInputError naming `path`."""
    if isinstance(data, np.ndarray):
        image = data
    else:
        from PIL import Image  # pylint: disable=g-import-not-at-top
        try:
            with Image.open(io.BytesIO(bytes(data))) as img:
                image = np.asarray(img.convert("RGB"))
        except Exception as err:  # PIL raises many types for a bad file
            raise BadInputError(f"cannot decode image {path}: {type(err).__name__}: "
                                f"{err}") from err
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    if image.ndim != 3 or image.shape[-1] not in (1, 3):
        raise BadInputError(f"image {path} has shape {image.shape}; expected [H, W, 3]")
    if image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    return image.astype(np.uint8)


def _resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    from PIL import Image  # pylint: disable=g-import-not-at-top
    return np.asarray(Image.fromarray(image).resize((size[1], size[0]), Image.BILINEAR))


def random_resized_crop(image: np.ndarray, size: int, rng: np.random.Generator, *,
                        scale: tuple[float, float] = (0.08, 1.0),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> np.ndarray:
    """torchvision's RandomResizedCrop: an area fraction in `scale` and an aspect ratio in
    `ratio` (log-uniform), 10 tries, else the centre crop of the allowed ratio; resized to
    `size` x `size` (bilinear)."""
    height, width = image.shape[:2]
    area = height * width
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return _resize(image[top:top + h, left:left + w], (size, size))
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    top, left = (height - h) // 2, (width - w) // 2
    return _resize(image[top:top + h, left:left + w], (size, size))


def center_crop(image: np.ndarray, size: int, *, crop_fraction: float = 0.875) -> np.ndarray:
    """The evaluation view: shorter side resized to size / crop_fraction, then the centre."""
    height, width = image.shape[:2]
    short = max(size, int(round(size / crop_fraction)))
    if height <= width:
        new = (short, max(size, int(round(width * short / height))))
    else:
        new = (max(size, int(round(height * short / width))), short)
    image = _resize(image, new)
    top, left = (new[0] - size) // 2, (new[1] - size) // 2
    return image[top:top + size, left:left + size]


def check_images(source) -> tuple[np.ndarray, tuple[str, ...]]:
    """Decodes every image of `source` once: (indices of the readable ones, unreadable paths)."""
    good, bad = [], []
    for i in range(len(source)):
        record = source[i]
        try:
            decode_image(record["image"], record["path"])
            good.append(i)
        except BadInputError:
            bad.append(record["path"])
    return np.asarray(good, np.int64), tuple(bad)


def load_filelist(directory: str, *, bad_images: str = "error") -> StreamingDataset:
    """Loads ``filelist:DIR`` (see the module docstring)."""
    if bad_images not in BAD_IMAGE_POLICIES:
        raise ValueError(f"bad_images={bad_images!r}; allowed: {', '.join(BAD_IMAGE_POLICIES)}")
    directory = os.path.abspath(directory)
    if not os.path.isdir(directory):
        raise BadInputError(f"filelist directory {directory} does not exist")
    names_path = os.path.join(directory, "classes.txt")
    names = None
    if os.path.exists(names_path):
        with open(names_path) as f:
            names = tuple(line.strip() for line in f if line.strip())
    splits = {split: FileListSource(directory, os.path.join(directory, f"{split}.txt"),
                                    num_classes=len(names) if names else None)
              for split in ("train", "test")}
    num_classes = len(names) if names else int(max(s.labels.max() for s in splits.values())) + 1
    skipped: tuple[str, ...] = ()
    records = dict(splits)
    labels = {split: s.labels for split, s in splits.items()}
    if bad_images == "skip":
        for split, source in splits.items():
            keep, bad = check_images(source)
            records[split] = Subset(source, keep)
            labels[split] = source.labels[keep]
            skipped += bad
    return StreamingDataset(
        train=records["train"], test=records["test"], y_train=labels["train"],
        y_test=labels["test"], num_classes=num_classes,
        class_names=names or tuple(str(c) for c in range(num_classes)),
        source=f"filelist:{directory}", name=os.path.basename(directory.rstrip("/")),
        skipped=skipped)


def load_tfds_streaming(name: str, *, data_dir: str | None = None) -> StreamingDataset:
    """Loads a prepared ``tfds:imagenet_lt`` / ``i_naturalist2018`` / ``places365_small``."""
    if name not in STREAMING_TFDS:
        raise ValueError(f"{name!r} is not a streaming tfds dataset; allowed: "
                         f"{', '.join(STREAMING_TFDS)}")
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

    splits, labels = {}, {}
    for split, tfds_split in (("train", "train"), ("test", STREAMING_TFDS[name])):
        try:
            # Images stay encoded: the workers decode them, and reading every label at set-up
            # does not decode 100k+ images.
            splits[split] = tfds.data_source(
                name, split=tfds_split, data_dir=data_dir, download=False,
                decoders={"image": tfds.decode.SkipDecoding()})
            labels[split] = _labels_of(splits[split])
        except ModuleNotFoundError:
            # Data that tfds can only hand over decoded (its mock data, without TensorFlow):
            # slower set-up, same records.
            splits[split] = tfds.data_source(name, split=tfds_split, data_dir=data_dir,
                                             download=False)
            labels[split] = _labels_of(splits[split])
        except Exception as err:  # pylint: disable=broad-except
            raise sources.DatasetNotPreparedError(
                sources._not_prepared_message(name, str(data_dir), err)) from err  # pylint: disable=protected-access
    label_feature = splits["train"].dataset_info.features["label"]
    num_classes = int(label_feature.num_classes)
    for split, y in labels.items():
        if y.size and (y.min() < 0 or y.max() >= num_classes):
            raise BadInputError(f"tfds {name} {split}: labels in [{y.min()}, {y.max()}] outside "
                                f"[0, {num_classes})")
    return StreamingDataset(
        train=_TfdsRecords(splits["train"], f"{name}/train"),
        test=_TfdsRecords(splits["test"], f"{name}/{STREAMING_TFDS[name]}"),
        y_train=labels["train"], y_test=labels["test"], num_classes=num_classes,
        class_names=tuple(label_feature.names), source=f"tfds:{name}", name=name)


def _labels_of(source) -> np.ndarray:
    return np.asarray([int(source[i]["label"]) for i in range(len(source))], np.int32)


def is_streaming_spec(spec: str) -> bool:
    """Whether a data spec is read as a stream (file lists and the large tfds datasets)."""
    kind, _, arg = spec.partition(":")
    return kind == "filelist" or (kind == "tfds" and arg in STREAMING_TFDS)


def load_streaming(spec: str, *, data_dir: str | None = None,
                   bad_images: str = "error") -> StreamingDataset:
    """``filelist:DIR`` or ``tfds:NAME`` (NAME in :data:`STREAMING_TFDS`)."""
    kind, _, arg = spec.partition(":")
    if kind == "filelist":
        if not arg:
            raise ValueError("the 'filelist' source needs a directory: filelist:DIR")
        return load_filelist(arg, bad_images=bad_images)
    if kind == "tfds" and arg in STREAMING_TFDS:
        return load_tfds_streaming(arg, data_dir=data_dir)
    raise ValueError(f"{spec!r} is not a streaming source (filelist:DIR or tfds: one of "
                     f"{', '.join(STREAMING_TFDS)})")


def stack_views(views: Sequence[np.ndarray]) -> np.ndarray:
    """One view as [H, W, 3], several as [V, H, W, 3]."""
    return views[0] if len(views) == 1 else np.stack(views)
