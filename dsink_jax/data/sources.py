"""Raw data sources behind one interface: ``digits``, ``npz:PATH`` and ``tfds:NAME``.

Every source returns a :class:`Dataset`: train and test images as uint8 NHWC numpy arrays,
int32 labels, and metadata. Heavy imports (scikit-learn, tensorflow_datasets) happen inside
the loader that needs them, so ``import dsink_jax.data`` stays cheap.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Mapping

import numpy as np

SOURCE_KINDS = ("digits", "npz", "tfds", "filelist")
TFDS_DATASETS = ("cifar10", "cifar100", "cifar10_n", "cifar100_n")

# Names that pick a known asym noise map (see dsink_jax.data.noise).
KNOWN_NAMES = ("digits", "cifar10", "cifar100", "cifar10_n", "cifar100_n")

CIFAR10_CLASS_NAMES = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)
CIFAR100_CLASS_NAMES = (
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle",
    "bottle", "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle",
    "caterpillar", "cattle", "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch",
    "crab", "crocodile", "cup", "dinosaur", "dolphin", "elephant", "flatfish", "forest", "fox",
    "girl", "hamster", "house", "kangaroo", "keyboard", "lamp", "lawn_mower", "leopard", "lion",
    "lizard", "lobster", "man", "maple_tree", "motorcycle", "mountain", "mouse", "mushroom",
    "oak_tree", "orange", "orchid", "otter", "palm_tree", "pear", "pickup_truck", "pine_tree",
    "plain", "plate", "poppy", "porcupine", "possum", "rabbit", "raccoon", "ray", "road",
    "rocket", "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail", "snake",
    "spider", "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank",
    "telephone", "television", "tiger", "tractor", "train", "trout", "tulip", "turtle",
    "wardrobe", "whale", "willow_tree", "wolf", "woman", "worm",
)

# npz keys with a fixed meaning; every other 1-D integer array is an extra label array.
NPZ_REQUIRED_KEYS = ("x_train", "y_train", "x_test", "y_test")
NPZ_METADATA_KEYS = ("num_classes", "class_names", "name")


class DatasetNotPreparedError(RuntimeError):
    """A tfds dataset is not prepared in ``data_dir`` and may not be downloaded."""


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """A raw source: train and test split, labels clean as the source gives them.

    Attributes:
      x_train: uint8 [N, H, W, C] training images (digits: [N, 8, 8, 1], values 0..16 scaled
        to 0..255).
      y_train: int32 [N] training labels in [0, num_classes).
      x_test: uint8 [M, H, W, C] test images.
      y_test: int32 [M] test labels.
      num_classes: number of classes C.
      class_names: C names.
      source: the spec it came from, e.g. ``"digits"``, ``"npz:/path"``, ``"tfds:cifar10"``.
      name: ``"digits"``, ``"cifar10"``, ``"cifar100"``, ...; picks the asym noise map.
      extra_labels: further int32 [N] label arrays for the training images, e.g. CIFAR-10N's
        human ``worse_label``; keyed by name.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    class_names: tuple[str, ...]
    source: str
    name: str
    extra_labels: Mapping[str, np.ndarray] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        # Every in-memory source funnels through here: shape, dtype and range checks.
        check_labels(self.num_classes, self.class_names, self.y_train, self.y_test,
                     self.extra_labels)
        for split in ("train", "test"):
            x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
            _check_images(x, f"x_{split}")
            if x.shape[0] != y.shape[0]:
                raise ValueError(
                    f"x_{split} has {x.shape[0]} images but y_{split} has {y.shape[0]} labels; "
                    "they must have the same length.")
        if self.x_train.shape[1:] != self.x_test.shape[1:]:
            raise ValueError(
                f"train images have shape {self.x_train.shape[1:]} but test images "
                f"{self.x_test.shape[1:]}; they must match.")


def check_labels(num_classes, class_names, y_train: np.ndarray, y_test: np.ndarray,
                 extra_labels: Mapping[str, np.ndarray]) -> None:
    """The label-side checks of every source (in memory or streamed); raises naming the field."""
    if not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}.")
    if len(class_names) != num_classes:
        raise ValueError(
            f"class_names has {len(class_names)} entries, expected num_classes="
            f"{num_classes}.")
    _check_labels(y_train, "y_train", num_classes)
    _check_labels(y_test, "y_test", num_classes)
    for key, labels in extra_labels.items():
        _check_labels(labels, f"extra label {key!r}", num_classes)
        if labels.shape[0] != y_train.shape[0]:
            raise ValueError(
                f"extra label array {key!r} has length {labels.shape[0]}, expected "
                f"len(y_train)={y_train.shape[0]}.")


def _check_images(x: np.ndarray, what: str) -> None:
    if not isinstance(x, np.ndarray) or x.dtype != np.uint8:
        raise TypeError(
            f"{what} must be a uint8 numpy array, got {type(x).__name__} of dtype "
            f"{getattr(x, 'dtype', None)}.")
    if x.ndim != 4:
        raise ValueError(f"{what} must be [N, H, W, C] (4 dims), got shape {x.shape}.")


def _check_labels(y: np.ndarray, what: str, num_classes: int) -> None:
    if not isinstance(y, np.ndarray) or y.dtype != np.int32:
        raise TypeError(
            f"{what} must be an int32 numpy array, got {type(y).__name__} of dtype "
            f"{getattr(y, 'dtype', None)}.")
    if y.ndim != 1:
        raise ValueError(f"{what} must be 1-D [N], got shape {y.shape}.")
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(
            f"{what} has labels in [{y.min()}, {y.max()}], outside the allowed range "
            f"[0, {num_classes}).")


def load_dataset(spec: str, *, data_dir: str | os.PathLike | None = None,
                 bad_images: str = "error"):
    """Loads a raw dataset from a source spec.

    Args:
      spec: ``"digits"`` (scikit-learn's bundled 8x8 digits), ``"npz:PATH"`` (local arrays,
        see :func:`load_npz`), ``"tfds:NAME"`` with NAME in :data:`TFDS_DATASETS` (see
        :func:`load_tfds`), or a streaming source: ``"filelist:DIR"`` or ``"tfds:NAME"`` with
        NAME in `streaming.STREAMING_TFDS` (see :func:`dsink_jax.data.streaming.load_streaming`).
      data_dir: tfds data directory (``tfds:`` only; None uses tfds' default,
        ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``).
      bad_images: streaming sources only: "error" (an unreadable image fails naming its file
        when it is met) or "skip" (every image checked at set-up, bad ones left out and counted).

    Returns:
      The :class:`Dataset` (in memory), or a `StreamingDataset`.

    Raises:
      ValueError: unknown source kind or dataset name, or invalid arrays.
    """
    if not isinstance(spec, str):
        raise TypeError(
            f"spec must be a str such as 'digits', 'npz:PATH' or 'tfds:NAME', got {spec!r}.")
    kind, sep, arg = spec.partition(":")
    if kind not in SOURCE_KINDS:
        raise ValueError(
            f"Unknown data source {spec!r}: the kind {kind!r} is not one of {SOURCE_KINDS} "
            "(use 'digits', 'npz:PATH' or 'tfds:NAME').")
    if kind == "digits":
        if sep:
            raise ValueError(f"The 'digits' source takes no argument, got {spec!r}.")
        return load_digits()
    if not arg:
        raise ValueError(f"The {kind!r} source needs an argument after ':', got {spec!r}.")
    from dsink_jax.data import streaming  # pylint: disable=g-import-not-at-top
    if streaming.is_streaming_spec(spec):
        return streaming.load_streaming(spec, data_dir=None if data_dir is None
                                        else os.fspath(data_dir), bad_images=bad_images)
    if kind == "npz":
        return load_npz(arg)
    return load_tfds(arg, data_dir=data_dir)


def load_digits(*, test_size: float = 0.25, random_state: int = 0) -> Dataset:
    """scikit-learn's bundled 8x8 handwritten digits, a deterministic stratified split.

    Real data that ships with scikit-learn, so it works offline: the default for smoke tests.

    Args:
      test_size: fraction of the 1797 images held out as test set.
      random_state: seed of the stratified split.

    Returns:
      A :class:`Dataset` with uint8 [N, 8, 8, 1] images (0..16 scaled to 0..255), 10 classes.
    """
    if not 0.0 < test_size < 1.0:
        raise ValueError(f"test_size must be in (0, 1), got {test_size!r}.")
    from sklearn import datasets as sk_datasets  # pylint: disable=g-import-not-at-top
    from sklearn import model_selection  # pylint: disable=g-import-not-at-top

    digits = sk_datasets.load_digits()
    # Pixel values are integers 0..16; rescaling to 0..255 lets the same uint8 / 255
    # normalisation serve every source.
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    labels = digits.target.astype(np.int32)
    x_train, x_test, y_train, y_test = model_selection.train_test_split(
        images, labels, test_size=test_size, random_state=random_state, stratify=labels)
    return Dataset(
        x_train=np.ascontiguousarray(x_train), y_train=y_train,
        x_test=np.ascontiguousarray(x_test), y_test=y_test,
        num_classes=10, class_names=tuple(str(i) for i in range(10)),
        source="digits", name="digits")


def _guess_name(stem: str, num_classes: int) -> str:
    """The dataset name of an npz file: its stem if it starts with a known name, else a guess."""
    lowered = stem.lower().replace("-", "")
    # Longest first, so that "cifar100_lt" is not read as "cifar10".
    for known in sorted(KNOWN_NAMES, key=len, reverse=True):
        if lowered.startswith(known):
            return known
    # A 10- or 100-class file of unknown stem is most likely CIFAR; the name only chooses the
    # asym noise map, which can be overridden with corrupt_labels(asym_map=...).
    return {10: "cifar10", 100: "cifar100"}.get(num_classes, stem)


def _npz_labels(array: np.ndarray, key: str) -> np.ndarray:
    if not np.issubdtype(array.dtype, np.integer):
        raise TypeError(f"npz key {key!r} must hold integer labels, got dtype {array.dtype}.")
    if array.ndim != 1:
        raise ValueError(f"npz key {key!r} must be 1-D [N], got shape {array.shape}.")
    return array.astype(np.int32)


def _npz_images(array: np.ndarray, key: str) -> np.ndarray:
    if array.dtype != np.uint8:
        raise TypeError(
            f"npz key {key!r} must hold uint8 images, got dtype {array.dtype}; convert with "
            "np.round(x * 255).astype(np.uint8) for images in [0, 1].")
    if array.ndim == 3:  # Grayscale [N, H, W]: add the channel axis so every source is NHWC.
        array = array[..., None]
    if array.ndim != 4:
        raise ValueError(
            f"npz key {key!r} must be [N, H, W, C] or grayscale [N, H, W], got shape "
            f"{array.shape}.")
    return array


def load_npz(path: str | os.PathLike) -> Dataset:
    """Loads local arrays from an ``.npz`` file (how air-gapped clusters load data).

    Keys: ``x_train``, ``y_train``, ``x_test``, ``y_test`` (required; images uint8 NHWC or
    grayscale NHW, labels integer); optional ``num_classes`` (scalar), ``class_names`` (string
    array) and ``name`` (scalar string); every other 1-D integer array is an extra label array
    (for example real human noisy labels) and must have the length of ``y_train``.

    Without ``num_classes``/``class_names``, C = max label + 1. The dataset name is the file
    stem when it starts with a known name (cifar10, cifar100, ...), otherwise "cifar10" for 10
    classes, "cifar100" for 100 and the stem otherwise; it only selects the asym noise map.

    Args:
      path: the file.

    Returns:
      The :class:`Dataset` with ``source="npz:PATH"``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"npz file {str(path)!r} does not exist.")
    with np.load(path, allow_pickle=False) as npz:
        present = tuple(npz.files)
        for key in NPZ_REQUIRED_KEYS:
            if key not in present:
                raise ValueError(
                    f"npz file {str(path)!r} has no key {key!r}; keys present: {present}; "
                    f"required: {NPZ_REQUIRED_KEYS}.")
        x_train = _npz_images(npz["x_train"], "x_train")
        x_test = _npz_images(npz["x_test"], "x_test")
        y_train = _npz_labels(npz["y_train"], "y_train")
        y_test = _npz_labels(npz["y_test"], "y_test")
        extra = {}
        for key in present:
            if key in NPZ_REQUIRED_KEYS or key in NPZ_METADATA_KEYS:
                continue
            array = npz[key]
            if array.ndim == 1 and np.issubdtype(array.dtype, np.integer):
                extra[key] = array.astype(np.int32)
        class_names = (tuple(str(s) for s in npz["class_names"].tolist())
                       if "class_names" in present else None)
        num_classes = int(npz["num_classes"]) if "num_classes" in present else None
        name = str(npz["name"]) if "name" in present else None

    # Lengths first: a clearer message than a label-range error on a truncated array.
    for key, labels in extra.items():
        if labels.shape[0] != y_train.shape[0]:
            raise ValueError(
                f"npz extra label array {key!r} has length {labels.shape[0]}, expected "
                f"len(y_train)={y_train.shape[0]} (1-D integer arrays other than "
                f"{NPZ_REQUIRED_KEYS + NPZ_METADATA_KEYS} are read as extra training labels).")
    if num_classes is None:
        num_classes = len(class_names) if class_names is not None else int(
            max(y_train.max(initial=-1), y_test.max(initial=-1)) + 1)
    if name is None:
        name = _guess_name(path.stem, num_classes)
    if class_names is None:
        class_names = {"cifar10": CIFAR10_CLASS_NAMES, "cifar100": CIFAR100_CLASS_NAMES}.get(
            name, tuple(str(i) for i in range(num_classes)))
        if len(class_names) != num_classes:
            class_names = tuple(str(i) for i in range(num_classes))
    return Dataset(
        x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test,
        num_classes=num_classes, class_names=class_names, source=f"npz:{path}", name=name,
        extra_labels=extra)


def _not_prepared_message(name: str, data_dir: str, cause: BaseException) -> str:
    return (
        f"tfds dataset {name!r} is not prepared as array_record in data_dir={data_dir!r} and "
        "download=False. To prepare it offline: on a machine with internet run\n"
        '  pip install "dsink_jax[tf]"\n'
        f"  tfds build {name} --data_dir={data_dir} --file_format=array_record\n"
        + ("(CIFAR-N also needs its human-label files: add --manual_dir=DIR, see the tfds "
           f"catalog page of {name})\n" if name.endswith("_n") else "") +
        f"then copy that directory here (and pass data_dir=...). Or export the arrays to an npz "
        f"file (keys x_train, y_train, x_test, y_test) and use the source 'npz:PATH'.\n"
        f"(tfds said: {type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''})")


def load_tfds(name: str, *, data_dir: str | os.PathLike | None = None) -> Dataset:
    """Loads a prepared tfds dataset through ``tfds.data_source`` (no TensorFlow needed).

    Reads array_record data with ``download=False``. Images and ``label`` become the arrays;
    for ``cifar10_n`` / ``cifar100_n`` the human label features of the training split
    (every ClassLabel with C classes other than ``label``: CIFAR-10N's ``worse_label``,
    ``aggre_label``, ``random_label1..3``; CIFAR-100N's ``noise_label``) go to
    ``extra_labels``. Class names come from the builder info.

    Args:
      name: one of :data:`TFDS_DATASETS`.
      data_dir: tfds data directory; None uses tfds' default.

    Returns:
      The :class:`Dataset` with ``source="tfds:NAME"``.

    Raises:
      ValueError: ``name`` not in :data:`TFDS_DATASETS`.
      DatasetNotPreparedError: the data is not prepared in ``data_dir``; the message says how
        to prepare it offline.
    """
    if name not in TFDS_DATASETS:
        raise ValueError(f"Unknown tfds dataset {name!r}; allowed: {TFDS_DATASETS}.")
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

    data_dir = None if data_dir is None else os.fspath(data_dir)
    sources = {}
    for split in ("train", "test"):
        try:
            sources[split] = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
        except Exception as e:  # pylint: disable=broad-except
            # tfds reports missing data as an unrelated-looking NotImplementedError about file
            # formats; translate it into something actionable.
            resolved = data_dir
            try:
                builder = tfds.builder(name, data_dir=data_dir)
                resolved = builder._data_dir_root  # pylint: disable=protected-access
            except Exception:  # pylint: disable=broad-except
                pass
            raise DatasetNotPreparedError(
                _not_prepared_message(name, str(resolved), e)) from e

    features = sources["train"].dataset_info.features
    label_feature = features["label"]
    num_classes = int(label_feature.num_classes)
    class_names = tuple(label_feature.names)
    extra_keys = sorted(
        key for key, feature in features.items()
        if key != "label" and getattr(feature, "num_classes", None) == num_classes)

    arrays = {}
    for split, source in sources.items():
        examples = [source[i] for i in range(len(source))]
        arrays[f"x_{split}"] = np.stack([np.asarray(ex["image"], np.uint8) for ex in examples])
        arrays[f"y_{split}"] = np.asarray([ex["label"] for ex in examples], np.int32)
        if split == "train":
            # Test-split human labels are -1 placeholders in CIFAR-N; only train ones are real.
            extra = {key: np.asarray([ex[key] for ex in examples], np.int32) for key in extra_keys}
    return Dataset(
        **arrays, num_classes=num_classes, class_names=class_names, source=f"tfds:{name}",
        name=name, extra_labels=extra)
