"""Fuzzed OT interfaces: the Sinkhorn allocation, the D-SINK loss, OT-dynamic softmax, SupCon.

Honest tolerances (measured, see the report in the docstrings): with |logits| <= 10 and 300
iterations the class marginal is met to 1e-3 (typically 1e-6); with logits of +-1e4 plain
Sinkhorn at the paper's epsilon = 2 does not converge in any practical number of iterations (the
kernel is near-degenerate: column errors of 0.1 to 0.7 after 500 iterations), so there only
finiteness, the row marginal and the reported diagnostic are checked.
"""
import math
from unittest import mock

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from dsink_jax.losses import dsink as dsink_lib
from dsink_jax.losses.dsink import dsink_loss
from dsink_jax.ot import sinkhorn as sinkhorn_lib
from dsink_jax.ot.semidiscrete import cell_masses
from dsink_jax.ot.sinkhorn import sinkhorn_allocation
from dsink_jax.losses.ot_softmax import ot_dynamic_softmax_logits
from dsink_jax.losses.ot_softmax import ot_dynamic_softmax_loss
from dsink_jax.losses.supcon import supcon_loss
from tests.fuzz import fuzz_settings

SINKHORN_SHAPES = ((1, 2), (7, 5), (64, 50))  # (B, C)
DSINK_SHAPES = ((1, 2), (64, 50))
ITERS = 300  # one static count: each shape compiles once
AMPLITUDES = (1.0, 10.0, 1e4)
_F32_EPS = 2.0**-23


@st.composite
def logit_matrix(draw, shape, amplitude):
    """float32 [B, C] in [-amplitude, amplitude]: dense uniform, sparse, or peaked rows."""
    kind = draw(st.sampled_from(["dense", "dense", "sparse", "peaked"]))
    if kind == "dense":  # every entry distinct: rows that Sinkhorn must actually balance
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1), label="seed"))
        return rng.uniform(-amplitude, amplitude, shape).astype(np.float32)
    if kind == "sparse":  # hypothesis' arrays: a few drawn entries (boundaries) in a fill
        return draw(hnp.arrays(np.float32, shape, elements=st.floats(
            -amplitude, amplitude, width=32)))
    hot = draw(hnp.arrays(np.int64, shape[0], elements=st.integers(0, shape[1] - 1)))
    sign = draw(st.sampled_from([1.0, -1.0]))
    logits = np.full(shape, -sign * amplitude, np.float32)
    logits[np.arange(shape[0]), hot] = sign * amplitude
    return logits


@st.composite
def class_masses(draw, num_classes, *, allow_zero=True):
    """A distribution over C classes with near-zero (1e-12..1e-6) and maybe exactly zero entries."""
    kinds = draw(hnp.arrays(np.int64, num_classes, elements=st.integers(0, 3)))
    weights = draw(hnp.arrays(np.float64, num_classes, elements=st.floats(0.01, 1.0)))
    tiny = draw(hnp.arrays(np.float64, num_classes, elements=st.floats(1e-12, 1e-6)))
    weights = np.where(kinds == 1, tiny, weights)
    if allow_zero:
        weights = np.where(kinds == 2, 0.0, weights)
    weights[draw(st.integers(0, num_classes - 1))] = 1.0  # at least one real class
    return (weights / weights.sum()).astype(np.float32)


def _log_softmax(x):
    return np.asarray(jax.nn.log_softmax(jnp.asarray(x, jnp.float32)))


# ----------------------------------------------------------------------------- Sinkhorn


@fuzz_settings(30)
@given(shape=st.sampled_from(SINKHORN_SHAPES), amplitude=st.sampled_from(AMPLITUDES),
       data=st.data())
def test_sinkhorn_marginals_and_finiteness(shape, amplitude, data):
    noise = _log_softmax(data.draw(logit_matrix(shape, amplitude), label="noise logits"))
    student = _log_softmax(data.draw(logit_matrix(shape, amplitude), label="student logits"))
    mass = data.draw(class_masses(shape[1]), label="class mass")
    info = sinkhorn_allocation(noise, student, mass, num_iters=ITERS)
    q = info.allocation
    q = np.asarray(q, np.float64)
    assert q.shape == shape and np.all(np.isfinite(q)) and np.all(q >= 0)
    batch = shape[0]
    scores = (noise.astype(np.float64) + student) / 2.0
    # The last update normalises the rows; float32 log-potentials of size |score| round to
    # ~|score| * 2^-23, so that is the honest row tolerance (measured: 5e-4 at |score| ~ 1e4).
    row_tol = 1e-5 + 4 * _F32_EPS * np.abs(scores).max()
    np.testing.assert_allclose(q.sum(1), 1.0, atol=row_tol)
    np.testing.assert_allclose(info.row_error, np.abs(q.sum(1) - 1).max(), atol=1e-6)
    column_error = np.abs(q.sum(0) - batch * mass).max() / batch
    np.testing.assert_allclose(info.column_error, column_error, atol=1e-6)
    assert info.column_error <= 1.0 + row_tol  # rows on the simplex bound it by 1
    np.testing.assert_array_equal(q[:, mass == 0], 0.0)  # a zero-mass class gets nothing
    assert np.all(np.isneginf(np.asarray(info.potential)[mass == 0]))
    if amplitude <= 10.0:
        assert info.column_error < 1e-3
        # Closed form (docs/method.md): q_i = softmax(scores_i + g) with the reported potential g.
        closed = scipy.special.softmax(scores + np.asarray(info.potential, np.float64), axis=1)
        np.testing.assert_allclose(q, closed, atol=1e-4)


_GOOD = dict(epsilon=2.0, num_iters=5, backend="native")


def _bad_sinkhorn_cases(batch, classes):
    lp = np.full((batch, classes), -np.log(classes), np.float32)
    mass = np.full(classes, 1.0 / classes, np.float32)
    return {
        "epsilon <= 0": (ValueError, "epsilon", (lp, lp, mass), dict(epsilon=0.0)),
        "epsilon < 0": (ValueError, "epsilon", (lp, lp, mass), dict(epsilon=-1.0)),
        "epsilon nan": (ValueError, "epsilon", (lp, lp, mass), dict(epsilon=math.nan)),
        "epsilon inf": (ValueError, "epsilon", (lp, lp, mass), dict(epsilon=math.inf)),
        "epsilon vector": (ValueError, "epsilon", (lp, lp, mass), dict(epsilon=np.ones(2))),
        "num_iters 0": (ValueError, "num_iters", (lp, lp, mass), dict(num_iters=0)),
        "num_iters < 0": (ValueError, "num_iters", (lp, lp, mass), dict(num_iters=-3)),
        "num_iters float": (TypeError, "num_iters", (lp, lp, mass), dict(num_iters=2.5)),
        "num_iters bool": (TypeError, "num_iters", (lp, lp, mass), dict(num_iters=True)),
        "backend": (ValueError, "backend", (lp, lp, mass), dict(backend="pot")),
        "1-D log-probs": (ValueError, "noise_log_probs", (lp[0], lp[0], mass), {}),
        "shape mismatch": (ValueError, "student_log_probs",
                           (lp, np.zeros((batch, classes + 1), np.float32), mass), {}),
        "mass shape": (ValueError, "class_mass", (lp, lp, np.append(mass, 0.0)), {}),
        "mass negative": (ValueError, "class_mass",
                          (lp, lp, mass + np.where(np.arange(classes) == 0, -0.6, 0.6)
                           * (np.arange(classes) < 2)), {}),
        "mass sum": (ValueError, "class_mass", (lp, lp, 0.5 * mass), {}),
        "mass nan": (ValueError, "class_mass", (lp, lp, np.where(
            np.arange(classes) == 0, np.nan, mass)), {}),
        "non-finite log-probs": (ValueError, "non-finite", (np.where(
            np.arange(classes) == 0, -np.inf, lp).astype(np.float32), lp, mass), {}),
    }


@fuzz_settings(40)
@given(shape=st.sampled_from(SINKHORN_SHAPES), data=st.data())
def test_sinkhorn_bad_input_raises_before_any_work(shape, data):
    cases = _bad_sinkhorn_cases(*shape)
    name = data.draw(st.sampled_from(sorted(cases)), label="defect")
    error, match, args, options = cases[name]
    with mock.patch.object(sinkhorn_lib, "_solve", side_effect=AssertionError("work started")):
        with pytest.raises(error, match=match):
            sinkhorn_allocation(*args, **{**_GOOD, **options}).allocation


@pytest.mark.parametrize("epsilon", [1e-3, 1e-4, 1e-6, 1e-30, 1e-40])
def test_sinkhorn_small_epsilon_keeps_rows_on_the_simplex_or_is_refused(epsilon):
    rng = np.random.default_rng(0)
    noise, student = (_log_softmax(3.0 * rng.normal(size=(8, 5))) for _ in range(2))
    try:
        q = sinkhorn_allocation(noise, student, np.full(5, 0.2, np.float32), epsilon=epsilon,
                                num_iters=ITERS).allocation
    except ValueError:
        return
    assert np.all(np.isfinite(q)), "non-finite Q"
    np.testing.assert_allclose(np.sum(q, axis=1), 1.0, atol=1e-3)


# ----------------------------------------------------------------------------- D-SINK loss


@fuzz_settings(25)
@given(shape=st.sampled_from(DSINK_SHAPES), amplitude=st.sampled_from(AMPLITUDES),
       # Each (mode, base_loss) pair compiles per shape: two pairs cover both options of each.
       mode_and_base=st.sampled_from([("batch", "ce"), ("global", "none")]),
       alpha=st.one_of(st.just(0.0), st.floats(0.0, 100.0)), data=st.data())
def test_dsink_loss_is_finite_with_closed_form_gradient(shape, amplitude, mode_and_base, alpha,
                                                        data):
    mode, base_loss = mode_and_base
    student = data.draw(logit_matrix(shape, amplitude), label="student")
    noise = data.draw(logit_matrix(shape, amplitude), label="noise teacher")
    imbalance = data.draw(logit_matrix(shape, amplitude), label="imbalance teacher")
    labels = data.draw(hnp.arrays(np.int32, shape[0], elements=st.integers(0, shape[1] - 1)))
    mass = data.draw(class_masses(shape[1]), label="class mass") if mode == "global" else None

    def loss_fn(s):
        return dsink_loss(s, noise, imbalance if mode == "batch" else None, labels, alpha=alpha,
                          class_mass=mass, num_iters=ITERS, base_loss=base_loss)

    (loss, aux), grad = jax.value_and_grad(loss_fn, has_aux=True)(student)
    aux = jax.tree.map(np.asarray, aux)
    grad = np.asarray(grad, np.float64)
    assert np.isfinite(loss) and aux.finite and np.all(np.isfinite(grad))
    q = aux.allocation.astype(np.float64)
    scores = (_log_softmax(noise).astype(np.float64) + _log_softmax(student)) / 2.0
    np.testing.assert_allclose(q.sum(1), 1.0, atol=1e-5 + 4 * _F32_EPS * np.abs(scores).max())
    assert np.all(aux.distill >= -1e-4 * (1 + np.abs(aux.base)))  # CE of distributions
    np.testing.assert_allclose(aux.per_example, aux.base + alpha * aux.distill,
                               rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(loss, aux.per_example.mean(), rtol=1e-5)
    if base_loss == "none":
        np.testing.assert_array_equal(aux.base, 0.0)
    if alpha == 0.0:
        np.testing.assert_array_equal(aux.per_example, aux.base)
    expected_mass = (mass if mode == "global" else scipy.special.softmax(
        imbalance.astype(np.float64), axis=1).mean(0))
    np.testing.assert_allclose(aux.class_mass, expected_mass, atol=1e-6)
    # Q is a stopped target: d/ds of mean_i [CE(y_i) + alpha CE(q_i)] = (p - e_y + alpha
    # (sum(q_i) p - q_i)) / B.
    p = scipy.special.softmax(student.astype(np.float64), axis=1)
    onehot = np.eye(shape[1])[labels] if base_loss == "ce" else 0.0
    base_grad = p - onehot if base_loss == "ce" else 0.0
    expected = (base_grad + alpha * (q.sum(1, keepdims=True) * p - q)) / shape[0]
    np.testing.assert_allclose(grad, expected, atol=1e-5 * (1 + alpha) / shape[0] + 1e-7)


def _bad_dsink_cases(batch, classes):
    z = np.zeros((batch, classes), np.float32)
    y = np.zeros(batch, np.int32)
    inf_row = np.where(np.arange(classes) == 0, np.inf, z).astype(np.float32)
    return {
        "alpha < 0": (ValueError, "alpha", (z, z, z, y), dict(alpha=-0.5)),
        "alpha nan": (ValueError, "alpha", (z, z, z, y), dict(alpha=math.nan)),
        "alpha inf": (ValueError, "alpha", (z, z, z, y), dict(alpha=math.inf)),
        "alpha vector": (ValueError, "alpha", (z, z, z, y), dict(alpha=np.ones(2))),
        "epsilon 0": (ValueError, "epsilon", (z, z, z, y), dict(epsilon=0.0)),
        "epsilon < 0": (ValueError, "epsilon", (z, z, z, y), dict(epsilon=-2.0)),
        "num_iters 0": (ValueError, "num_iters", (z, z, z, y), dict(num_iters=0)),
        "num_iters float": (TypeError, "num_iters", (z, z, z, y), dict(num_iters=3.0)),
        "student 1-D": (ValueError, "student_logits", (z[0], z, z, y), {}),
        "noise shape": (ValueError, "noise_teacher_logits",
                        (z, np.zeros((batch, classes + 1), np.float32), z, y), {}),
        "imbalance shape": (ValueError, "imbalance_teacher_logits",
                            (z, z, np.zeros((batch + 1, classes), np.float32), y), {}),
        "no mass": (ValueError, "class_mass", (z, z, None, y), {}),
        "labels shape": (ValueError, "labels", (z, z, z, np.zeros(batch + 1, np.int32)), {}),
        "labels float": (TypeError, "labels", (z, z, z, y.astype(np.float32)), {}),
        "labels range": (ValueError, "labels", (z, z, z, y + classes), {}),
        "labels none": (ValueError, "labels", (z, z, z, None), {}),
        "non-finite student": (ValueError, "non-finite", (inf_row, z, z, y), {}),
        "non-finite teacher": (ValueError, "non-finite", (z, inf_row, z, y), {}),
        "base_loss": (ValueError, "base_loss", (z, z, z, y), dict(base_loss="gce")),
        "backend": (ValueError, "backend", (z, z, z, y), dict(backend="pot")),
        "mass sum": (ValueError, "class_mass", (z, z, None, y),
                     dict(class_mass=np.full(classes, 1.0, np.float32))),
    }


@fuzz_settings(40)
@given(shape=st.sampled_from(DSINK_SHAPES), data=st.data())
def test_dsink_bad_input_raises_before_any_work(shape, data):
    cases = _bad_dsink_cases(*shape)
    name = data.draw(st.sampled_from(sorted(cases)), label="defect")
    error, match, args, options = cases[name]
    options = {"alpha": 1.0, "num_iters": 5, **options}
    with mock.patch.object(dsink_lib, "_dsink_loss",
                           side_effect=AssertionError("work started")):
        with pytest.raises(error, match=match):
            dsink_loss(*args, **options)


# ----------------------------------------------------------------------------- OT softmax

SOFTMAX_SHAPES = ((4, 3, 5), (16, 10, 8))  # (B, C, d)
# Row norms from zero through tiny (below the 1e-12 clamp) to large; |x| < 1e19 / sqrt(d)
# keeps the float32 squared norm finite (see the xfail below).
ROW_SCALES = (0.0, 1e-30, 1e-3, 1.0, 1e3, 1e6)


@st.composite
def rows_with_scales(draw, shape):
    """float32 rows, each a random direction times a drawn norm scale (zero included)."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1), label="seed"))
    directions = rng.uniform(-1.0, 1.0, shape)
    scales = draw(hnp.arrays(np.float64, shape[:-1] + (1,), elements=st.sampled_from(
        ROW_SCALES)))
    return (directions * scales).astype(np.float32)


def _unit(x):
    """The library's normalisation in float64: x / ||x|| for any nonzero row, 0 for a zero row."""
    x = np.asarray(x, np.float64)
    peak = np.max(np.abs(x), axis=-1, keepdims=True)
    x = x / np.where(peak > 0, peak, 1.0)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _per_example_and_grads(loss_fn, *args):
    """Per-example losses [N] and the gradients of their sum with respect to every argument."""
    values, pullback = jax.vjp(loss_fn, *args)
    return values, pullback(jnp.ones_like(values))


@chex.assert_max_traces(n=len(SOFTMAX_SHAPES))
def _ot_softmax_and_grads(features, weights, labels, potential, scale):
    return _per_example_and_grads(
        lambda f, w, h: ot_dynamic_softmax_loss(f, w, labels, h, scale=scale),
        features, weights, potential)


ot_softmax_and_grads = jax.jit(_ot_softmax_and_grads)


@fuzz_settings(40)
@given(shape=st.sampled_from(SOFTMAX_SHAPES), scale=st.floats(1.0, 64.0), data=st.data())
def test_ot_softmax_loss_with_zero_and_extreme_features(shape, scale, data):
    batch, classes, dim = shape
    features = data.draw(rows_with_scales((batch, dim)), label="features")
    weights = data.draw(rows_with_scales((classes, dim)), label="class weights")
    potential = data.draw(hnp.arrays(np.float32, classes, elements=st.floats(
        -1e4, 1e4, width=32)), label="potential")
    labels = data.draw(hnp.arrays(np.int32, batch, elements=st.integers(0, classes - 1)))
    per_example, (g_features, g_weights, g_potential) = ot_softmax_and_grads(
        features, weights, labels, potential, scale)
    per_example = np.asarray(per_example, np.float64)
    logits = scale * _unit(features) @ _unit(weights).T + potential
    expected = scipy.special.logsumexp(logits, axis=1) - logits[np.arange(batch), labels]
    assert np.all(np.isfinite(per_example)) and np.all(per_example >= 0)
    tol = 1e-5 + 4e-6 * (scale + np.abs(potential).max())
    np.testing.assert_allclose(per_example, expected, atol=tol, rtol=1e-5)
    # Zero rows included: the clamped normalisation keeps the gradients finite.
    assert np.all(np.isfinite(g_features)) and np.all(np.isfinite(g_weights))
    np.testing.assert_array_equal(g_potential, 0.0)  # the heights are solved, not learned


SUPCON_SHAPES = ((4, 2, 5), (6, 3, 16))  # (B, V, p)


@chex.assert_max_traces(n=len(SUPCON_SHAPES))
def _supcon_and_grad(projections, labels, temperature):
    return _per_example_and_grads(
        lambda p: supcon_loss(p, labels, temperature=temperature), projections)


supcon_and_grad = jax.jit(_supcon_and_grad)


@fuzz_settings(40)
@given(shape=st.sampled_from(SUPCON_SHAPES), temperature=st.floats(0.05, 1.0), data=st.data())
def test_supcon_with_zero_and_extreme_projections(shape, temperature, data):
    batch, views, dim = shape
    projections = data.draw(rows_with_scales(shape), label="projections")
    labels = data.draw(hnp.arrays(np.int32, batch, elements=st.integers(0, 2)), label="labels")
    loss, (grad,) = supcon_and_grad(projections, labels, temperature)
    loss = np.asarray(loss, np.float64)
    assert loss.shape == (batch * views,)
    assert np.all(np.isfinite(loss)) and np.all(np.isfinite(grad))
    # Oracle in float64 (Khosla et al., "all" mode).
    z = _unit(projections.reshape(batch * views, dim))
    anchor = np.repeat(labels, views)
    logits = z @ z.T / temperature
    not_self = ~np.eye(batch * views, dtype=bool)
    positive = (anchor[:, None] == anchor[None, :]) & not_self
    log_prob = logits - scipy.special.logsumexp(np.where(not_self, logits, -np.inf), axis=1,
                                                keepdims=True)
    expected = -np.sum(np.where(positive, log_prob, 0.0), 1) / positive.sum(1)
    np.testing.assert_allclose(loss, expected, rtol=1e-4, atol=1e-4 / temperature)
    # Jensen: -mean_p log p_ip >= log |P(i)|, since the p_ip sum to at most one.
    assert np.all(loss >= np.log(positive.sum(1)) - 1e-4 / temperature)


def test_huge_features_still_normalise_to_unit_length():
    features = np.array([[1e20, 0.0]], np.float32)
    weights = np.eye(2, dtype=np.float32)
    logits = ot_dynamic_softmax_logits(features, weights, np.zeros(2, np.float32), scale=1.0)
    np.testing.assert_allclose(logits, [[1.0, 0.0]], atol=1e-6)


# ----------------------------------------------------------------------------- cell masses


@fuzz_settings(30)
@given(shape=st.sampled_from(SOFTMAX_SHAPES), entropic=st.sampled_from([None, 0.5]),
       scale=st.floats(1.0, 64.0), data=st.data())
def test_cell_masses_are_a_distribution_for_extreme_inputs(shape, entropic, scale, data):
    num_points, classes, dim = shape
    weights = data.draw(rows_with_scales((classes, dim)), label="class weights")
    points = data.draw(rows_with_scales((num_points, dim)), label="points")
    potential = data.draw(hnp.arrays(np.float32, classes, elements=st.floats(
        -1e4, 1e4, width=32)), label="potential")
    masses = np.asarray(cell_masses(weights, potential, scale=scale, points=points,
                                    entropic_epsilon=entropic), np.float64)
    assert masses.shape == (classes,) and np.all(np.isfinite(masses)) and np.all(masses >= 0)
    np.testing.assert_allclose(masses.sum(), 1.0, atol=1e-5)
    if entropic is None:  # hard cells: whole points, each in the argmax cell
        logits = scale * _unit(points) @ _unit(weights).T + potential
        counts = np.round(masses * num_points)
        np.testing.assert_allclose(masses * num_points, counts, atol=1e-4)
        top = logits.max(1, keepdims=True)
        # Every class that receives a point is an argmax (up to float32 rounding) for some point.
        near_top = logits >= top - 1e-4 * (1 + np.abs(top))
        assert np.all(near_top.any(0)[counts > 0])
