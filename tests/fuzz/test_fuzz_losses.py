"""Fuzzed per-example losses: finite extreme logits (|z| <= 1e4) give the float64 oracle's
values and finite gradients; non-finite rows stay in their own rows; bad options are refused.
"""
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from dsink_jax import losses
from tests.fuzz import fuzz_settings

# (B, C): two fixed shapes, the extremes of B 1..8 and C 2..50, so that the jitted bundle below
# compiles twice (about 3 s each on a loaded 2-core machine). bfloat16 promotion is tested in
# tests/losses.
SHAPES = ((1, 2), (8, 50))
LOGIT_BOUND = 1e4
NAMES = ("ce", "la", "balanced_softmax", "gce", "sce", "elr", "ldam", "soft_ce")


@chex.assert_max_traces(n=len(SHAPES))  # once per shape, whatever the values
def _bundle(logits, labels, prior, counts, memory, soft_targets):
    """Per-example values [B] and per-example gradients [B, C] of every loss."""

    def values(lg):
        targets = losses.elr_update_targets(memory, lg)
        return {
            "ce": losses.cross_entropy(lg, labels),
            "la": losses.logit_adjusted_loss(lg, labels, class_prior=prior),
            "balanced_softmax": losses.balanced_softmax_loss(lg, labels, class_prior=prior),
            "gce": losses.generalized_cross_entropy(lg, labels),
            "sce": losses.symmetric_cross_entropy(lg, labels),
            "elr": losses.elr_loss(lg, labels, targets=targets),
            "ldam": losses.ldam_loss(lg, labels, margins=losses.ldam_margins(counts),
                                     class_weights=losses.drw_class_weights(counts)),
            "soft_ce": losses.soft_cross_entropy(lg, soft_targets),
        }

    # One pullback per loss, batched: a row's loss depends on that row only, so the gradient
    # of each loss's sum holds the per-example gradients.
    stacked, pullback = jax.vjp(lambda lg: jnp.stack([values(lg)[n] for n in NAMES]), logits)
    (grads,) = jax.vmap(pullback)(jnp.ones((len(NAMES),) + stacked.shape[1:], stacked.dtype)
                                  * jnp.eye(len(NAMES), dtype=stacked.dtype)[:, :, None])
    return dict(zip(NAMES, stacked)), dict(zip(NAMES, grads))


bundle = jax.jit(_bundle)


def oracle(x, labels, prior, counts, memory, soft_targets):
    """The same losses in float64 numpy, from their defining formulas."""
    x = np.asarray(x, np.float64)
    rows = np.arange(x.shape[0])

    def ce_of(z):
        return scipy.special.logsumexp(z, axis=1) - z[rows, labels]

    ce = ce_of(x)
    log_p_y = -ce
    log_prior = np.log(np.asarray(prior, np.float32).astype(np.float64))
    m = counts ** -0.25
    margins = 0.5 * m / m.max()
    # The library takes beta = 0.9999 in float32 (0.99989998...): 1 - beta differs by 1.7e-4
    # relative from the float64 value, so the oracle uses the same rounded beta.
    inverse = 1.0 / -np.expm1(counts * np.log(float(np.float32(0.9999))))
    weights = inverse * len(counts) / inverse.sum()
    onehot = np.eye(x.shape[1])[labels]
    probs = np.clip(scipy.special.softmax(x, axis=1), 1e-4, 1 - 1e-4)
    targets = 0.7 * memory + 0.3 * probs / probs.sum(1, keepdims=True)
    return {
        "ce": ce,
        "la": ce_of(x + log_prior),
        "balanced_softmax": ce_of(x + log_prior),
        "gce": -np.expm1(0.7 * log_p_y) / 0.7,
        "sce": 0.1 * ce + 4.0 * -np.expm1(log_p_y),
        "elr": ce + 3.0 * np.log1p(-np.sum(targets * probs, axis=1)),
        "ldam": ce_of(30.0 * (x - onehot * margins)) * weights[labels],
        "soft_ce": -np.sum(soft_targets * (x - scipy.special.logsumexp(x, 1, keepdims=True)), 1),
    }, {"weights": weights[labels], "log_prior": log_prior}


def simplex_rows(draw, shape, *, min_weight=0.0):
    weights = draw(hnp.arrays(np.float64, shape, elements=st.floats(min_weight, 1.0)))
    weights[..., 0] += 1e-3  # never an all-zero row
    return weights / weights.sum(-1, keepdims=True)


@st.composite
def loss_problems(draw, *, logit_bound=LOGIT_BOUND):
    """Logits [B, C] with |z| <= logit_bound and the other inputs of every loss."""
    batch, classes = draw(st.sampled_from(SHAPES))
    kind = draw(st.sampled_from(["dense", "sparse", "peaked"]))
    if kind == "dense":  # every entry distinct, at a drawn magnitude up to the bound
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1), label="seed"))
        bound = draw(st.sampled_from([1.0, 30.0, logit_bound]))
        logits = rng.uniform(-bound, bound, (batch, classes)).astype(np.float32)
    elif kind == "sparse":  # hypothesis' arrays: a few drawn (often boundary) entries in a fill
        logits = draw(hnp.arrays(np.float32, (batch, classes), elements=st.floats(
            -logit_bound, logit_bound, width=32)))
    else:  # peaked rows: one logit at +-bound, the rest at the other extreme
        hot = draw(hnp.arrays(np.int64, batch, elements=st.integers(0, classes - 1)))
        sign = draw(st.sampled_from([1.0, -1.0]))
        logits = np.full((batch, classes), -sign * logit_bound, np.float32)
        logits[np.arange(batch), hot] = sign * logit_bound
    labels = draw(hnp.arrays(np.int32, batch, elements=st.integers(0, classes - 1)))
    prior = simplex_rows(draw, classes, min_weight=1e-9).astype(np.float32)
    counts = draw(hnp.arrays(np.float64, classes, elements=st.integers(1, 10**6)))
    memory = simplex_rows(draw, (batch, classes)) * draw(st.floats(0.0, 1.0))
    soft_targets = simplex_rows(draw, (batch, classes))
    return logits, labels, prior, counts, memory, soft_targets


def _call(logits, labels, prior, counts, memory, soft_targets):
    return bundle(jnp.asarray(logits), labels, prior, counts.astype(np.float32),
                  memory.astype(np.float32), soft_targets.astype(np.float32))


@fuzz_settings(30)
@given(problem=loss_problems())
def test_extreme_finite_logits_give_oracle_values_and_finite_gradients(problem):
    logits, labels, prior, counts, memory, soft_targets = problem
    values, grads = _call(*problem)
    expected, extra = oracle(logits, labels, prior, counts, memory.astype(np.float32),
                             soft_targets.astype(np.float32))
    # float32 rounds logits of size |z| to about 6e-8 |z|: the tolerance grows with the row's
    # largest magnitude (16 ulps), times LDAM's scale 30 and class weight.
    magnitude = np.max(np.abs(logits), axis=1) + np.max(np.abs(extra["log_prior"]))
    for name in NAMES:
        value, grad = np.asarray(values[name]), np.asarray(grads[name])
        assert value.shape == labels.shape and value.dtype == np.float32, name
        assert np.all(np.isfinite(value)) and np.all(np.isfinite(grad)), name
        tol = 1e-5 + 1e-6 * magnitude
        if name == "ldam":
            tol = (1e-5 + 1e-6 * 30.0 * (magnitude + 0.5)) * extra["weights"]
        np.testing.assert_array_less(np.abs(value - expected[name]),
                                     tol + 4e-6 * np.abs(expected[name]), err_msg=name)
        # Every loss is a function of softmax(logits): shifting a row changes nothing, so each
        # row of the gradient sums to zero.
        np.testing.assert_allclose(grad.sum(1), 0.0,
                                   atol=1e-5 * (1 + np.abs(grad).sum(1).max()), err_msg=name)
    # Closed form of the cross-entropy gradient: softmax - onehot.
    probs = scipy.special.softmax(logits.astype(np.float64), axis=1)
    np.testing.assert_allclose(grads["ce"], probs - np.eye(logits.shape[1])[labels], atol=1e-5)
    assert np.all(np.asarray(values["gce"]) <= 1 / 0.7 + 1e-6)


@fuzz_settings(30)
@given(problem=loss_problems(), data=st.data())
def test_non_finite_logits_stay_in_their_own_rows(problem, data):
    logits, *rest = problem
    batch, classes = logits.shape
    bad = data.draw(hnp.arrays(np.bool_, (batch, classes)), label="bad entries")
    fill = data.draw(st.sampled_from([np.inf, -np.inf, np.nan]), label="fill")
    dirty = np.where(bad, np.float32(fill), logits)
    bad_rows = bad.any(1)
    values, grads = _call(dirty, *rest)  # no exception: the values are not inspected
    clean_values, clean_grads = _call(np.where(bad_rows[:, None], 0.0, logits)
                                      .astype(np.float32), *rest)
    for name in NAMES:
        np.testing.assert_array_equal(np.asarray(values[name])[~bad_rows],
                                      np.asarray(clean_values[name])[~bad_rows], err_msg=name)
        np.testing.assert_array_equal(np.asarray(grads[name])[~bad_rows],
                                      np.asarray(clean_grads[name])[~bad_rows], err_msg=name)
        assert np.all(np.isfinite(np.asarray(values[name])[~bad_rows])), name


# ----------------------------------------------------------------------------- bad options

_LOGITS = np.zeros((4, 3), np.float32)
_LABELS = np.array([0, 1, 2, 0], np.int32)
_PRIOR = np.full(3, 1 / 3, np.float32)
_COUNTS = np.array([10.0, 5.0, 1.0])

# (name in the message, callable of the bad value, strategy of bad values)
_BAD_OPTIONS = {
    "tau": (lambda v: losses.logit_adjusted_loss(_LOGITS, _LABELS, class_prior=_PRIOR, tau=v),
            st.one_of(st.floats(max_value=0.0, exclude_max=True), st.just(math.nan),
                      st.just(math.inf))),
    "q": (lambda v: losses.generalized_cross_entropy(_LOGITS, _LABELS, q=v),
          st.one_of(st.floats(max_value=0.0), st.floats(min_value=1.0, exclude_min=True),
                    st.just(math.nan))),
    "alpha": (lambda v: losses.symmetric_cross_entropy(_LOGITS, _LABELS, alpha=v),
              st.floats(max_value=0.0, exclude_max=True)),
    "log_zero": (lambda v: losses.symmetric_cross_entropy(_LOGITS, _LABELS, log_zero=v),
                 st.one_of(st.floats(min_value=0.0), st.just(math.nan))),
    "lam": (lambda v: losses.elr_loss(_LOGITS, _LABELS, targets=np.zeros((4, 3)), lam=v),
            st.floats(max_value=0.0, exclude_max=True)),
    "eps": (lambda v: losses.elr_loss(_LOGITS, _LABELS, targets=np.zeros((4, 3)), eps=v),
            st.one_of(st.floats(max_value=0.0), st.floats(min_value=0.5), st.just(math.nan))),
    "beta": (lambda v: losses.drw_class_weights(_COUNTS, beta=v),
             st.one_of(st.floats(max_value=0.0, exclude_max=True), st.floats(min_value=1.0))),
    "max_margin": (lambda v: losses.ldam_margins(_COUNTS, max_margin=v),
                   st.floats(max_value=0.0, exclude_max=True)),
    "scale": (lambda v: losses.ldam_loss(_LOGITS, _LABELS, margins=np.zeros(3), scale=v),
              st.one_of(st.floats(max_value=0.0), st.just(math.inf))),
    "class_prior": (lambda v: losses.balanced_softmax_loss(
        _LOGITS, _LABELS, class_prior=np.array([v, 0.5, 0.5 - v], np.float32)),
        st.one_of(st.floats(min_value=-1e30, max_value=0.0), st.just(math.nan))),
    "class_counts": (lambda v: losses.ldam_margins(np.array([v, 1.0, 2.0])),
                     st.one_of(st.floats(-1e30, 0.0), st.just(math.nan), st.just(math.inf))),
    "labels": (lambda v: losses.cross_entropy(_LOGITS, np.array([0, 1, 2, v], np.int32)),
               st.one_of(st.integers(max_value=-1), st.integers(min_value=3)).filter(
                   lambda v: -2**31 <= v < 2**31)),
}


@fuzz_settings(50)
@given(name=st.sampled_from(sorted(_BAD_OPTIONS)), data=st.data())
def test_bad_option_is_refused_by_name(name, data):
    call, values = _BAD_OPTIONS[name]
    value = data.draw(values, label=name)
    with pytest.raises(ValueError, match=name):
        call(value)


@fuzz_settings(25)
@given(shape=st.sampled_from([(4,), (3,), (5,), (4, 1), (), (4, 3)]),
       dtype=st.sampled_from([np.int32, np.int64, np.uint8, np.float32, np.bool_]))
def test_label_shape_and_dtype_are_checked_before_work(shape, dtype):
    labels = np.zeros(shape, dtype)
    if not np.issubdtype(dtype, np.integer):
        with pytest.raises(TypeError, match=f"labels must be integers, got dtype {labels.dtype}"):
            losses.cross_entropy(_LOGITS, labels)
    elif shape != (4,):
        with pytest.raises(ValueError, match=r"labels must have shape logits.shape\[:-1\]"):
            losses.cross_entropy(_LOGITS, labels)
    else:
        np.testing.assert_allclose(losses.cross_entropy(_LOGITS, labels), np.log(3.0), rtol=1e-6)
    if not np.issubdtype(dtype, np.floating):
        with pytest.raises(TypeError, match="logits must be floating"):
            losses.cross_entropy(_LOGITS.astype(dtype), np.zeros(4, np.int32))
