"""OT-dynamic softmax (Jin et al., JCST 2025) and the supervised contrastive loss.

The classifier is cosine: ``logit_c = s * cos(w_c, z) + h_c``. The heights ``h`` are the
semi-discrete OT potential of :func:`dsink_jax.ot.semidiscrete.semidiscrete_potential` (solved for
the current weights, so that the decision cells carry the target class masses), not parameters:
the loss stops their gradient. What the paper states and what is our reconstruction is in
``METHOD.md`` section 2; SupCon follows Khosla et al. (2020), "all" contrast mode.

All losses are per example (unreduced); reduce at the call site.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from dsink_jax._checks import check_positive as _check_positive
from dsink_jax._checks import concrete as _concrete
from dsink_jax._checks import l2_normalize as _l2_normalise

__all__ = [
    "ot_dynamic_softmax_logits",
    "ot_dynamic_softmax_loss",
    "supcon_loss",
]


def _check_labels(labels, batch_size: int, num_classes: int | None, *, what: str) -> None:
    if jnp.shape(labels) != (batch_size,):
        raise ValueError(
            f"labels must have shape [B] = ({batch_size},) to match {what}, "
            f"got shape {jnp.shape(labels)}.")
    if not jnp.issubdtype(jnp.result_type(labels), jnp.integer):
        raise TypeError(
            f"labels must be integer class indices, got dtype {jnp.result_type(labels)}.")
    concrete = _concrete(labels)
    if (num_classes is not None and concrete is not None and concrete.size
            and (concrete.min() < 0 or concrete.max() >= num_classes)):
        raise ValueError(
            f"labels must lie in [0, {num_classes - 1}] (C = {num_classes} classes), got values in "
            f"[{concrete.min()}, {concrete.max()}].")


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
    and the class weights only. Pass ``h*(W; nu = class frequencies)`` for training (``METHOD.md``).

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


def supcon_loss(projections: jax.Array, labels: jax.Array, *, temperature=0.1,
                base_temperature=None) -> jax.Array:
    """Supervised contrastive loss (Khosla et al. 2020), "all" contrast mode, per anchor.

    Every one of the ``B * V`` projections is an anchor. For anchor ``i`` with positives
    ``P(i) = {j != i : y_j = y_i}`` (its other views always among them, so ``P(i)`` is never
    empty) and contrast set ``A(i) = {j != i}``:

      loss_i = -(T / T_base) / |P(i)| * sum_{p in P(i)} log(exp(z_i.z_p / T) /
               sum_{a in A(i)} exp(z_i.z_a / T)).

    Args:
      projections: [B, V, p] projections of ``V >= 2`` views of each example (normalised inside).
      labels: [B] integer labels.
      temperature: positive temperature ``T`` (BCL uses 0.07 to 0.1).
      base_temperature: positive ``T_base``; ``None`` means ``T`` (the factor is one). Khosla et
        al.'s code uses 0.07.

    Returns:
      [B * V] per-anchor losses in batch-major order: anchor ``(b, v)`` is entry ``b * V + v``, so
      ``loss.reshape(B, V).mean(1)`` is a per-example loss.

    Raises:
      ValueError: on a batch with a single view, mismatched shapes or a non-positive temperature.
      TypeError: on non-integer labels.
    """
    if jnp.ndim(projections) != 3:
        raise ValueError(
            f"projections must have shape [B, V, p] (V views per example), got shape "
            f"{jnp.shape(projections)}.")
    batch_size, num_views, proj_dim = jnp.shape(projections)
    if num_views < 2:
        raise ValueError(
            f"supcon_loss needs at least 2 views per example (V >= 2); got a batch with a single "
            f"view, projections shape {jnp.shape(projections)}.")
    _check_labels(labels, batch_size, None, what=f"projections {jnp.shape(projections)}")
    _check_positive("temperature", temperature)
    if base_temperature is None:
        base_temperature = temperature
    _check_positive("base_temperature", base_temperature)
    return _supcon(projections, labels, temperature, base_temperature)


# Jitted so that eager calls compile once instead of op by op; inlined under an outer jit.
@jax.jit
def _supcon(projections, labels, temperature, base_temperature):
    batch_size, num_views, proj_dim = projections.shape
    num_anchors = batch_size * num_views
    z = _l2_normalise(projections.reshape(num_anchors, proj_dim))
    anchor_labels = jnp.repeat(labels, num_views)  # Batch-major, like the reshape above.
    logits = z @ z.T / temperature
    not_self = ~jnp.eye(num_anchors, dtype=bool)
    positive = (anchor_labels[:, None] == anchor_labels[None, :]) & not_self
    # The anchor itself is excluded from the normaliser; -inf there keeps logsumexp exact.
    log_normaliser = jax.nn.logsumexp(jnp.where(not_self, logits, -jnp.inf), axis=1)
    log_prob = logits - log_normaliser[:, None]
    mean_log_prob_positive = (jnp.sum(jnp.where(positive, log_prob, 0.0), axis=1)
                              / jnp.sum(positive, axis=1))
    return -(temperature / base_temperature) * mean_log_prob_positive
