"""Tests of the single-robustness losses: hand-computed values, limits, jit, vmap and gradients.

The expected numbers were computed once in float64 numpy from the formulas in the docstrings
(log-softmax by hand) and are written out so the tests do not re-use the code under test.
"""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from dsink_jax import losses

LOGITS = np.array([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]], np.float32)
LABELS = np.array([1, 0], np.int32)
# softmax(LOGITS), rows: [0.2312239, 0.6285317, 0.1402444], [0.0466126, 0.0171478, 0.9362396].
P_Y = np.array([0.6285317192, 0.0466126226])
PRIOR = np.array([0.5, 0.3, 0.2], np.float32)
COUNTS = np.array([100, 10, 1], np.int32)
COSINE_LOGITS = np.array([[0.5, -0.2, 0.1], [0.3, 0.9, -0.4]], np.float32)
COSINE_LABELS = np.array([2, 0], np.int32)
SOFT_TARGETS = np.array([[0.2, 0.5, 0.3], [0.1, 0.1, 0.8]], np.float32)
ELR_MEMORY = np.array([[0.2, 0.5, 0.3], [0.0, 0.0, 0.0]], np.float32)

CE = np.array([0.4643687841, 3.0658839038])

# name -> f(logits, labels, soft_targets) for the generic jit / vmap / gradient tests; only the
# soft cross-entropy and ELR use the per-example soft targets.
LOSSES = {
    "cross_entropy": lambda z, y, t: losses.cross_entropy(z, y),
    "soft_cross_entropy": lambda z, y, t: losses.soft_cross_entropy(z, t),
    "logit_adjusted": lambda z, y, t: losses.logit_adjusted_loss(z, y, class_prior=PRIOR, tau=0.5),
    "balanced_softmax": lambda z, y, t: losses.balanced_softmax_loss(z, y, class_prior=PRIOR),
    "ldam": lambda z, y, t: losses.ldam_loss(z, y, margins=losses.ldam_margins(COUNTS), scale=2.0,
                                             class_weights=np.array([0.5, 1.0, 2.0])),
    "gce": lambda z, y, t: losses.generalized_cross_entropy(z, y, q=0.7),
    "sce": lambda z, y, t: losses.symmetric_cross_entropy(z, y, alpha=0.1, beta=1.0),
    "elr": lambda z, y, t: losses.elr_loss(z, y, targets=t, lam=3.0),
}


def test_cross_entropy_hand_value():
    np.testing.assert_allclose(losses.cross_entropy(LOGITS, LABELS), CE, rtol=1e-6)


def test_soft_cross_entropy_hand_value_and_one_hot_limit():
    np.testing.assert_allclose(
        losses.soft_cross_entropy(LOGITS, SOFT_TARGETS), [1.1143687841, 0.7658839038], rtol=1e-6)
    one_hot = jax.nn.one_hot(LABELS, 3)
    np.testing.assert_allclose(losses.soft_cross_entropy(LOGITS, one_hot), CE, rtol=1e-6)


@pytest.mark.parametrize("tau,expected", [(1.0, [0.5663847366, 2.225157726]),
                                          (0.5, [0.5050783372, 2.6382117673])])
def test_logit_adjusted_hand_value(tau, expected):
    loss = losses.logit_adjusted_loss(LOGITS, LABELS, class_prior=PRIOR, tau=tau)
    np.testing.assert_allclose(loss, expected, rtol=1e-6)


def test_balanced_softmax_hand_value():
    loss = losses.balanced_softmax_loss(LOGITS, LABELS, class_prior=PRIOR)
    np.testing.assert_allclose(loss, [0.5663847366, 2.225157726], rtol=1e-6)


@pytest.mark.parametrize("tau", [0.0, 1.0, 2.5])
def test_uniform_prior_gives_cross_entropy(tau):
    # A uniform prior shifts every logit by the same constant, which softmax ignores.
    uniform = np.full(3, 1.0 / 3.0, np.float32)
    np.testing.assert_allclose(
        losses.logit_adjusted_loss(LOGITS, LABELS, class_prior=uniform, tau=tau), CE, rtol=1e-6)
    np.testing.assert_allclose(
        losses.balanced_softmax_loss(LOGITS, LABELS, class_prior=uniform), CE, rtol=1e-6)


def test_logit_adjustment_with_tau_zero_is_cross_entropy():
    loss = losses.logit_adjusted_loss(LOGITS, LABELS, class_prior=PRIOR, tau=0.0)
    np.testing.assert_allclose(loss, CE, rtol=1e-6)


def test_ldam_margins_hand_value():
    # n^(-1/4) = [100^-0.25, 10^-0.25, 1] scaled so the largest is 0.5.
    margins = losses.ldam_margins(COUNTS, max_margin=0.5)
    np.testing.assert_allclose(margins, [0.158113883, 0.2811706626, 0.5], rtol=1e-6)
    assert margins.dtype == jnp.float32


def test_ldam_loss_hand_value():
    margins = losses.ldam_margins(COUNTS)
    plain = losses.ldam_loss(COSINE_LOGITS, COSINE_LABELS, margins=margins, scale=2.0)
    np.testing.assert_allclose(plain, [2.1449333773, 1.7738207086], rtol=1e-6)
    weighted = losses.ldam_loss(COSINE_LOGITS, COSINE_LABELS, margins=margins, scale=2.0,
                                class_weights=np.array([0.5, 1.0, 2.0], np.float32))
    np.testing.assert_allclose(weighted, [4.2898667545, 0.8869103543], rtol=1e-6)


def test_ldam_without_margins_is_scaled_cross_entropy():
    zero = np.zeros(3, np.float32)
    np.testing.assert_allclose(
        losses.ldam_loss(LOGITS, LABELS, margins=zero, scale=1.0), CE, rtol=1e-6)


def test_drw_class_weights_hand_value():
    # (1 - 0.9^n)^-1 for n = 100, 10, 1, normalised to sum to 3.
    weights = losses.drw_class_weights(COUNTS, beta=0.9)
    np.testing.assert_allclose(weights, [0.239329236, 0.3674419731, 2.3932287909], rtol=1e-5)
    np.testing.assert_allclose(jnp.sum(weights), 3.0, rtol=1e-6)


def test_drw_class_weights_limits():
    np.testing.assert_array_equal(losses.drw_class_weights(COUNTS, beta=0.0), np.ones(3))
    # beta -> 1: inverse-frequency weights 1/n normalised to sum C.
    inverse = 3.0 * (1.0 / COUNTS) / np.sum(1.0 / COUNTS)
    np.testing.assert_allclose(losses.drw_class_weights(COUNTS, beta=0.99999), inverse, rtol=2e-3)


def test_gce_hand_value_and_limits():
    gce = lambda q: losses.generalized_cross_entropy(LOGITS, LABELS, q=q)
    np.testing.assert_allclose(gce(0.7), [0.3964495133, 1.2615183679], rtol=1e-6)
    # q = 1 is the mean absolute error 1 - p_y; q -> 0 approaches cross-entropy.
    np.testing.assert_allclose(gce(1.0), 1.0 - P_Y, rtol=1e-6)
    np.testing.assert_allclose(gce(1e-4), CE, rtol=1e-3)
    assert not np.allclose(gce(0.1), CE, rtol=1e-3)


def test_sce_hand_value_and_ce_limit():
    # 0.1 * CE + 1.0 * 4 * (1 - p_y).
    np.testing.assert_allclose(
        losses.symmetric_cross_entropy(LOGITS, LABELS), [1.5323100016, 4.1201379001], rtol=1e-6)
    np.testing.assert_allclose(
        losses.symmetric_cross_entropy(LOGITS, LABELS, alpha=1.0, beta=0.0), CE, rtol=1e-6)
    code_value = losses.symmetric_cross_entropy(LOGITS, LABELS, alpha=0.0, beta=1.0,
                                                log_zero=math.log(1e-4))
    np.testing.assert_allclose(code_value, -math.log(1e-4) * (1.0 - P_Y), rtol=1e-5)


def test_elr_update_targets_hand_value():
    updated = losses.elr_update_targets(ELR_MEMORY, LOGITS, beta=0.7)
    expected = [[0.2093671693, 0.5385595158, 0.2520733149],
                [0.0139837868, 0.0051443477, 0.2808718656]]
    np.testing.assert_allclose(updated, expected, rtol=1e-5)
    # The update is a target: no gradient reaches the logits.
    grad = jax.jit(jax.grad(lambda z: jnp.sum(losses.elr_update_targets(ELR_MEMORY, z))))(LOGITS)
    np.testing.assert_array_equal(grad, np.zeros_like(LOGITS))


def test_elr_loss_hand_value_and_limits():
    targets = losses.elr_update_targets(ELR_MEMORY, LOGITS, beta=0.7)
    elr = lambda lam: losses.elr_loss(LOGITS, LABELS, targets=targets, lam=lam)
    np.testing.assert_allclose(elr(3.0), [-1.1815475486, 2.1475172084], rtol=1e-5)
    np.testing.assert_allclose(elr(0.0), CE, rtol=1e-6)
    # The memory is stopped: it gets no gradient.
    grad = jax.jit(jax.grad(lambda t: jnp.sum(losses.elr_loss(LOGITS, LABELS, targets=t))))(targets)
    np.testing.assert_array_equal(grad, np.zeros_like(targets))


def test_elr_regulariser_gradient_pulls_towards_targets():
    # d/dz log(1 - <t, p>) descends towards t: one small step raises <t, p>.
    t = np.array([[0.1, 0.1, 0.8]], np.float32)
    z = np.zeros((1, 3), np.float32)
    reg = lambda z: jnp.sum(losses.elr_loss(z, np.zeros(1, np.int32), targets=t, lam=1.0)
                            - losses.cross_entropy(z, np.zeros(1, np.int32)))
    z_new = z - 0.1 * jax.jit(jax.grad(reg))(z)
    assert float(jnp.sum(t * jax.nn.softmax(z_new))) > float(jnp.sum(t * jax.nn.softmax(z)))


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_jit_and_vmap_equal_eager(name):
    fn = LOSSES[name]
    eager = fn(LOGITS, LABELS, SOFT_TARGETS)
    assert eager.shape == (2,)
    np.testing.assert_allclose(jax.jit(fn)(LOGITS, LABELS, SOFT_TARGETS), eager, rtol=1e-6)
    # Per-example: mapping over single rows gives the batched values.
    one_row = lambda z, y, t: fn(z[None], y[None], t[None])[0]
    np.testing.assert_allclose(jax.vmap(one_row)(LOGITS, LABELS, SOFT_TARGETS), eager, rtol=1e-6)


def test_leading_dimensions_are_kept():
    logits = jnp.tile(LOGITS[None], (4, 1, 1))
    labels = jnp.tile(LABELS[None], (4, 1))
    out = losses.generalized_cross_entropy(logits, labels)
    assert out.shape == (4, 2)
    np.testing.assert_allclose(out[3], losses.generalized_cross_entropy(LOGITS, LABELS), rtol=1e-6)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_gradients_match_finite_differences(name):
    fn = LOSSES[name]
    with jax.enable_x64(True):
        logits = jnp.asarray(LOGITS, jnp.float64)
        # Jitted so the finite differences reuse one compiled function.
        total = jax.jit(lambda z: jnp.sum(fn(z, LABELS, SOFT_TARGETS)))
        check_grads(total, (logits,), order=1, modes=["rev"], eps=1e-4)


def test_cross_entropy_gradient_closed_form():
    # d CE / d z = softmax(z) - onehot(y).
    grad = jax.jit(jax.grad(lambda z: jnp.sum(losses.cross_entropy(z, LABELS))))(LOGITS)
    np.testing.assert_allclose(grad, jax.nn.softmax(LOGITS) - jax.nn.one_hot(LABELS, 3), atol=1e-6)


def test_bfloat16_logits_are_promoted():
    out = losses.cross_entropy(jnp.asarray(LOGITS, jnp.bfloat16), LABELS)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, CE, rtol=2e-2)


def test_no_retrace_for_new_values():
    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(z, y, prior):
        return losses.logit_adjusted_loss(z, y, class_prior=prior)

    step(LOGITS, LABELS, PRIOR)
    step(LOGITS + 1.0, LABELS[::-1].copy(), PRIOR[::-1].copy())  # Same shapes: no second trace.


def test_traced_prior_is_not_validated():
    # Under jit the prior is abstract; a non-normalised prior then passes unchecked.
    bad = np.array([1.0, 1.0, 1.0], np.float32)
    out = jax.jit(lambda p: losses.balanced_softmax_loss(LOGITS, LABELS, class_prior=p))(bad)
    np.testing.assert_allclose(out, CE, rtol=1e-6)


@pytest.mark.parametrize("call,match", [
    (lambda: losses.logit_adjusted_loss(LOGITS, LABELS, class_prior=[0.5, 0.5, 0.5]),
     "class_prior must be a distribution"),
    (lambda: losses.balanced_softmax_loss(LOGITS, LABELS, class_prior=[1.0, 0.0, 0.0]),
     "class_prior must be a distribution"),
    (lambda: losses.balanced_softmax_loss(LOGITS, LABELS, class_prior=[0.5, 0.5]), r"shape \[C\]"),
    (lambda: losses.logit_adjusted_loss(LOGITS, LABELS, class_prior=PRIOR, tau=-1.0), "tau"),
    (lambda: losses.cross_entropy(LOGITS, np.array([1, 3])), r"labels must be in \[0, 2\]"),
    (lambda: losses.cross_entropy(LOGITS, np.array([1, 0, 2])), "labels must have shape"),
    (lambda: losses.soft_cross_entropy(LOGITS, SOFT_TARGETS[:1]), "target_probs"),
    (lambda: losses.ldam_margins(np.array([10, 0, 1])), "class_counts"),
    (lambda: losses.ldam_margins(COUNTS, max_margin=-0.1), "max_margin"),
    (lambda: losses.ldam_loss(LOGITS, LABELS, margins=np.zeros(3), scale=0.0), "scale"),
    (lambda: losses.ldam_loss(LOGITS, LABELS, margins=np.zeros(2)), "margins"),
    (lambda: losses.drw_class_weights(COUNTS, beta=1.0), r"beta must be in \[0.0, 1.0\)"),
    (lambda: losses.generalized_cross_entropy(LOGITS, LABELS, q=0.0), r"q must be in \(0.0, 1.0\]"),
    (lambda: losses.generalized_cross_entropy(LOGITS, LABELS, q=1.5), "q must be in"),
    (lambda: losses.symmetric_cross_entropy(LOGITS, LABELS, log_zero=0.0), "log_zero"),
    (lambda: losses.symmetric_cross_entropy(LOGITS, LABELS, alpha=float("nan")), "alpha"),
    (lambda: losses.elr_update_targets(ELR_MEMORY, LOGITS, beta=1.5), "beta"),
    (lambda: losses.elr_loss(LOGITS, LABELS, targets=ELR_MEMORY[:1]), "targets"),
    (lambda: losses.elr_loss(LOGITS, LABELS, targets=ELR_MEMORY, lam=-1.0), "lam"),
])
def test_bad_input_raises_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_bad_dtypes_raise_type_error():
    with pytest.raises(TypeError, match="labels must be integers"):
        losses.cross_entropy(LOGITS, LABELS.astype(np.float32))
    with pytest.raises(TypeError, match="logits must be floating"):
        losses.cross_entropy(LABELS[:, None], LABELS)


def _quantile_oracle(scores, labels, num_classes, keep):
    """Per class: the ceil(keep * n_c)-th smallest score (1-based), +inf for an empty class."""
    out = np.full(num_classes, np.inf, np.float32)
    for c in range(num_classes):
        s = np.sort(scores[labels == c])
        if s.size:
            out[c] = s[max(int(np.ceil(keep * s.size)) - 1, 0)]
    return out


@pytest.mark.parametrize("keep", [0.1, 0.5, 0.7, 1.0])
def test_class_quantile_thresholds_match_a_per_class_sort(keep):
    rng = np.random.default_rng(0)
    labels = rng.choice(5, size=200, p=[0.6, 0.25, 0.1, 0.05, 0.0])  # class 4 empty
    labels[:7] = -1  # not seen yet: ignored
    scores = rng.exponential(size=200).astype(np.float32)
    got = jax.jit(lambda s, y: losses.class_quantile_thresholds(s, y, num_classes=5, keep=keep))(
        scores, labels)
    seen = labels >= 0
    np.testing.assert_array_equal(got, _quantile_oracle(scores[seen], labels[seen], 5, keep))
    kept = scores <= np.asarray(got)[np.clip(labels, 0, 4)]
    for c in range(4):  # every class keeps its share, the rarest too
        n_c = np.sum(labels == c)
        assert np.sum(kept[labels == c]) == max(int(np.ceil(keep * n_c)), 1)


def test_class_quantile_thresholds_reject_bad_input():
    with pytest.raises(ValueError, match="keep must be in"):
        losses.class_quantile_thresholds(np.zeros(3), np.zeros(3, int), num_classes=2, keep=0.0)
    with pytest.raises(ValueError, match="one length"):
        losses.class_quantile_thresholds(np.zeros(3), np.zeros(2, int), num_classes=2, keep=0.5)
