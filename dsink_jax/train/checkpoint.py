"""Checkpoints of the whole training state with Orbax, and automatic resume.

Layout: `WORKDIR/checkpoints/<step>/`, numbered by optimizer step (at epoch ends, and every
`checkpoint_every_steps` inside epochs), the last `keep` kept. Orbax writes a checkpoint to a
temporary directory and renames it when complete, so a process killed during a save leaves the
previous checkpoint as the latest complete one. A latest checkpoint that fails to restore (truncated, corrupt) is
reported with a warning and the previous one is used.

Frozen teachers are not in the state and are never written here.
"""

from __future__ import annotations

import logging
import os
import warnings
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpointer:
    """Saves and restores `TrainState` pytrees under `directory`, with the data iterator.

    Items: "default" (the state; the single item of earlier versions, which still restore) and,
    for a streaming feed, "data" (grain's iterator state, one file per process).
    """

    def __init__(self, directory: str | os.PathLike, *, keep: int = 2):
        self.directory = os.path.abspath(os.fspath(directory))
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, create=True, enable_async_checkpointing=False),
            item_names=("default", "data"))

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(self, step: int, state: Any, *, data_iterator: Any = None) -> None:
        """Writes the state after `step` optimizer steps, and the data iterator's position
        (blocking; complete or absent, never half)."""
        items = {"default": ocp.args.StandardSave(state)}
        if data_iterator is not None:
            import grain.python as grain  # pylint: disable=g-import-not-at-top
            items["data"] = grain.PyGrainCheckpointSave(data_iterator)
        self._manager.save(step, args=ocp.args.Composite(**items), force=True)
        self._manager.wait_until_finished()

    def restore_latest(self, template: Any, *, data_iterator: Any = None
                       ) -> tuple[Any, int] | None:
        """Restores the newest readable checkpoint (and moves `data_iterator` to its position).

        Args:
          template: a state of the right structure (e.g. a freshly initialised one); only its
            shapes, dtypes and tree structure are used.
          data_iterator: the grain iterator to restore, for a streaming feed.

        Returns:
          (state, checkpoint number), or None when there is no checkpoint. The number is the
          optimizer step (an epoch count in checkpoints of earlier versions); the state's own
          `step` is the unambiguous position.
        """
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
        items = {"default": ocp.args.StandardRestore(abstract)}
        if data_iterator is not None:
            import grain.python as grain  # pylint: disable=g-import-not-at-top
            items["data"] = grain.PyGrainCheckpointRestore(data_iterator)
        for step in reversed(self.all_steps()):
            try:
                restored = self._manager.restore(step, args=ocp.args.Composite(**items))
            except Exception as err:  # a truncated or corrupt checkpoint: fall back
                warnings.warn(f"checkpoint {self.directory}/{step} could not be restored "
                              f"({type(err).__name__}: {err}); trying the previous one")
                continue
            logging.info("restored %s/%d", self.directory, step)
            return restored["default"], step
        return None

    def close(self) -> None:
        self._manager.close()
