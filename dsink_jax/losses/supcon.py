"""Supervised contrastive loss (Khosla et al. 2020), per anchor; reduce at the call site."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from dsink_jax._checks import check_int_labels as _check_labels
from dsink_jax._checks import check_positive as _check_positive
from dsink_jax._checks import l2_normalize as _l2_normalise

__all__ = ["supcon_loss"]


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
