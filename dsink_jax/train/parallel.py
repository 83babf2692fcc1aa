"""Data parallelism: one code path for 1 device, N devices and N hosts.

A `jax.sharding.Mesh` with one axis, "data". Batches are global arrays sharded along their first
dimension (`NamedSharding(mesh, P("data"))`); the state, the training set and the frozen teachers
are replicated (`P()`). The step is `jax.jit` with these shardings; XLA inserts the gradient
all-reduce (and the cross-device BatchNorm statistics), so the maths is that of the global batch
on one device, up to the order of floating-point reductions.

Consequences worth knowing:
* The D-SINK allocation is solved over the GLOBAL batch whatever the device count: its column
  sums (the class-mass constraint) reduce across devices, so adding devices at a fixed global
  batch does not change the allocation; changing the global batch does (the batch class mass of
  f_L and the marginal are per batch).
* The global batch must be divisible by the number of devices.
* Multi-host: every process loads the same data and draws the same permutation (seeded by
  (seed, epoch)); each process contributes its slice of the global batch with
  `jax.make_array_from_process_local_data`. Only process 0 writes metrics and results; Orbax
  coordinates checkpoint writes across processes.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def make_mesh(num_devices: int = 0) -> Mesh:
    """A 1-D mesh over the first `num_devices` devices (0 = all devices of all processes)."""
    devices = jax.devices()
    if num_devices < 0 or num_devices > len(devices):
        raise ValueError(f"num_devices={num_devices}; allowed: 0 (all) to {len(devices)} "
                         f"(devices: {[d.platform for d in devices]})")
    if jax.process_count() > 1 and num_devices not in (0, len(devices)):
        raise ValueError("with several processes num_devices must be 0 (all devices)")
    return Mesh(np.asarray(devices[:num_devices or len(devices)]), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(DATA_AXIS))


def check_batch_size(batch_size: int, mesh: Mesh, what: str = "optim.batch_size") -> None:
    n = mesh.devices.size
    if batch_size % n:
        raise ValueError(f"{what}={batch_size} must be divisible by the number of devices ({n})")


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Places a pytree (identical on every process) on all devices of the mesh."""
    sharding = replicated(mesh)

    def put(x):
        x = np.asarray(x) if not isinstance(x, jax.Array) else x
        if isinstance(x, jax.Array) and x.sharding == sharding:
            return x
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])
    return jax.tree.map(put, tree)


def global_batch(host_batch: np.ndarray, mesh: Mesh) -> jax.Array:
    """A global array sharded over the batch axis from the full batch known to every process.

    Each process passes the same global `host_batch`; it contributes only its own rows.
    """
    sharding = batch_sharded(mesh)
    if jax.process_count() == 1:
        return jax.device_put(host_batch, sharding)
    per_process = host_batch.shape[0] // jax.process_count()
    start = jax.process_index() * per_process
    local = host_batch[start:start + per_process]
    return jax.make_array_from_process_local_data(sharding, local, host_batch.shape)


def is_writer() -> bool:
    """Only process 0 writes metrics, results and plots."""
    return jax.process_index() == 0


class DeviceDataset:
    """A training set held on the devices (replicated), serving sharded batches by index.

    A CIFAR-scale dataset fits in device memory, so no host pipeline sits on the hot path: the
    host sends only the batch's indices (from `dsink_jax.data.epoch_batches`).
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, mesh: Mesh):
        self.mesh = mesh
        self._data = replicate({"images": images, "labels": labels.astype(np.int32)}, mesh)
        self._gather = jax.jit(
            lambda data, idx: {"images": data["images"][idx], "labels": data["labels"][idx],
                               "indices": idx},
            out_shardings=batch_sharded(mesh))

    def batch(self, indices: np.ndarray) -> dict[str, jax.Array]:
        """{"images" uint8 [B, ...], "labels" int32 [B], "indices" int32 [B]}, batch-sharded."""
        return self._gather(self._data, global_batch(np.asarray(indices, np.int32), self.mesh))

    def eval_batch_size(self, requested: int) -> int:
        """`requested` rounded up to a multiple of the device count."""
        n = self.mesh.devices.size
        return -(-requested // n) * n
