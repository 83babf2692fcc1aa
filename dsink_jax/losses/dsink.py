"""The D-SINK loss: base loss + alpha * soft-label CE to the Sinkhorn allocation.

docs/method.md section 1. For a batch with student logits ``s``, noise-robust
teacher logits ``s^N`` and imbalance-robust teacher logits ``s^L``:

  Q       = sinkhorn_allocation(log_softmax(s^N), log_softmax(s), m)   (target)
  loss_i  = L_base(s_i, y_i) + alpha * CE(q_i, softmax(s_i))

with ``m`` the imbalance teacher's class mass: the batch mean of
``softmax(s^L)`` (``class_mass=None``, the "batch" mode) or a fixed vector such
as :func:`global_class_mass` over the training set (the "global" mode).
Teachers and Q carry no gradient, so the student gradient is that of the
soft-label CE with Q held fixed (the paper's bi-level scheme).
"""
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dsink_jax.ot.sinkhorn import (SINKHORN_MODES, _is_concrete, _validate_options, check_where,
                                   sinkhorn_allocation)

__all__ = ["BASE_LOSSES", "DSinkAux", "DistillationTerms", "REDUCTIONS", "dsink_loss",
           "distillation_terms", "global_class_mass"]

REDUCTIONS = ("mean", "none")


class DistillationTerms(NamedTuple):
    """Per-example terms of the student's loss for one allocation (all [B] unless stated).

    Attributes:
      per_example: base + alpha * distill (0 on rows masked out by ``where``).
      base: the base loss L_base.
      distill: the soft-label CE to Q.
      allocation: [B, C] the target Q (no gradient).
      allocation_entropy: [] mean row entropy of Q over valid rows (nats).
      finite: [] bool, whether the loss and Q are all finite (under jit non-finite inputs
        cannot raise; check this flag instead).
    """

    per_example: jax.Array
    base: jax.Array
    distill: jax.Array
    allocation: jax.Array
    allocation_entropy: jax.Array
    finite: jax.Array


class DSinkAux(NamedTuple):
    """What :func:`dsink_loss` returns beside the loss: the terms and the solve's diagnostics.

    Attributes:
      per_example, base, distill, allocation, allocation_entropy, finite: see
        :class:`DistillationTerms`.
      class_mass: [C] the class mass used.
      marginal_error: [] max class-marginal violation of Q relative to the valid rows.
    """

    per_example: jax.Array
    base: jax.Array
    distill: jax.Array
    allocation: jax.Array
    allocation_entropy: jax.Array
    finite: jax.Array
    class_mass: jax.Array
    marginal_error: jax.Array

# L_base: "ce" on the given labels, "la" the logit-adjusted CE (the imbalance-robust loss, with
# the given-label prior), "none" (the D-SINK term alone).
BASE_LOSSES = ("ce", "la", "none")


def global_class_mass(imbalance_teacher_logits_all: jax.Array) -> jax.Array:
    """Class mass of the imbalance teacher over a whole dataset ("global" mode).

    Args:
      imbalance_teacher_logits_all: [N, C] logits of ``f_L`` on every training
        example (computed once; ``f_L`` is frozen).

    Returns:
      [C] float32 mean of ``softmax`` over the N examples (sums to 1).
    """
    logits = jnp.asarray(imbalance_teacher_logits_all)
    if logits.ndim != 2 or logits.shape[0] < 1:
        raise ValueError(
            f"imbalance_teacher_logits_all has shape {logits.shape}; expected "
            "[N, C] with N >= 1.")
    if _is_concrete(logits) and not np.all(np.isfinite(np.asarray(logits))):
        raise ValueError(
            "imbalance_teacher_logits_all has non-finite entries; logits must be "
            "finite.")
    return jnp.mean(jax.nn.softmax(logits.astype(jnp.float32), axis=-1), axis=0)


def _check_logits(name, logits, expected_shape):
    shape = jnp.shape(logits)
    if len(shape) != 2 or (expected_shape is not None
                           and shape != expected_shape):
        want = "[B, C]" if expected_shape is None else str(expected_shape)
        raise ValueError(
            f"{name} has shape {shape}; expected {want} (the student's shape).")
    if _is_concrete(logits) and not np.all(np.isfinite(np.asarray(logits))):
        raise ValueError(f"{name} has non-finite entries; logits must be finite.")


def _validate(student_logits, noise_teacher_logits, imbalance_teacher_logits,
              labels, alpha, epsilon, class_mass, num_iters, backend,
              base_loss, label_prior=None, where=None, reduction="mean",
              sinkhorn_mode="auto"):
    """Raises ValueError/TypeError before any computation (trace time)."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction={reduction!r}; allowed values: {REDUCTIONS}.")
    if base_loss not in BASE_LOSSES:
        raise ValueError(
            f"base_loss={base_loss!r}; allowed values: {BASE_LOSSES}.")
    _check_logits("student_logits", student_logits, None)
    shape = jnp.shape(student_logits)
    _check_logits("noise_teacher_logits", noise_teacher_logits, shape)
    if imbalance_teacher_logits is None:
        if class_mass is None:
            raise ValueError(
                "imbalance_teacher_logits=None needs a class_mass vector (the "
                "'global' mode); got class_mass=None.")
    else:
        _check_logits("imbalance_teacher_logits", imbalance_teacher_logits, shape)
    if base_loss == "la":
        if label_prior is None:
            raise ValueError("base_loss='la' needs label_prior (the [C] given-label "
                             "distribution); got label_prior=None.")
        if jnp.shape(label_prior) != shape[1:]:
            raise ValueError(f"label_prior has shape {jnp.shape(label_prior)}; expected "
                             f"({shape[1]},).")
        if _is_concrete(label_prior):
            prior = np.asarray(label_prior, np.float64)
            if not (np.all(np.isfinite(prior)) and np.all(prior > 0)
                    and abs(prior.sum() - 1.0) < 1e-4):
                raise ValueError(f"label_prior={prior} must be > 0 and sum to 1.")
    if base_loss in ("ce", "la"):
        if labels is None:
            raise ValueError(f"labels=None needs base_loss='none'; base_loss={base_loss!r}.")
        if jnp.shape(labels) != shape[:1]:
            raise ValueError(
                f"labels has shape {jnp.shape(labels)}; expected ({shape[0]},).")
        if not jnp.issubdtype(jnp.result_type(labels), jnp.integer):
            raise TypeError(
                f"labels has dtype {jnp.result_type(labels)}; expected integers.")
        if _is_concrete(labels):
            values = np.asarray(labels)
            if values.size and (values.min() < 0 or values.max() >= shape[1]):
                raise ValueError(
                    f"labels range over [{values.min()}, {values.max()}]; allowed "
                    f"range: [0, {shape[1] - 1}].")
    if not isinstance(sinkhorn_mode, str) or sinkhorn_mode not in SINKHORN_MODES:
        raise ValueError(f"sinkhorn_mode={sinkhorn_mode!r}; allowed values: {SINKHORN_MODES}.")
    # Here, not only inside the solver: there epsilon and class_mass are
    # already traced by _dsink_loss's jit and their values cannot be checked.
    _validate_options(shape[1], class_mass, epsilon, num_iters, backend, sinkhorn_mode)
    check_where(where, shape[0])
    if jnp.shape(alpha) != ():
        raise ValueError(f"alpha has shape {jnp.shape(alpha)}; expected a scalar.")
    if _is_concrete(alpha):
        alpha_value = float(np.asarray(alpha))
        if not (np.isfinite(alpha_value) and alpha_value >= 0):
            raise ValueError(
                f"alpha={alpha_value}; allowed range: finite and >= 0.")


def dsink_loss(
    student_logits: jax.Array,
    noise_teacher_logits: jax.Array,
    imbalance_teacher_logits: jax.Array | None,
    labels: jax.Array | None,
    *,
    alpha: float | jax.Array,
    epsilon: float | jax.Array = 2.0,
    class_mass: jax.Array | None = None,
    num_iters: int = 50,
    backend: str = "ott",
    base_loss: str = "ce",
    label_prior: jax.Array | None = None,
    la_tau: float = 1.0,
    where: jax.Array | None = None,
    reduction: str = "mean",
    sinkhorn_mode: str = "auto",
) -> tuple[jax.Array, DSinkAux]:
    """D-SINK loss of one batch: base + alpha * soft CE to the allocation Q.

    Pure; works under ``jit``, ``grad``, ``vmap`` over ``alpha``/``epsilon`` and
    with the batch sharded over devices (the batch reductions are ordinary
    ``jnp`` reductions, which XLA partitions). D-SINK couples the rows of a
    batch (through the class marginal), so padded rows must be masked out with
    ``where``: the other rows then get exactly the loss of the batch without them.

    Args:
      student_logits: [B, C] logits of the model being trained.
      noise_teacher_logits: [B, C] logits of the noise-robust teacher ``f_N``
        (gradient stopped).
      imbalance_teacher_logits: [B, C] logits of the imbalance-robust teacher
        ``f_L`` (gradient stopped), or None when ``class_mass`` is given.
      labels: [B] int observed (possibly noisy) labels for the base loss; may be
        None with ``base_loss="none"``.
      alpha: weight (>= 0) of the D-SINK term; may be traced.
      epsilon: entropic regularisation (> 0; the paper's 2.0); may be traced.
      class_mass: None ("batch" mode: mean of ``softmax(imbalance_teacher_logits)``
        over the valid rows) or a [C] distribution used as is ("global" mode, see
        :func:`global_class_mass`).
      num_iters: Sinkhorn iterations (static int >= 1).
      backend: "ott" or "native", see :func:`~dsink_jax.ot.sinkhorn_allocation`.
      base_loss: "ce" (cross-entropy on ``labels``), "la" (logit-adjusted
        cross-entropy ``CE(s + la_tau * log label_prior, y)``, the imbalance-robust
        base) or "none" (D-SINK term only).
      label_prior: [C] given-label distribution, for ``base_loss="la"``.
      la_tau: temperature of the "la" base loss.
      where: optional [B] bool mask of the valid rows.
      reduction: "mean" (the loss is the mean of ``aux.per_example`` over the
        valid rows) or "none" (the loss is ``aux.per_example`` itself, optax style).
      sinkhorn_mode: the solve's ``mode``, "auto" (scaling domain where safe, else log
        domain), "log" or "kernel"; see :func:`~dsink_jax.ot.sinkhorn_allocation`.

    Returns:
      ``(loss, aux)``: ``loss`` [] (or [B] with ``reduction="none"``) and a
      :class:`DSinkAux`. Use ``jax.value_and_grad(..., has_aux=True)``.

    Raises:
      ValueError, TypeError: on bad shapes, options or (concrete) values.
    """
    _validate(student_logits, noise_teacher_logits, imbalance_teacher_logits,
              labels, alpha, epsilon, class_mass, num_iters, backend, base_loss,
              label_prior, where, reduction, sinkhorn_mode)
    valid = (jnp.ones(jnp.shape(student_logits)[:1], bool) if where is None
             else jnp.asarray(where))
    aux = _dsink_loss(student_logits, noise_teacher_logits,
                      imbalance_teacher_logits, labels, alpha, epsilon,
                      class_mass, label_prior, la_tau, valid, num_iters=num_iters,
                      backend=backend, base_loss=base_loss, sinkhorn_mode=sinkhorn_mode)
    if reduction == "none":
        return aux.per_example, aux
    return jnp.sum(aux.per_example) / jnp.sum(valid), aux


# Jitted so that eager calls (tests, notebooks) compile once per shape rather
# than dispatching op by op; inlined under an outer jit. None arguments are
# empty pytrees, so batch/global mode and labels=None each trace separately.
@functools.partial(jax.jit,
                   static_argnames=("num_iters", "backend", "base_loss", "sinkhorn_mode"))
def _dsink_loss(student_logits, noise_teacher_logits,
                imbalance_teacher_logits, labels, alpha, epsilon, class_mass,
                label_prior, la_tau, valid, *, num_iters, backend, base_loss,
                sinkhorn_mode="auto"):
    """The computation of :func:`dsink_loss`, on validated inputs: its DSinkAux."""
    student_logits = jnp.asarray(student_logits).astype(jnp.float32)
    noise_log_probs = jax.nn.log_softmax(
        jax.lax.stop_gradient(jnp.asarray(noise_teacher_logits, jnp.float32)))
    if class_mass is None:
        imbalance_probs = jax.nn.softmax(jax.lax.stop_gradient(
            jnp.asarray(imbalance_teacher_logits, jnp.float32)))
        class_mass = jnp.mean(imbalance_probs, axis=0, where=valid[:, None])
    else:
        class_mass = jax.lax.stop_gradient(jnp.asarray(class_mass, jnp.float32))
    student_log_probs = jax.nn.log_softmax(student_logits)

    solved = sinkhorn_allocation(
        noise_log_probs, student_log_probs, class_mass, epsilon=epsilon,
        num_iters=num_iters, backend=backend, where=valid, mode=sinkhorn_mode)
    terms = distillation_terms(student_logits, solved.allocation, labels, alpha=alpha,
                               base_loss=base_loss, label_prior=label_prior,
                               la_tau=la_tau, where=valid)
    return DSinkAux(*terms, class_mass=class_mass, marginal_error=solved.column_error)


def distillation_terms(student_logits: jax.Array, allocation: jax.Array,
                       labels: jax.Array | None, *, alpha: float | jax.Array,
                       base_loss: str = "ce", label_prior: jax.Array | None = None,
                       la_tau: float | jax.Array = 1.0,
                       where: jax.Array | None = None) -> DistillationTerms:
    """Per-example D-SINK terms for a given allocation: base + alpha * CE(q_i, f(x_i)).

    The one place the student's loss is assembled, whichever way Q was found
    (per-batch Sinkhorn in :func:`dsink_loss`, a carried class potential or a
    dataset-level solve looked up by index in the training objective).

    Args:
      student_logits: [B, C].
      allocation: [B, C] target Q (rows on the simplex); gradient stopped here.
      labels: [B] int given labels (unused with ``base_loss="none"``).
      alpha: weight of the soft-label term.
      base_loss: one of :data:`BASE_LOSSES`.
      label_prior: [C] given-label distribution for ``base_loss="la"``.
      la_tau: temperature of the "la" base loss.
      where: optional [B] bool mask; masked rows get 0 loss and count in no mean.

    Returns:
      A :class:`DistillationTerms`.
    """
    student_logits = jnp.asarray(student_logits).astype(jnp.float32)
    # The bi-level scheme depends on Q being a constant target.
    allocation = jax.lax.stop_gradient(jnp.asarray(allocation, jnp.float32))
    distill = optax.losses.softmax_cross_entropy(student_logits, allocation)
    if base_loss == "ce":
        base = optax.losses.softmax_cross_entropy_with_integer_labels(
            student_logits, jnp.asarray(labels))
    elif base_loss == "la":
        shift = la_tau * jnp.log(jnp.asarray(label_prior, jnp.float32))
        base = optax.losses.softmax_cross_entropy_with_integer_labels(
            student_logits + shift, jnp.asarray(labels))
    elif base_loss == "none":
        base = jnp.zeros_like(distill)
    else:
        raise ValueError(f"base_loss={base_loss!r}; allowed values: {BASE_LOSSES}.")
    per_example = base + jnp.asarray(alpha, jnp.float32) * distill
    if where is not None:
        zero = jnp.zeros_like(per_example)
        per_example, base, distill = (jnp.where(where, x, zero)
                                      for x in (per_example, base, distill))
        allocation = jnp.where(where[:, None], allocation, 0.0)
    entropy = jnp.sum(jax.scipy.special.entr(allocation), axis=-1)
    return DistillationTerms(
        per_example=per_example, base=base, distill=distill, allocation=allocation,
        allocation_entropy=jnp.mean(entropy, where=where),
        finite=jnp.logical_and(jnp.all(jnp.isfinite(per_example)),
                               jnp.all(jnp.isfinite(allocation))))
