"""A long-tailed, label-noisy training set built from a raw :class:`Dataset`."""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from dsink_jax.data.long_tail import LONG_TAIL_PROFILES
from dsink_jax.data.long_tail import long_tail_indices
from dsink_jax.data.noise import NOISE_KINDS
from dsink_jax.data.noise import check_noise_rate
from dsink_jax.data.noise import corrupt_labels
from dsink_jax.data.sources import Dataset
from dsink_jax.data.streaming import StreamingDataset


@dataclasses.dataclass(frozen=True, eq=False)
class TrainingSet:
    """Long-tailed + noisy training data; the test set is untouched.

    Attributes:
      x_train: uint8 [K, H, W, C] kept training images (None for a streaming source).
      clean_labels: int32 [K] true labels.
      noisy_labels: int32 [K] observed labels (what a model is trained on).
      is_corrupted: bool [K], ``noisy_labels != clean_labels``.
      x_test: uint8 [M, H, W, C] test images (None for a streaming source).
      y_test: int32 [M] test labels (clean).
      num_classes: C.
      class_names: C names.
      source: spec of the raw source.
      name: dataset name.
      imbalance_ratio: requested n_max / n_min.
      profile: long-tail profile.
      noise: noise kind.
      noise_rate: requested noise rate (see ``realised_noise_rate``).
      train_indices: int64 [K] indices of the kept images in the raw training set.
      seed: the seed used for the long tail and the noise.
      real_noise_key: the extra-label key used by ``real`` noise, else None.
      stream: the :class:`~dsink_jax.data.streaming.StreamingDataset` the images are read from
        (``train_indices`` index its training records), or None when they are in memory.
      stream_image_size: side of the square images a streaming source is read at.
    """

    x_train: np.ndarray
    clean_labels: np.ndarray
    noisy_labels: np.ndarray
    is_corrupted: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    class_names: tuple[str, ...]
    source: str
    name: str
    imbalance_ratio: float
    profile: str
    noise: str
    noise_rate: float
    train_indices: np.ndarray | None = None
    seed: int = 0
    real_noise_key: str | None = None
    stream: Any = None
    stream_image_size: int = 0

    @property
    def num_train(self) -> int:
        """K, the number of kept training examples."""
        return int(self.clean_labels.shape[0])

    @property
    def image_shape(self) -> tuple[int, ...]:
        """[H, W, C] of the images the model sees."""
        if self.stream is not None:
            return (self.stream_image_size, self.stream_image_size, 3)
        return tuple(int(d) for d in self.x_train.shape[1:])

    @property
    def sample_images(self) -> np.ndarray:
        """uint8 [1, H, W, C] zeros: the input shape a model is initialised with."""
        return np.zeros((1,) + self.image_shape, np.uint8)

    @property
    def class_counts(self) -> np.ndarray:
        """int64 [C] clean-label counts of the kept training set."""
        return np.bincount(self.clean_labels, minlength=self.num_classes)

    @property
    def noisy_class_counts(self) -> np.ndarray:
        """int64 [C] observed (noisy) label counts."""
        return np.bincount(self.noisy_labels, minlength=self.num_classes)

    @property
    def corrupted_class_counts(self) -> np.ndarray:
        """int64 [C] corrupted samples per clean class."""
        return np.bincount(self.clean_labels[self.is_corrupted], minlength=self.num_classes)

    @property
    def realised_noise_rate(self) -> float:
        """Fraction of training samples whose observed label is wrong."""
        return float(self.is_corrupted.mean())

    def summary(self) -> dict:
        """JSON-serialisable description: sizes, per-class counts, requested and realised noise."""
        return {
            "name": self.name,
            "source": self.source,
            "num_classes": int(self.num_classes),
            "class_names": list(self.class_names),
            "num_train": int(self.clean_labels.shape[0]),
            "num_test": int(self.y_test.shape[0]),
            "image_shape": list(self.image_shape),
            "streaming": self.stream is not None,
            "skipped_unreadable_images": list(getattr(self.stream, "skipped", ())),
            "imbalance_ratio": float(self.imbalance_ratio),
            "realised_imbalance_ratio": float(self.class_counts.max() / self.class_counts.min()),
            "profile": self.profile,
            "noise": self.noise,
            "noise_rate": float(self.noise_rate),
            "realised_noise_rate": self.realised_noise_rate,
            "num_corrupted": int(self.is_corrupted.sum()),
            "seed": int(self.seed),
            "real_noise_key": self.real_noise_key,
            "class_counts": self.class_counts.tolist(),
            "noisy_class_counts": self.noisy_class_counts.tolist(),
            "corrupted_class_counts": self.corrupted_class_counts.tolist(),
        }

    def summary_table(self) -> str:
        """Per-class table: class, name, clean count, noisy-label count, corrupted count."""
        header = (f"{self.name} ({self.source}): {self.clean_labels.shape[0]} train / "
                  f"{self.y_test.shape[0]} test, imbalance {self.imbalance_ratio:g} "
                  f"({self.profile}), noise {self.noise} requested {self.noise_rate:g} realised "
                  f"{self.realised_noise_rate:.4f}")
        width = max([4] + [len(n) for n in self.class_names])
        row = "{:>5}  {:<%d}  {:>7}  {:>7}  {:>9}" % width
        lines = [header, row.format("class", "name", "clean", "noisy", "corrupted")]
        rows = zip(self.class_counts, self.noisy_class_counts, self.corrupted_class_counts)
        for c, (clean, noisy, corrupted) in enumerate(rows):
            lines.append(row.format(c, self.class_names[c], clean, noisy, corrupted))
        lines.append(row.format("all", "", self.class_counts.sum(),
                                self.noisy_class_counts.sum(), self.is_corrupted.sum()))
        return "\n".join(lines)


def make_training_set(dataset: Dataset | StreamingDataset, *, imbalance_ratio: float = 1.0,
                      profile: str = "exp", noise: str = "none", noise_rate: float = 0.0,
                      seed: int = 0, real_noise_key: str | None = None, asym_map: str = "auto",
                      image_size: int = 224) -> TrainingSet:
    """Applies the long tail to the clean labels first, then label noise.

    Args:
      dataset: the raw source.
      imbalance_ratio: n_max / n_min >= 1 (1 keeps every image).
      profile: ``"exp"`` or ``"step"`` (see :func:`long_tail_indices`).
      noise: one of :data:`NOISE_KINDS` (see :func:`corrupt_labels`).
      noise_rate: in [0, 1).
      seed: non-negative int for both the long tail and the noise (independent streams).
      real_noise_key: for ``noise="real"``, the key of ``dataset.extra_labels`` whose labels
        (restricted to the kept images) become the observed labels.
      asym_map: class map of ``asym`` noise; ``"auto"`` picks it from ``dataset.name``.
      image_size: for a streaming source, the side of the square images it is read at.

    Returns:
      The :class:`TrainingSet`.

    Raises:
      ValueError: bad option, a class left with zero samples, missing ``real_noise_key``.
    """
    if not isinstance(dataset, (Dataset, StreamingDataset)):
        raise TypeError(f"dataset must be a dsink_jax.data.Dataset or StreamingDataset, got "
                        f"{type(dataset).__name__}.")
    if profile not in LONG_TAIL_PROFILES:
        raise ValueError(f"Unknown long-tail profile {profile!r}; allowed: {LONG_TAIL_PROFILES}.")
    if noise not in NOISE_KINDS:
        raise ValueError(f"Unknown noise kind {noise!r}; allowed: {NOISE_KINDS}.")
    check_noise_rate(noise_rate)
    if noise == "real":
        if real_noise_key not in dataset.extra_labels:
            raise ValueError(
                f"noise 'real' needs real_noise_key naming one of the dataset's extra label arrays "
                f"{tuple(sorted(dataset.extra_labels))}, got {real_noise_key!r}.")
    elif real_noise_key is not None:
        raise ValueError(f"real_noise_key is only used with noise 'real', got noise {noise!r}.")

    keep = long_tail_indices(dataset.y_train, imbalance_ratio, profile, seed,
                             num_classes=dataset.num_classes)
    clean = dataset.y_train[keep]
    given = dataset.extra_labels[real_noise_key][keep] if noise == "real" else None
    noisy = corrupt_labels(clean, noise, noise_rate, dataset.num_classes, seed,
                           noisy_labels=given, asym_map=asym_map, dataset_name=dataset.name)
    streamed = isinstance(dataset, StreamingDataset)
    return TrainingSet(
        x_train=None if streamed else dataset.x_train[keep], clean_labels=clean,
        noisy_labels=noisy, is_corrupted=noisy != clean,
        x_test=None if streamed else dataset.x_test, y_test=dataset.y_test,
        num_classes=dataset.num_classes, class_names=tuple(dataset.class_names),
        source=dataset.source, name=dataset.name, imbalance_ratio=float(imbalance_ratio),
        profile=profile, noise=noise, noise_rate=float(noise_rate), train_indices=keep,
        seed=seed, real_noise_key=real_noise_key, stream=dataset if streamed else None,
        stream_image_size=int(image_size) if streamed else 0)
