"""Checkpoints of the whole training state with Orbax, and automatic resume.

Layout: `WORKDIR/checkpoints/<epoch>/`, one Orbax step per finished epoch (the step number is the
number of epochs done), the last `keep` kept. Orbax writes a checkpoint to a temporary directory
and renames it when complete, so a process killed during a save leaves the previous checkpoint
as the latest complete one. A latest checkpoint that fails to restore (truncated, corrupt) is
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
    """Saves and restores `TrainState` pytrees under `directory`."""

    def __init__(self, directory: str | os.PathLike, *, keep: int = 2):
        self.directory = os.path.abspath(os.fspath(directory))
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, create=True, enable_async_checkpointing=False))

    def all_epochs(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(self, epoch: int, state: Any) -> None:
        """Writes the state after `epoch` epochs (blocking; complete or absent, never half)."""
        self._manager.save(epoch, args=ocp.args.StandardSave(state), force=True)
        self._manager.wait_until_finished()

    def restore_latest(self, template: Any) -> tuple[Any, int] | None:
        """Restores the newest readable checkpoint.

        Args:
          template: a state of the right structure (e.g. a freshly initialised one); only its
            shapes, dtypes and tree structure are used.

        Returns:
          (state, epochs_done), or None when there is no checkpoint.
        """
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
        for epoch in reversed(self.all_epochs()):
            try:
                state = self._manager.restore(epoch, args=ocp.args.StandardRestore(abstract))
            except Exception as err:  # a truncated or corrupt checkpoint: fall back
                warnings.warn(f"checkpoint {self.directory}/{epoch} could not be restored "
                              f"({type(err).__name__}: {err}); trying the previous one")
                continue
            logging.info("restored %s/%d", self.directory, epoch)
            return state, epoch
        return None

    def close(self) -> None:
        self._manager.close()
