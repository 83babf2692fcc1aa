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
                  ) -> Callable[[jnp.ndarray], jnp.ndarray]:
    """The learning-rate multiplier as a function of the step.

    Args:
      schedule: "step" (LDAM-DRW / RoLT: linear warm-up, then the base rate multiplied by
        `drop_factors[k]` from `drop_steps[k]` on: x0.01 at epoch 160 and x0.0001 at 180 of 200),
        "cosine" (linear warm-up, then cosine decay to zero at `total_steps`) or "constant"
        (warm-up, then 1).
      total_steps: steps of the whole run.
      warmup_steps: linear warm-up length; the multiplier is (step + 1) / warmup_steps during it.
      drop_steps: for "step", the steps at which a drop factor takes effect.
      drop_factors: for "step", the absolute multipliers (not cumulative), same length.

    Returns:
      `fn(step) -> multiplier`, jittable.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; allowed: {', '.join(SCHEDULES)}")
    if len(drop_steps) != len(drop_factors):
        raise ValueError("drop_steps and drop_factors must have the same length")

    def fn(step):
        step = jnp.asarray(step, jnp.float32)
        warm = jnp.minimum(1.0, (step + 1.0) / max(warmup_steps, 1)) if warmup_steps else 1.0
        if schedule == "constant":
            return warm * jnp.ones_like(step)
        if schedule == "cosine":
            span = max(total_steps - warmup_steps, 1)
            progress = jnp.clip((step - warmup_steps) / span, 0.0, 1.0)
            return warm * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
        mult = jnp.ones_like(step)
        for at, factor in zip(drop_steps, drop_factors):
            mult = jnp.where(step >= at, factor, mult)
        return warm * mult
    return fn


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
