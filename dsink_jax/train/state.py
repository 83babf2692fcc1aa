"""The training state: one plain pytree, everything the step changes and a resume needs."""

from __future__ import annotations

from typing import Any

import flax
import jax


@flax.struct.dataclass
class TrainState:
    """Explicit training state (no functions inside, so it checkpoints and vmaps as a pytree).

    Attributes:
      step: int32 scalar, optimizer steps taken.
      params: model parameters.
      batch_stats: BatchNorm running statistics (empty dict for models without BatchNorm).
      opt_state: optax state.
      rng: the run's PRNG key (raw uint32[2]); a step uses `fold_in(rng, step)`, never splits it.
      extra: method state carried across steps, e.g. ELR's per-sample targets [N, C].
    """

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    rng: jax.Array
    extra: Any

    @property
    def variables(self) -> dict:
        """The Flax variables for `model.apply`."""
        if self.batch_stats:
            return {"params": self.params, "batch_stats": self.batch_stats}
        return {"params": self.params}
