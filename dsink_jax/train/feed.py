"""Feeding the step: global batches for training, ordered batches for prediction.

One interface, two implementations chosen by the training set:

* :class:`InMemoryFeed` (CIFAR-scale sets): the training set lives on the devices
  (`parallel.DeviceDataset`); the host sends each batch's indices, from `epoch_batches(seed,
  epoch)`; augmentation runs inside the jitted step.
* :class:`StreamingFeed` (ImageNet-LT, iNaturalist, file lists): a grain `DataLoader` reads,
  decodes and augments (random resized crop, flip; one or several views) on the host, in
  `workers` processes; each JAX process reads only its slice of every global batch, and the
  slices are assembled into one batch-sharded `jax.Array` on the mesh.

Both serve the same global batches: the order of epoch e is `epoch_batches(seed, e)` over the
training set in either case, and a process's slice is a contiguous block of the global batch, so
2 processes x 2 devices see exactly the batches of 1 process (tested). The streaming order is
a pure function of the stream position, and the grain iterator's state is checkpointed with the
training state (`Checkpointer.save(..., data_iterator=...)`), so a run killed mid-epoch resumes
with the same batches and the same augmentation.
"""

from __future__ import annotations

import functools
import hashlib
import os
from typing import Any, Callable, Iterator

import jax
import numpy as np

from dsink_jax.data import TrainingSet, epoch_batches
from dsink_jax.data import streaming
from dsink_jax.train import parallel
from dsink_jax.train import step as step_lib
from dsink_jax.train import workdir

_AUGMENT_STREAM = 0x4155


def check_batch_fits(batch_size: int, num_train: int) -> None:
    """Raises before any work when a batch would not fit in the training set."""
    if batch_size > num_train:
        raise ValueError(f"optim.batch_size={batch_size} is larger than the training set "
                         f"({num_train} examples); allowed: 1..{num_train}")


class InMemoryFeed:
    """The training set held on the devices; batches gathered there by index."""

    data_iterator = None  # nothing to checkpoint: the order is a function of (seed, epoch)

    def __init__(self, training_set: TrainingSet, mesh, *, batch_size: int, seed: int,
                 eval_batch_size: int):
        self.ts, self.mesh, self.seed, self.batch_size = training_set, mesh, seed, batch_size
        self.num_train = training_set.num_train
        check_batch_fits(batch_size, self.num_train)
        self.steps_per_epoch = self.num_train // batch_size
        self.eval_batch_size = -(-eval_batch_size // mesh.devices.size) * mesh.devices.size

    @functools.cached_property
    def dataset(self) -> parallel.DeviceDataset:
        """The training set on the devices (placed at the first training batch)."""
        return parallel.DeviceDataset(self.ts.x_train, self.ts.noisy_labels, self.mesh)

    def epoch(self, epoch: int, start: int = 0) -> Iterator[dict]:
        """The batches of `epoch` from its `start`-th step on (a resume inside an epoch)."""
        for idx in epoch_batches(self.seed, epoch, self.num_train, self.batch_size)[start:]:
            yield self.dataset.batch(idx)

    def predict(self, predict_fn: Callable, state: Any, split: str) -> np.ndarray:
        """`predict_fn(state, uint8 images) -> [b, ...]` over the split ("test" or "train")."""
        images = self.ts.x_test if split == "test" else self.ts.x_train
        return step_lib.batched_predict(
            predict_fn, state, images, self.eval_batch_size,
            put=functools.partial(parallel.global_batch, mesh=self.mesh))


class _Records:
    """Records of a streaming source with their labels, as grain reads them.

    Item k is the source's record k plus its "label" and its position "index". `name` is the
    repr, which grain compares when it restores an iterator: it must identify the records and
    labels.

    grain's worker processes unpickle it: a worker that is a child of the process that pickled
    it (the training process) ends itself once that process is gone (`workdir.exit_with_parent`),
    as grain's own clean-up does not run when the training process is killed (SIGKILL, OOM).
    """

    _watching_parent = False  # this process already watches its parent

    def __init__(self, source, labels: np.ndarray, *, name: str):
        self.source, self.labels, self._repr = source, np.asarray(labels, np.int32), name

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_owner_pid": os.getpid()}

    def __setstate__(self, state: dict) -> None:
        owner = state.pop("_owner_pid")
        self.__dict__.update(state)
        if os.getppid() == owner and not _Records._watching_parent:
            _Records._watching_parent = True
            workdir.exit_with_parent(owner)

    def __repr__(self) -> str:
        return self._repr

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        return {**self.source[index], "label": self.labels[index], "index": np.int32(index)}


def _training_records(ts: TrainingSet) -> _Records:
    """The kept training records with their given (noisy) labels."""
    raw = np.asarray(ts.train_indices, np.int64)
    labels = np.asarray(ts.noisy_labels, np.int32)
    digest = hashlib.sha256(raw.tobytes() + labels.tobytes()).hexdigest()[:16]
    return _Records(streaming.Subset(ts.stream.train, raw), labels,
                    name=f"_TrainingRecords({ts.source}, n={len(raw)}, digest={digest})")


def _test_records(ts: TrainingSet) -> _Records:
    return _Records(ts.stream.test, ts.y_test, name=f"_TestRecords({ts.source}, "
                                                     f"n={len(ts.y_test)})")


def _slice_position(i: int, *, num_processes: int, num_workers: int, local_batch: int,
                    global_batch: int) -> int:
    """The global stream position of sampler index `i`, so that grain's batches are the
    contiguous blocks of the global batches.

    grain hands process p the sampler indices p, p + P, p + 2P, ...; of those, worker w gets
    every k-th (the m-th goes to worker m mod k), batches b consecutive ones, and the loader
    emits the workers' batches round robin. So the m-th index of process p is record
    t = m // k of worker w = m mod k, in that worker's batch j = t // b, which is emitted as
    local batch n = j k + w: it must hold global position n B + p b + (t mod b).
    """
    process, m = i % num_processes, i // num_processes
    workers = max(num_workers, 1)
    worker, t = m % workers, m // workers
    j, offset = divmod(t, local_batch)
    return (j * workers + worker) * global_batch + process * local_batch + offset


class _TrainSampler:
    """grain sampler: stream position -> training record, epoch after epoch (epoch_batches)."""

    def __init__(self, *, num_train: int, batch_size: int, seed: int, num_processes: int,
                 num_workers: int):
        self.num_train, self.batch_size, self.seed = num_train, batch_size, seed
        self.num_processes, self.num_workers = num_processes, num_workers
        self.per_epoch = (num_train // batch_size) * batch_size

    def __len__(self) -> int:
        return 2 ** 62

    def __repr__(self) -> str:  # grain checks a restored iterator's sampler by its repr
        return (f"_TrainSampler(num_train={self.num_train}, batch_size={self.batch_size}, "
                f"seed={self.seed}, num_processes={self.num_processes}, "
                f"num_workers={self.num_workers})")

    @functools.lru_cache(maxsize=2)
    def _order(self, epoch: int) -> np.ndarray:
        return epoch_batches(self.seed, epoch, self.num_train, self.batch_size).reshape(-1)

    def __getitem__(self, i: int):
        import grain.python as grain  # pylint: disable=g-import-not-at-top
        position = _slice_position(i, num_processes=self.num_processes,
                                   num_workers=self.num_workers,
                                   local_batch=self.batch_size // self.num_processes,
                                   global_batch=self.batch_size)
        epoch, offset = divmod(position, self.per_epoch)
        return grain.RecordMetadata(
            index=i, record_key=int(self._order(epoch)[offset]),
            rng=np.random.default_rng((self.seed, _AUGMENT_STREAM, position)))


class _EvalSampler:
    """grain sampler over `num_records` in order, padded (with record 0) to whole batches."""

    def __repr__(self) -> str:
        return (f"_EvalSampler(num_records={self.num_records}, batch_size={self.batch_size}, "
                f"num_processes={self.num_processes}, num_workers={self.num_workers})")

    def __init__(self, *, num_records: int, batch_size: int, num_processes: int,
                 num_workers: int):
        self.num_records, self.batch_size = num_records, batch_size
        self.num_processes, self.num_workers = num_processes, num_workers
        # Whole batches for every worker, so that no worker emits a partial batch.
        unit = batch_size * max(num_workers, 1)
        self.padded = -(-num_records // unit) * unit

    def __len__(self) -> int:
        return self.padded

    def __getitem__(self, i: int):
        import grain.python as grain  # pylint: disable=g-import-not-at-top
        position = _slice_position(i, num_processes=self.num_processes,
                                   num_workers=self.num_workers,
                                   local_batch=self.batch_size // self.num_processes,
                                   global_batch=self.batch_size)
        return grain.RecordMetadata(index=i, record_key=position if position < self.num_records
                                    else 0)


def _train_transform(image_size: int, num_views: int):
    import grain.python as grain  # pylint: disable=g-import-not-at-top

    class TrainTransform(grain.RandomMapTransform):
        """Decode, then `num_views` random resized crops with random flips."""

        def random_map(self, element, rng):
            image = streaming.decode_image(element["image"], element["path"])
            views = []
            for _ in range(num_views):
                view = streaming.random_resized_crop(image, image_size, rng)
                views.append(view[:, ::-1] if rng.random() < 0.5 else view)
            return {"images": streaming.stack_views(views), "labels": element["label"],
                    "indices": element["index"]}

    return TrainTransform()


def _eval_transform(image_size: int):
    import grain.python as grain  # pylint: disable=g-import-not-at-top

    class EvalTransform(grain.MapTransform):
        """Decode, resize the shorter side to image_size / 0.875, centre crop."""

        def map(self, element):
            image = streaming.decode_image(element["image"], element["path"])
            return {"images": streaming.center_crop(image, image_size),
                    "indices": element["index"]}

    return EvalTransform()


def _ready_grain():
    # grain's multiprocessing reads absl flags; a library call (a test, a notebook) has none.
    from absl import flags  # pylint: disable=g-import-not-at-top
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    import grain.python as grain  # pylint: disable=g-import-not-at-top
    return grain


class StreamingFeed:
    """Records read, decoded and augmented by grain workers; see the module docstring.

    Args:
      training_set: a streaming :class:`TrainingSet` (`training_set.stream` set).
      mesh: the device mesh.
      batch_size: the global batch (divisible by the process count and the device count).
      seed: the data seed (order and augmentation).
      image_size: side of the square training and evaluation images.
      num_views: augmented views per record and step (2 for contrastive objectives).
      workers: grain worker processes (0 = in the training process).
      eval_batch_size: global batch of predictions.
    """

    def __init__(self, training_set: TrainingSet, mesh, *, batch_size: int, seed: int,
                 image_size: int, num_views: int = 1, workers: int = 0,
                 eval_batch_size: int = 512):
        grain = _ready_grain()
        self.ts, self.mesh, self.batch_size = training_set, mesh, batch_size
        self.num_train = training_set.num_train
        check_batch_fits(batch_size, self.num_train)
        self.steps_per_epoch = self.num_train // batch_size
        self.num_processes, self.process = jax.process_count(), jax.process_index()
        parallel.check_batch_size(batch_size, mesh)
        eval_batch_size = -(-eval_batch_size // mesh.devices.size) * mesh.devices.size
        self.image_size, self.workers = image_size, workers
        self.eval_batch_size = eval_batch_size
        self._shard = grain.ShardOptions(self.process, self.num_processes)
        self.loader = grain.DataLoader(
            data_source=_training_records(training_set),
            sampler=_TrainSampler(num_train=self.num_train, batch_size=batch_size, seed=seed,
                                  num_processes=self.num_processes, num_workers=workers),
            operations=[_train_transform(image_size, num_views),
                        grain.Batch(batch_size // self.num_processes, drop_remainder=True)],
            worker_count=workers, shard_options=self._shard)

    @functools.cached_property
    def data_iterator(self):
        """The training stream's grain iterator (its workers start on first use)."""
        return iter(self.loader)

    def _global(self, local: dict) -> dict:
        sharding = parallel.batch_sharded(self.mesh)
        out = {}
        for key, value in local.items():
            value = np.asarray(value)
            global_shape = (value.shape[0] * self.num_processes,) + value.shape[1:]
            out[key] = jax.make_array_from_process_local_data(sharding, value, global_shape)
        return out

    def epoch(self, epoch: int, start: int = 0) -> Iterator[dict]:
        """The batches of `epoch` from step `start` on: the stream continues where it is (a
        restored iterator already stands at that step)."""
        del epoch
        for _ in range(start, self.steps_per_epoch):
            yield self._global(next(self.data_iterator))

    def predict(self, predict_fn: Callable, state: Any, split: str) -> np.ndarray:
        """`predict_fn(state, uint8 images) -> [b, ...]` over "test" or "train" (unaugmented,
        centre-cropped), in record order."""
        grain = _ready_grain()
        records = _test_records(self.ts) if split == "test" else _training_records(self.ts)
        loader = grain.DataLoader(
            data_source=records,
            sampler=_EvalSampler(num_records=len(records), batch_size=self.eval_batch_size,
                                 num_processes=self.num_processes, num_workers=self.workers),
            operations=[_eval_transform(self.image_size),
                        grain.Batch(self.eval_batch_size // self.num_processes)],
            worker_count=self.workers, shard_options=self._shard)
        outputs = [np.asarray(predict_fn(state, self._global(batch)["images"]))
                   for batch in loader]
        return np.concatenate(outputs)[:len(records)]


def resolve_workers(workers: int) -> int:
    """`input.workers`: -1 = one fewer than the CPUs (at most 16), else the number given."""
    if workers >= 0:
        return workers
    return max(0, min(16, (os.cpu_count() or 1) - 1))


def make_feed(training_set: TrainingSet, mesh, *, batch_size: int, seed: int,
              eval_batch_size: int, image_size: int = 0, num_views: int = 1, workers: int = 0):
    """The feed for a training set: in memory, or streaming when `training_set.stream` is set."""
    if training_set.stream is None:
        return InMemoryFeed(training_set, mesh, batch_size=batch_size, seed=seed,
                            eval_batch_size=eval_batch_size)
    return StreamingFeed(training_set, mesh, batch_size=batch_size, seed=seed,
                         image_size=image_size, num_views=num_views, workers=workers,
                         eval_batch_size=eval_batch_size)
