"""Shared input checks and small numerics used by the losses and the OT solvers.

Value checks (finite, in range, a distribution) need the value now: under `jit`/`vmap`/`grad`
inputs are tracers and only the static (shape, dtype) checks can run.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def concrete(x: Any) -> np.ndarray | None:
    """`x` as a NumPy array when its value is known now, None when it is traced."""
    try:
        return np.asarray(x)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def is_concrete(x: Any) -> bool:
    """Whether `x` holds a value now (not a tracer)."""
    return concrete(x) is not None


def check_positive(name: str, value: Any) -> None:
    """Raises ValueError unless the (concrete) value is > 0 everywhere; traced values pass."""
    value_now = concrete(value)
    if value_now is not None and not np.all(value_now > 0):
        raise ValueError(f"{name} must be > 0 (allowed range: (0, inf)), got {value!r}.")


def l2_normalize(x: jax.Array, axis: int = -1) -> jax.Array:
    """x / |x| along `axis`, with no NaN value or gradient at 0 and no overflow for huge x.

    The row is first divided by its largest magnitude (so squaring cannot overflow float32),
    then by the rsqrt of its clipped squared norm.
    """
    peak = jax.lax.stop_gradient(jnp.max(jnp.abs(x), axis=axis, keepdims=True))
    x = x / jnp.where(peak > 0, peak, 1.0)
    sq_norm = jnp.sum(jnp.square(x), axis=axis, keepdims=True)
    return x * jax.lax.rsqrt(jnp.maximum(sq_norm, 1e-24))


def check_int_labels(labels: Any, batch_size: int, num_classes: int | None, *,
                     what: str) -> None:
    """Raises unless `labels` are int [batch_size] (and, when concrete, in [0, num_classes)).

    Args:
      labels: the labels to check.
      batch_size: the expected length.
      num_classes: C, or None to skip the range check.
      what: the array the labels must match, for the message.
    """
    if jnp.shape(labels) != (batch_size,):
        raise ValueError(
            f"labels must have shape [B] = ({batch_size},) to match {what}, "
            f"got shape {jnp.shape(labels)}.")
    if not jnp.issubdtype(jnp.result_type(labels), jnp.integer):
        raise TypeError(
            f"labels must be integer class indices, got dtype {jnp.result_type(labels)}.")
    values = concrete(labels)
    if (num_classes is not None and values is not None and values.size
            and (values.min() < 0 or values.max() >= num_classes)):
        raise ValueError(
            f"labels must lie in [0, {num_classes - 1}] (C = {num_classes} classes), got values in "
            f"[{values.min()}, {values.max()}].")
