"""Single-robustness classification losses: plain, imbalance-robust and noise-robust.

Every loss is per example and unreduced: `logits` float [..., C], integer `labels` [...] ->
float [...]; reduce at the call site. Options are keyword-only. Logits of a lower precision
(bfloat16) are promoted to float32 first.

Imbalance-robust (the `f_L` auxiliaries of D-SINK):

* `logit_adjusted_loss`: CE(logits + tau log prior) (Menon et al., ICLR 2021).
* `balanced_softmax_loss`: CE(logits + log prior) (Ren et al., NeurIPS 2020).
* `ldam_loss` with `ldam_margins` and `drw_class_weights` (Cao et al., NeurIPS 2019; class
  weights from the effective number of samples of Cui et al., CVPR 2019).

Noise-robust (the `f_N` auxiliaries):

* `generalized_cross_entropy` (Zhang & Sabuncu, NeurIPS 2018).
* `symmetric_cross_entropy` (Wang et al., ICCV 2019).
* `elr_loss` with `elr_update_targets` (early-learning regularisation, Liu et al., NeurIPS 2020).

Validation: shapes and dtypes are always checked; values (label range, priors, counts,
hyper-parameters) are checked only when concrete, i.e. skipped under `jit` / `vmap` tracing.
"""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dsink_jax._checks import concrete as _concrete

# Tolerance on sum(class_prior) == 1 (priors are often float32 frequencies).
_PRIOR_SUM_ATOL = 1e-3


def _check_range(name: str, value: Any, *, low: float, high: float = np.inf,
                 low_open: bool = False, high_open: bool = False) -> None:
    """Raises ValueError unless the (concrete) scalar `value` is finite and in the interval."""
    concrete = _concrete(value)
    if concrete is None:
        return
    if concrete.ndim != 0:
        raise ValueError(f"{name} must be a scalar, got shape {concrete.shape}.")
    v = float(concrete)
    above = v > low if low_open else v >= low
    below = v < high if high_open else v <= high
    ok = np.isfinite(v) and above and below
    if not ok:
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"{name} must be in {interval}, got {v}.")


def _float_logits(logits: Any) -> jax.Array:
    """Checks logits [..., C] and promotes them to at least float32."""
    logits = jnp.asarray(logits)
    if not jnp.issubdtype(logits.dtype, jnp.floating):
        raise TypeError(f"logits must be floating, got dtype {logits.dtype}.")
    if logits.ndim < 1 or logits.shape[-1] < 1:
        raise ValueError(f"logits must have shape [..., C] with C >= 1, got {logits.shape}.")
    return logits.astype(jnp.promote_types(logits.dtype, jnp.float32))


def _int_labels(labels: Any, logits: jax.Array) -> jax.Array:
    """Checks integer labels [...] against logits [..., C] (range only when concrete)."""
    labels = jnp.asarray(labels)
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise TypeError(f"labels must be integers, got dtype {labels.dtype}.")
    if labels.shape != logits.shape[:-1]:
        raise ValueError(
            f"labels must have shape logits.shape[:-1] = {logits.shape[:-1]}, got {labels.shape}.")
    concrete = _concrete(labels)
    num_classes = logits.shape[-1]
    if concrete is not None and concrete.size:
        low, high = concrete.min(), concrete.max()
        if low < 0 or high >= num_classes:
            raise ValueError(
                f"labels must be in [0, {num_classes - 1}], got values in [{low}, {high}].")
    return labels


def _class_vector(name: str, value: Any, num_classes: int, dtype: Any) -> jax.Array:
    """Checks a per-class vector of shape [C] and casts it to `dtype`."""
    value = jnp.asarray(value)
    if value.shape != (num_classes,):
        raise ValueError(f"{name} must have shape [C] = ({num_classes},), got {value.shape}.")
    return value.astype(dtype)


def _log_prior(class_prior: Any, num_classes: int, dtype: Any) -> jax.Array:
    """log(class_prior) after checking that a concrete prior is a positive distribution over C."""
    prior = _class_vector("class_prior", class_prior, num_classes, dtype)
    concrete = _concrete(class_prior)
    if concrete is not None:
        concrete = concrete.astype(np.float64)
        if not (np.all(np.isfinite(concrete)) and np.all(concrete > 0)
                and abs(concrete.sum() - 1.0) <= _PRIOR_SUM_ATOL):
            raise ValueError(
                "class_prior must be a distribution: entries > 0 summing to 1 "
                f"(atol {_PRIOR_SUM_ATOL}), got {concrete} (sum {concrete.sum()}).")
    return jnp.log(prior)


def _positive_counts(class_counts: Any) -> jax.Array:
    """Checks class counts [C] (> 0 when concrete) and returns them as float32."""
    counts = jnp.asarray(class_counts)
    if counts.ndim != 1 or counts.shape[0] < 1:
        raise ValueError(f"class_counts must have shape [C] with C >= 1, got {counts.shape}.")
    concrete = _concrete(class_counts)
    if concrete is not None and not (np.all(np.isfinite(concrete)) and np.all(concrete > 0)):
        raise ValueError(f"class_counts must be finite and > 0, got {concrete}.")
    return counts.astype(jnp.promote_types(counts.dtype, jnp.float32))


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Softmax cross-entropy with integer labels, -log softmax(logits)_y.

    Args:
        logits: float [..., C].
        labels: int [...], values in [0, C).

    Returns:
        float [...] per-example losses.
    """
    logits = _float_logits(logits)
    labels = _int_labels(labels, logits)
    return optax.losses.softmax_cross_entropy_with_integer_labels(logits, labels)


def soft_cross_entropy(logits: jax.Array, target_probs: jax.Array) -> jax.Array:
    """Cross-entropy against soft targets, -sum_c t_c log softmax(logits)_c.

    The targets are not normalised nor stopped here (D-SINK passes `stop_gradient(Q)`).

    Args:
        logits: float [..., C].
        target_probs: float [..., C], typically rows on the simplex.

    Returns:
        float [...] per-example losses.
    """
    logits = _float_logits(logits)
    target_probs = jnp.asarray(target_probs)
    if target_probs.shape != logits.shape:
        raise ValueError(f"target_probs must have the shape of logits {logits.shape}, "
                         f"got {target_probs.shape}.")
    return optax.losses.softmax_cross_entropy(logits, target_probs.astype(logits.dtype))


def logit_adjusted_loss(logits: jax.Array, labels: jax.Array, *, class_prior: jax.Array,
                        tau: float = 1.0) -> jax.Array:
    """Logit-adjusted cross-entropy CE(logits + tau log prior, y) (Menon et al., 2021).

    At test time the raw logits are used: the adjustment moves the decision boundary towards
    the head classes during training only, which makes argmax(logits) balanced-error consistent.

    Args:
        logits: float [..., C].
        labels: int [...].
        class_prior: float [C], the training label distribution (entries > 0, sum 1).
        tau: temperature of the adjustment, >= 0 (0 gives plain cross-entropy).

    Returns:
        float [...] per-example losses.
    """
    logits = _float_logits(logits)
    labels = _int_labels(labels, logits)
    _check_range("tau", tau, low=0.0)
    log_prior = _log_prior(class_prior, logits.shape[-1], logits.dtype)
    return optax.losses.softmax_cross_entropy_with_integer_labels(logits + tau * log_prior, labels)


def balanced_softmax_loss(logits: jax.Array, labels: jax.Array, *,
                          class_prior: jax.Array) -> jax.Array:
    """Balanced Softmax CE(logits + log prior, y) (Ren et al., 2020).

    Equals `logit_adjusted_loss` with tau = 1; kept by its own name, as both are auxiliaries.

    Args:
        logits: float [..., C].
        labels: int [...].
        class_prior: float [C], the training label distribution (entries > 0, sum 1).

    Returns:
        float [...] per-example losses.
    """
    logits = _float_logits(logits)
    labels = _int_labels(labels, logits)
    log_prior = _log_prior(class_prior, logits.shape[-1], logits.dtype)
    return optax.losses.softmax_cross_entropy_with_integer_labels(logits + log_prior, labels)


def ldam_margins(class_counts: jax.Array, *, max_margin: float = 0.5) -> jax.Array:
    """LDAM's label-distribution-aware margins m_c proportional to n_c^(-1/4).

    Args:
        class_counts: [C] training examples per class, all > 0.
        max_margin: the largest margin (that of the rarest class), >= 0.

    Returns:
        float32 [C] margins, max(m) == max_margin.
    """
    counts = _positive_counts(class_counts)
    _check_range("max_margin", max_margin, low=0.0)
    margins = counts ** -0.25
    return margins * (max_margin / jnp.max(margins))


def ldam_loss(logits: jax.Array, labels: jax.Array, *, margins: jax.Array, scale: float = 30.0,
              class_weights: jax.Array | None = None) -> jax.Array:
    """LDAM loss w_y CE(scale * (logits - m_y onehot(y)), y) (Cao et al., 2019).

    Meant for cosine logits in [-1, 1] (`head="cosine"`), as in the LDAM-DRW code, whence the
    scale. Deferred re-weighting (DRW): pass `class_weights=None` until the deferral epoch
    (160 of 200 in LDAM-DRW), then `drw_class_weights(counts)`. PyTorch's weighted mean divides
    by the sum of the w_y of the batch: `sum(loss) / sum(class_weights[labels])` reproduces it.

    Args:
        logits: float [..., C].
        labels: int [...].
        margins: float [C], e.g. `ldam_margins(class_counts)`.
        scale: s > 0, multiplies the margin-shifted logits.
        class_weights: optional float [C]; example i is weighted by class_weights[y_i].

    Returns:
        float [...] per-example (weighted) losses.
    """
    logits = _float_logits(logits)
    labels = _int_labels(labels, logits)
    num_classes = logits.shape[-1]
    margins = _class_vector("margins", margins, num_classes, logits.dtype)
    _check_range("scale", scale, low=0.0, low_open=True)
    onehot = jax.nn.one_hot(labels, num_classes, dtype=logits.dtype)
    shifted = scale * (logits - onehot * margins)
    loss = optax.losses.softmax_cross_entropy_with_integer_labels(shifted, labels)
    if class_weights is not None:
        class_weights = _class_vector("class_weights", class_weights, num_classes, logits.dtype)
        loss = loss * class_weights[labels]
    return loss


def drw_class_weights(class_counts: jax.Array, *, beta: float = 0.9999) -> jax.Array:
    """Class-balanced weights from the effective number of samples (Cui et al., 2019), as in DRW.

    w_c proportional to (1 - beta) / (1 - beta^n_c), normalised to sum to C. beta = 0 gives all
    ones; beta -> 1 gives inverse-frequency weights.

    Args:
        class_counts: [C] training examples per class, all > 0.
        beta: in [0, 1).

    Returns:
        float32 [C] weights summing to C.
    """
    counts = _positive_counts(class_counts)
    _check_range("beta", beta, low=0.0, high=1.0, high_open=True)
    # 1 - beta^n as -expm1(n log beta): accurate for beta near 1; (1 - beta) cancels in the
    # normalisation. beta = 0 gives log 0 = -inf and an effective number of exactly 1.
    effective_num = -jnp.expm1(counts * jnp.log(jnp.asarray(beta, counts.dtype)))
    inverse = 1.0 / effective_num
    return inverse * (counts.shape[0] / jnp.sum(inverse))


def generalized_cross_entropy(logits: jax.Array, labels: jax.Array, *, q: float = 0.7) -> jax.Array:
    """Generalized cross-entropy (1 - p_y^q) / q (Zhang & Sabuncu, 2018).

    q -> 0 gives cross-entropy, q = 1 the (noise-robust) mean absolute error 1 - p_y.

    Args:
        logits: float [..., C].
        labels: int [...].
        q: in (0, 1].

    Returns:
        float [...] per-example losses in [0, 1 / q].
    """
    logits = _float_logits(logits)
    labels = _int_labels(labels, logits)
    _check_range("q", q, low=0.0, high=1.0, low_open=True)
    log_p_y = -optax.losses.softmax_cross_entropy_with_integer_labels(logits, labels)
    # 1 - exp(q log p_y) via expm1: exact as q -> 0, where it tends to -q log p_y.
    return -jnp.expm1(q * log_p_y) / q


def symmetric_cross_entropy(logits: jax.Array, labels: jax.Array, *, alpha: float = 0.1,
                            beta: float = 1.0, log_zero: float = -4.0) -> jax.Array:
    """Symmetric cross-entropy alpha CE + beta RCE (Wang et al., 2019).

    The reverse cross-entropy RCE = -sum_c p_c log onehot(y)_c with log 0 := A (`log_zero`)
    is -A (1 - p_y). The paper uses A = -4; the authors' code clamps the one-hot at 1e-4
    (A = log 1e-4 = -9.21) and the probabilities at 1e-7: pass `log_zero=math.log(1e-4)` for
    the former; the latter clamp is not applied here.

    Args:
        logits: float [..., C].
        labels: int [...].
        alpha: weight of CE, >= 0 (the paper uses 0.1 on CIFAR-10, 6.0 on CIFAR-100).
        beta: weight of RCE, >= 0 (1.0 on CIFAR-10, 0.1 on CIFAR-100).
        log_zero: A < 0.

    Returns:
        float [...] per-example losses.
    """
    logits = _float_logits(logits)
    labels = _int_labels(labels, logits)
    _check_range("alpha", alpha, low=0.0)
    _check_range("beta", beta, low=0.0)
    _check_range("log_zero", log_zero, low=-np.inf, high=0.0, high_open=True)
    ce = optax.losses.softmax_cross_entropy_with_integer_labels(logits, labels)
    one_minus_p_y = -jnp.expm1(-ce)
    return alpha * ce - beta * log_zero * one_minus_p_y


def _elr_probs(logits: jax.Array, eps: float) -> jax.Array:
    """Softmax clipped to [eps, 1 - eps], as in the ELR code (keeps log(1 - <t, p>) finite)."""
    return jnp.clip(jax.nn.softmax(logits, axis=-1), eps, 1.0 - eps)


def elr_update_targets(targets: jax.Array, logits: jax.Array, *, beta: float = 0.7,
                       eps: float = 1e-4) -> jax.Array:
    """ELR's temporal ensemble t <- beta t + (1 - beta) p / sum(p), p = clip(softmax(logits)).

    The per-sample memory `t` [N, C] is training state (zeros at the start, as in the ELR code):
    gather the batch rows, update them with this function, scatter them back, and pass the
    updated rows to `elr_loss` (the code's order). No gradient flows through the update.

    Args:
        targets: float [..., C], the batch's rows of the memory.
        logits: float [..., C], the current model's logits for the batch.
        beta: momentum in [0, 1].
        eps: probability clip in (0, 0.5).

    Returns:
        float [..., C] updated targets.
    """
    logits = jax.lax.stop_gradient(_float_logits(logits))
    targets = jnp.asarray(targets)
    if targets.shape != logits.shape:
        raise ValueError(
            f"targets must have the shape of logits {logits.shape}, got {targets.shape}.")
    _check_range("beta", beta, low=0.0, high=1.0)
    _check_range("eps", eps, low=0.0, high=0.5, low_open=True, high_open=True)
    probs = _elr_probs(logits, eps)
    probs = probs / jnp.sum(probs, axis=-1, keepdims=True)
    return beta * targets.astype(logits.dtype) + (1.0 - beta) * probs


def elr_loss(logits: jax.Array, labels: jax.Array, *, targets: jax.Array, lam: float = 3.0,
             eps: float = 1e-4) -> jax.Array:
    """Early-learning regularisation CE + lam log(1 - <t, p>) (Liu et al., 2020).

    p = clip(softmax(logits), eps, 1 - eps) (the clip's gradient is zero where it binds, as in
    the code); t is stopped. Minimising log(1 - <t, p>) pulls p towards the running ensemble t,
    which resists memorising noisy labels. The paper uses lam = 3, beta = 0.7 on CIFAR-10.

    Args:
        logits: float [..., C].
        labels: int [...].
        targets: float [..., C], rows of the memory after `elr_update_targets`.
        lam: regularisation weight, >= 0.
        eps: probability clip in (0, 0.5).

    Returns:
        float [...] per-example losses (negative values are normal: log(1 - <t, p>) < 0).
    """
    logits = _float_logits(logits)
    labels = _int_labels(labels, logits)
    targets = jnp.asarray(targets)
    if targets.shape != logits.shape:
        raise ValueError(
            f"targets must have the shape of logits {logits.shape}, got {targets.shape}.")
    _check_range("lam", lam, low=0.0)
    _check_range("eps", eps, low=0.0, high=0.5, low_open=True, high_open=True)
    ce = optax.losses.softmax_cross_entropy_with_integer_labels(logits, labels)
    targets = jax.lax.stop_gradient(targets.astype(logits.dtype))
    overlap = jnp.sum(targets * _elr_probs(logits, eps), axis=-1)
    return ce + lam * jnp.log1p(-overlap)


def class_quantile_thresholds(scores: jax.Array, labels: jax.Array, *, num_classes: int,
                              keep: float) -> jax.Array:
    """Per class, the `keep`-quantile of the scores of the samples labelled with it.

    The per-class threshold of class-balanced small-loss selection (RoLT-style, Wei et al.
    2021): sample i is kept when `scores[i] <= thresholds[labels[i]]`, so every class keeps the
    `keep` fraction of its samples with the smallest scores (at least one), however small it
    is, where one global threshold would drop the tail. One sort of the N scores by (label,
    score); samples labelled outside [0, num_classes) (e.g. -1: not seen yet) are ignored.

    Args:
        scores: float [N], e.g. each training sample's running loss.
        labels: int [N], its given label.
        num_classes: C.
        keep: fraction kept per class, in (0, 1].

    Returns:
        float [C] thresholds; +inf for a class with no sample.
    """
    scores = jnp.asarray(scores, jnp.float32)
    labels = jnp.asarray(labels)
    if scores.ndim != 1 or labels.shape != scores.shape:
        raise ValueError(f"scores and labels must be [N] vectors of one length, got "
                         f"{scores.shape} and {labels.shape}.")
    _check_range("keep", keep, low=0.0, high=1.0, low_open=True)
    n = scores.shape[0]
    bins = jnp.where((labels >= 0) & (labels < num_classes), labels, num_classes).astype(jnp.int32)
    _, sorted_scores = jax.lax.sort((bins, scores), num_keys=2)
    counts = jnp.bincount(bins, length=num_classes + 1)[:num_classes]
    starts = jnp.cumsum(counts) - counts
    rank = jnp.maximum(jnp.ceil(keep * counts).astype(jnp.int32) - 1, 0)
    thresholds = sorted_scores[jnp.clip(starts + rank, 0, max(n - 1, 0))]
    return jnp.where(counts > 0, thresholds, jnp.inf)
