"""SGD with momentum and weight decay, and the learning-rate schedules of the literature.

The base learning rate, momentum and weight decay are injected hyperparameters
(`optax.inject_hyperparams`): they live in the optimizer state as arrays, so a vmapped sweep can
give every member its own value while sharing one compiled step. The schedule is a multiplier of
the step count applied on top of the base rate.
"""

from __future__ import annotations

from typing import Callable

import jax.numpy as jnp
import optax

SCHEDULES = ("step", "cosine", "constant")


def lr_multiplier(schedule: str, *, total_steps: int, warmup_steps: int,
                  drop_steps: tuple[int, ...] = (), drop_factors: tuple[float, ...] = ()
                  ) -> optax.Schedule:
    """The learning-rate multiplier as an optax schedule (a function of the step).

    Built from optax's schedules: a linear warm-up (`optax.linear_schedule`, the multiplier is
    (step + 1) / warmup_steps during it), joined (`optax.join_schedules`) to

    * "cosine": `optax.cosine_decay_schedule` from 1 to 0 at `total_steps`;
    * "step" (LDAM-DRW / RoLT): `optax.piecewise_constant_schedule`, the base rate multiplied by
      `drop_factors[k]` from `drop_steps[k]` on (absolute factors, not cumulative: x0.01 at epoch
      160 and x0.0001 at 180 of 200);
    * "constant": 1.

    Args:
      schedule: one of :data:`SCHEDULES`.
      total_steps: steps of the whole run.
      warmup_steps: linear warm-up length (0 = none).
      drop_steps: for "step", increasing steps (after the warm-up) at which a factor applies.
      drop_factors: for "step", the absolute multipliers, same length.

    Returns:
      `fn(step) -> multiplier`, jittable.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; allowed: {', '.join(SCHEDULES)}")
    if len(drop_steps) != len(drop_factors):
        raise ValueError("drop_steps and drop_factors must have the same length")
    if schedule == "cosine":
        after = optax.cosine_decay_schedule(1.0, max(total_steps - warmup_steps, 1))
    elif schedule == "step":
        # optax's scales are cumulative: each is the ratio of a factor to the previous one.
        previous, scales = 1.0, {}
        for at, factor in zip(drop_steps, drop_factors):
            scales[int(at) - warmup_steps] = factor / previous
            previous = factor
        after = optax.piecewise_constant_schedule(1.0, scales)
    else:
        after = optax.constant_schedule(1.0)
    if not warmup_steps:
        return after
    warm = optax.linear_schedule(1.0 / warmup_steps, 1.0, max(warmup_steps - 1, 1))
    return optax.join_schedules([warm, after], [warmup_steps])


def sgd(*, learning_rate: float, momentum: float, weight_decay: float,
        multiplier: Callable[[jnp.ndarray], jnp.ndarray], nesterov: bool = False
        ) -> optax.GradientTransformation:
    """PyTorch-equivalent SGD: d = g + wd * p; buf = momentum * buf + d; p -= lr(t) * buf.

    Args:
      learning_rate: the base rate (an injected hyperparameter).
      momentum: heavy-ball momentum (injected).
      weight_decay: L2 coefficient added to the gradient, on all parameters as in the PyTorch
        reference code of LDAM-DRW and RoLT (injected).
      multiplier: the schedule, `fn(step) -> multiplier` (see :func:`lr_multiplier`).
      nesterov: Nesterov momentum.
    """

    def make(learning_rate, momentum, weight_decay):
        return optax.chain(
            optax.add_decayed_weights(weight_decay),
            optax.trace(decay=momentum, nesterov=nesterov),
            optax.scale_by_schedule(lambda count: -learning_rate * multiplier(count)),
        )

    return optax.inject_hyperparams(make)(
        learning_rate=learning_rate, momentum=momentum, weight_decay=weight_decay)


def from_config(optim_config, *, steps_per_epoch: int) -> optax.GradientTransformation:
    """The optimizer of `config.optim` (epochs converted to steps)."""
    total = optim_config.epochs * steps_per_epoch
    multiplier = lr_multiplier(
        optim_config.schedule, total_steps=total,
        warmup_steps=int(round(optim_config.warmup_epochs * steps_per_epoch)),
        drop_steps=tuple(int(round(f * optim_config.epochs)) * steps_per_epoch
                         for f in optim_config.lr_drop_fractions),
        drop_factors=tuple(optim_config.lr_drop_factors))
    return sgd(learning_rate=optim_config.learning_rate, momentum=optim_config.momentum,
               weight_decay=optim_config.weight_decay, multiplier=multiplier,
               nesterov=optim_config.nesterov)
