"""OT-dynamic softmax (Jin et al., JCST 2025): the loss on a cosine classifier with OT heights.

The classifier is cosine: ``logit_c = s * cos(w_c, z) + h_c``. The heights ``h`` are the
semi-discrete OT potential of :func:`dsink_jax.ot.semidiscrete.semidiscrete_potential` (solved for
the current weights, so that the decision cells carry the target class masses), not parameters:
the loss stops their gradient. What the paper states and what is our reconstruction is in
``docs/method.md`` section 2. SupCon, trained alongside, is in :mod:`dsink_jax.losses.supcon`.

The loss is per example (unreduced); reduce at the call site.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from dsink_jax._checks import check_int_labels as _check_labels
from dsink_jax._checks import check_positive as _check_positive
from dsink_jax._checks import l2_normalize as _l2_normalise

__all__ = [
    "ot_dynamic_softmax_logits",
    "ot_dynamic_softmax_loss",
]


def _check_logit_inputs(features, class_weights, potential, scale) -> None:
    if jnp.ndim(features) != 2 or jnp.ndim(class_weights) != 2:
        raise ValueError(
            f"features must be [B, d] and class_weights [C, d], got shapes {jnp.shape(features)} "
            f"and {jnp.shape(class_weights)}.")
    if jnp.shape(features)[1] != jnp.shape(class_weights)[1]:
        raise ValueError(
            f"features and class_weights must share the feature size d, got shapes "
            f"{jnp.shape(features)} and {jnp.shape(class_weights)}.")
    num_classes = jnp.shape(class_weights)[0]
    if jnp.shape(potential) != (num_classes,):
        raise ValueError(
            f"potential must have shape [C] = ({num_classes},) to match class_weights "
            f"{jnp.shape(class_weights)}, got shape {jnp.shape(potential)}.")
    _check_positive("scale", scale)


def ot_dynamic_softmax_logits(features: jax.Array, class_weights: jax.Array,
                              potential: jax.Array, *, scale) -> jax.Array:
    """Cosine-classifier logits shifted by the OT potential.

    Args:
      features: [B, d] features ``z`` (normalised inside).
      class_weights: [C, d] class weights ``w`` (normalised inside).
      potential: [C] heights ``h`` (zeros give the plain cosine classifier).
      scale: positive logit scale ``s``.

    Returns:
      [B, C] logits ``s * cos(w_c, z_b) + h_c``. Differentiable in every argument.

    Raises:
      ValueError: on mismatched shapes or a non-positive ``scale``.
    """
    _check_logit_inputs(features, class_weights, potential, scale)
    cosine = _l2_normalise(features) @ _l2_normalise(class_weights).T
    return scale * cosine + potential


def ot_dynamic_softmax_loss(features: jax.Array, class_weights: jax.Array, labels: jax.Array,
                            potential: jax.Array, *, scale) -> jax.Array:
    """OT-dynamic softmax loss: cross-entropy on ``s * cos(w_c, z) + h_c``.

    The potential is solved, not learned (``jax.lax.stop_gradient``): gradients reach the features
    and the class weights only. Pass ``h*(W; nu = class frequencies)`` for training (``docs/method.md``).

    Args:
      features: [B, d] features ``z`` (normalised inside).
      class_weights: [C, d] class weights ``w`` (normalised inside).
      labels: [B] integer labels in ``[0, C)``.
      potential: [C] heights ``h``.
      scale: positive logit scale ``s``.

    Returns:
      [B] per-example cross-entropy.

    Raises:
      ValueError: on mismatched shapes, labels out of range (checked when concrete) or a
        non-positive ``scale``.
      TypeError: on non-integer labels.
    """
    _check_logit_inputs(features, class_weights, potential, scale)
    _check_labels(labels, jnp.shape(features)[0], jnp.shape(class_weights)[0],
                  what=f"features {jnp.shape(features)}")
    logits = ot_dynamic_softmax_logits(
        features, class_weights, jax.lax.stop_gradient(potential), scale=scale)
    return optax.losses.softmax_cross_entropy_with_integer_labels(logits, labels)
