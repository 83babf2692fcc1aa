"""Data pipeline: raw sources, long tail, label noise, on-device augmentation and batching.

Typical use::

  from dsink_jax import data
  ds = data.load_dataset("npz:../shared/data/cifar10.npz")   # or "digits", "tfds:cifar10"
  train = data.make_training_set(ds, imbalance_ratio=100, noise="sym", noise_rate=0.4)
  print(train.summary_table())
"""
from dsink_jax.data.augment import augment_batch
from dsink_jax.data.augment import channel_stats
from dsink_jax.data.augment import epoch_batches
from dsink_jax.data.augment import normalize
from dsink_jax.data.long_tail import LONG_TAIL_PROFILES
from dsink_jax.data.long_tail import long_tail_counts
from dsink_jax.data.long_tail import long_tail_indices
from dsink_jax.data.noise import ASYM_MAPS
from dsink_jax.data.noise import CIFAR100_COARSE
from dsink_jax.data.noise import NOISE_KINDS
from dsink_jax.data.noise import asym_class_map
from dsink_jax.data.noise import corrupt_labels
from dsink_jax.data.sources import CIFAR100_CLASS_NAMES
from dsink_jax.data.sources import CIFAR10_CLASS_NAMES
from dsink_jax.data.sources import Dataset
from dsink_jax.data.sources import DatasetNotPreparedError
from dsink_jax.data.sources import SOURCE_KINDS
from dsink_jax.data.sources import TFDS_DATASETS
from dsink_jax.data.sources import load_dataset
from dsink_jax.data.sources import load_digits
from dsink_jax.data.sources import load_npz
from dsink_jax.data.sources import load_tfds
from dsink_jax.data.streaming import BAD_IMAGE_POLICIES
from dsink_jax.data.streaming import IMAGENET_MEAN
from dsink_jax.data.streaming import IMAGENET_STD
from dsink_jax.data.streaming import STREAMING_TFDS
from dsink_jax.data.streaming import BadInputError
from dsink_jax.data.streaming import StreamingDataset
from dsink_jax.data.streaming import is_streaming_spec
from dsink_jax.data.training_set import TrainingSet
from dsink_jax.data.training_set import make_training_set

__all__ = [
    "ASYM_MAPS", "BAD_IMAGE_POLICIES", "IMAGENET_MEAN", "IMAGENET_STD", "BadInputError", "CIFAR100_CLASS_NAMES", "CIFAR100_COARSE", "CIFAR10_CLASS_NAMES", "Dataset",
    "DatasetNotPreparedError", "LONG_TAIL_PROFILES", "NOISE_KINDS", "SOURCE_KINDS",
    "STREAMING_TFDS", "StreamingDataset", "TFDS_DATASETS", "TrainingSet", "asym_class_map", "augment_batch", "channel_stats",
    "corrupt_labels", "epoch_batches", "is_streaming_spec", "load_dataset", "load_digits", "load_npz", "load_tfds",
    "long_tail_counts", "long_tail_indices", "make_training_set", "normalize",
]
