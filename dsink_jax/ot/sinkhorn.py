"""D-SINK surrogate-label allocation by entropic optimal transport (Sinkhorn).

The D-SINK inner problem (docs/method.md section 1) is, for a batch of ``B`` samples
and ``C`` classes,

  min_Q  sum_ic Q_ic P_ic + epsilon * sum_ic Q_ic (log Q_ic - 1)
  s.t.   sum_c Q_ic = 1            (each sample's label is a distribution),
         sum_i Q_ic = B * m_c      (class mass ``m`` from the imbalance teacher),

with cost ``P_ic = -log f_N(x_i)_c - log f(x_i)_c``. It is entropic OT between
``a = 1_B / B`` and ``b = m``, scaled by ``B``. Its solution has the closed
form

  q_i = softmax((z^N_i + z_i) / epsilon + g),

``z`` the log-probabilities and ``g`` in R^C the class potential that makes the
column sums match; for the paper's ``epsilon = 2`` it is the geometric mean
``sqrt(f_N f)`` shifted per class. Sinkhorn finds ``g``.

Two interchangeable backends:

* ``"native"``: log-domain Sinkhorn in ``lax.scan``, exactly ``num_iters``
  (column update, row update) pairs, starting from zero potentials.
* ``"ott"``: ``ott-jax``'s :class:`~ott.solvers.linear.sinkhorn.Sinkhorn` on a
  :class:`~ott.geometry.geometry.Geometry` with absolute ``epsilon``. ott's
  iteration is the same pair (``g`` then ``f``) from the same zero start, so
  with ``min_iterations == max_iterations == inner_iterations == num_iters``
  both backends perform identical updates and agree to float32 rounding.

Both end with the row update, so rows of ``Q`` sum to one (to rounding) and the
residual error sits in the column marginal, which
:class:`SinkhornOutput` reports.
"""
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dsink_jax._checks import is_concrete as _is_concrete
from dsink_jax.ot.backends import BACKENDS

__all__ = ["SinkhornOutput", "sinkhorn_allocation", "allocation_from_potential",
           "class_potential_step", "BACKENDS"]


# Tolerance on ``sum(class_mass) == 1`` for concrete inputs: float32 means of
# softmax outputs over a large dataset drift by ~1e-6, far below this.
_MASS_SUM_TOL = 1e-4
# The solve runs in float32 on scores (log f_N + log f) / epsilon: below this, the scores of
# ordinary log-probabilities leave float32's useful range (and the plan is a hard assignment
# already, for all practical purposes).
MIN_EPSILON = 1e-4


class SinkhornOutput(NamedTuple):
    """The allocation and the diagnostics of one solve.

    Attributes:
      allocation: [B, C] float32 Q, rows on the simplex (rows masked out by ``where`` are 0),
        columns summing to ``B_valid * class_mass`` up to ``column_error``.
      potential: [C] class potential ``g`` in logit units (cost / epsilon),
        mean-centred over classes with positive mass; ``-inf`` for classes with
        zero mass. ``Q_i = softmax((z^N_i + z_i) / epsilon + g)``.
      row_error: [] max_i |sum_c Q_ic - 1| over valid rows (rounding-level by construction).
      column_error: [] max_c |sum_i Q_ic - B_valid m_c| / B_valid, the class-marginal
        violation relative to the number of valid rows (the convergence measure).
    """

    allocation: jax.Array
    potential: jax.Array
    row_error: jax.Array
    column_error: jax.Array


def _validate_options(num_classes, class_mass, epsilon, num_iters, backend):
    """Checks the solver options; shared with callers that jit the solve.

    Args:
      num_classes: C.
      class_mass: [C] or None (None: computed later by the caller).
      epsilon, num_iters, backend: as in :func:`sinkhorn_allocation`.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}; allowed values: {BACKENDS}.")
    if (isinstance(num_iters, bool)
        or not isinstance(num_iters, (int, np.integer))):
        raise TypeError(
            f"num_iters={num_iters!r} must be a Python int >= 1 (it fixes the "
            "number of Sinkhorn iterations at trace time).")
    if num_iters < 1:
        raise ValueError(f"num_iters={num_iters}; allowed range: >= 1.")
    if jnp.shape(epsilon) != ():
        raise ValueError(
            f"epsilon has shape {jnp.shape(epsilon)}; expected a scalar.")
    if _is_concrete(epsilon):
        eps_value = float(np.asarray(epsilon))
        if not (np.isfinite(eps_value) and eps_value >= MIN_EPSILON):
            raise ValueError(
                f"epsilon={eps_value}; allowed range: finite and >= {MIN_EPSILON} (the "
                "paper uses 2.0).")
    if class_mass is None:
        return
    if jnp.shape(class_mass) != (num_classes,):
        raise ValueError(
            f"class_mass has shape {jnp.shape(class_mass)}; expected "
            f"({num_classes},) (one mass per class).")
    if _is_concrete(class_mass):
        mass = np.asarray(class_mass, dtype=np.float64)
        if not np.all(np.isfinite(mass)) or np.any(mass < 0):
            raise ValueError(
                f"class_mass={mass} must be finite and nonnegative (a "
                "distribution over classes).")
        if abs(mass.sum() - 1.0) > _MASS_SUM_TOL:
            raise ValueError(
                f"class_mass sums to {mass.sum():.6g}; it must sum to 1 (tolerance "
                f"{_MASS_SUM_TOL}).")


def check_where(where, batch_size: int) -> None:
    """Raises unless `where` is None or a bool [B] mask (with a valid row, when concrete)."""
    if where is None:
        return
    if jnp.shape(where) != (batch_size,):
        raise ValueError(f"where has shape {jnp.shape(where)}; expected ({batch_size},) (one "
                         "flag per row).")
    if jnp.result_type(where) != jnp.bool_:
        raise TypeError(f"where has dtype {jnp.result_type(where)}; expected bool.")
    if _is_concrete(where) and not np.any(np.asarray(where)):
        raise ValueError("where masks out every row; at least one row must be valid.")


def _validate(noise_log_probs, student_log_probs, class_mass, epsilon,
              num_iters, backend, where=None):
    """Raises ValueError/TypeError on bad input; runs at trace time."""
    noise_shape = jnp.shape(noise_log_probs)
    student_shape = jnp.shape(student_log_probs)
    if len(noise_shape) != 2:
        raise ValueError(
            f"noise_log_probs has shape {noise_shape}; expected [B, C].")
    if student_shape != noise_shape:
        raise ValueError(
            f"student_log_probs has shape {student_shape}; expected the shape of "
            f"noise_log_probs, {noise_shape}.")
    if noise_shape[0] < 1 or noise_shape[1] < 1:
        raise ValueError(f"empty problem: shape {noise_shape}; need B, C >= 1.")
    _validate_options(noise_shape[1], class_mass, epsilon, num_iters, backend)
    check_where(where, noise_shape[0])
    for name, value in (("noise_log_probs", noise_log_probs),
                        ("student_log_probs", student_log_probs)):
        if _is_concrete(value):
            array = np.asarray(value)
            if not np.all(np.isfinite(array)):
                bad = np.argwhere(~np.isfinite(array))[0]
                raise ValueError(
                    f"{name} has a non-finite entry {array[tuple(bad)]} at index "
                    f"{tuple(int(i) for i in bad)}; log-probabilities must be finite "
                    "(pass log_softmax of finite logits).")


def _native_potential(scores, log_column_target, num_iters, valid):
    """Log-domain Sinkhorn over the rows where `valid`; returns the class potential g [C]."""
    batch_size, num_classes = scores.shape

    def one_iteration(carry, _):
        row_potential, _ = carry
        # Column update first, row update last (as ott-jax does), so the returned
        # rows are exactly normalised. Masked rows take no part in the column sums.
        class_potential = log_column_target - jax.nn.logsumexp(
            scores + row_potential[:, None], axis=0, where=valid[:, None])
        row_potential = -jax.nn.logsumexp(scores + class_potential[None, :],
                                          axis=1)
        return (row_potential, class_potential), None

    init = (jnp.zeros((batch_size,), scores.dtype),
            jnp.zeros((num_classes,), scores.dtype))
    (_, class_potential), _ = jax.lax.scan(one_iteration, init, None, length=num_iters)
    return class_potential


def _ott_potential(cost, class_mass, epsilon, num_iters, valid):
    """ott-jax Sinkhorn; returns the class potential g [C] in logit units (cost / epsilon)."""
    # Imported here: ott pulls in jaxopt/lineax (seconds of import time) and
    # only this backend needs it.
    from ott.geometry import geometry
    from ott.problems.linear import linear_problem
    from ott.solvers.linear import sinkhorn as ott_sinkhorn

    num_valid = jnp.sum(valid)
    # epsilon is absolute: ott's default (None) would scale it by the cost's
    # standard deviation, which is not the D-SINK problem. A masked row has zero source mass.
    geom = geometry.Geometry(cost_matrix=cost, epsilon=epsilon)
    problem = linear_problem.LinearProblem(
        geom, a=valid.astype(cost.dtype) / num_valid, b=class_mass)
    # min == max forces ott's fixed-length scan (no while_loop, fast under
    # vmap); inner_iterations == num_iters makes the scan length exactly
    # num_iters (ott runs (max // inner) * inner iterations). threshold is then
    # unused.
    solver = ott_sinkhorn.Sinkhorn(
        lse_mode=True, threshold=0.0, inner_iterations=num_iters,
        min_iterations=num_iters, max_iterations=num_iters)
    return solver(problem).g / epsilon


def sinkhorn_allocation(
    noise_log_probs: jax.Array,
    student_log_probs: jax.Array,
    class_mass: jax.Array,
    *,
    epsilon: float | jax.Array = 2.0,
    num_iters: int = 50,
    backend: str = "ott",
    where: jax.Array | None = None,
) -> SinkhornOutput:
    """D-SINK surrogate labels: entropic OT between samples and class mass.

    Solves the problem in the module docstring with cost
    ``P = -(noise_log_probs + student_log_probs)``. The result is a target:
    all inputs are wrapped in ``stop_gradient``.

    Args:
      noise_log_probs: [B, C] log-probabilities of the noise-robust teacher
        ``f_N`` (``log_softmax`` of its logits).
      student_log_probs: [B, C] log-probabilities of the target model ``f``.
      class_mass: [C] class distribution (nonnegative, sums to 1), e.g. the mean
        of the imbalance-robust teacher's probabilities.
      epsilon: entropic regularisation (> 0); 2.0 is the paper's value. May be a
        traced scalar (e.g. vmapped over for a sweep); then its value is not
        checked.
      num_iters: exact number of Sinkhorn iterations (static, >= 1).
      backend: "ott" (ott-jax's Sinkhorn, the default) or "native" (``lax.scan``
        here; the same iterations, kept as the test oracle and for very large
        problems, where it is faster: see benchmarks/README.md).
      where: optional [B] bool mask: rows marked False (padding of a last partial
        batch, of an uneven shard) take no part in the problem, so the other
        rows' allocation is that of the batch without them; their rows of Q are 0.

    Returns:
      A :class:`SinkhornOutput`: the allocation Q [B, C] and the potential and
      marginal errors of the solve.

    Raises:
      ValueError, TypeError: on bad shapes, options or (concrete) values, before
        any computation. Under tracing, non-finite inputs cannot be detected
        here; they propagate as NaN into Q (the loss exposes ``finite``).
    """
    _validate(noise_log_probs, student_log_probs, class_mass, epsilon,
              num_iters, backend, where)
    valid = (jnp.ones(jnp.shape(noise_log_probs)[:1], bool) if where is None
             else jnp.asarray(where))
    return _solve(noise_log_probs, student_log_probs, class_mass, epsilon, valid,
                  num_iters=num_iters, backend=backend)


# Jitted so that eager calls compile once per shape instead of dispatching op
# by op (and re-tracing ott's solver) on every call; under an outer jit it is
# inlined. epsilon is an argument, not static, so new values do not recompile.
@functools.partial(jax.jit, static_argnames=("num_iters", "backend"))
def _solve(noise_log_probs, student_log_probs, class_mass, epsilon, valid, *,
           num_iters, backend):
    """The computation of :func:`sinkhorn_allocation`, on validated inputs."""
    # Targets only: no gradient through the solver. float32 throughout, even
    # for bfloat16 inputs, since the potentials accumulate over iterations.
    noise_log_probs, student_log_probs, class_mass, epsilon = (
        jax.lax.stop_gradient(jnp.asarray(x, jnp.float32))
        for x in (noise_log_probs, student_log_probs, class_mass, epsilon))
    num_valid = jnp.sum(valid).astype(jnp.float32)
    cost = -(noise_log_probs + student_log_probs)

    # Full float32 precision on accelerators (TPU matmuls default to bfloat16
    # passes); the native solver has no matmul, ott's kernels may.
    scores = cost / -epsilon
    with jax.default_matmul_precision("float32"):
        if backend == "native":
            # log(0) = -inf is fine: that class's column is then exactly zero.
            log_column_target = jnp.log(num_valid * class_mass)
            potential = _native_potential(scores, log_column_target, num_iters, valid)
        else:
            potential = _ott_potential(cost, class_mass, epsilon, num_iters, valid)
    # Both end with the row update: each row of Q is softmax(scores_i + g). Taken as a softmax,
    # it avoids adding and cancelling huge terms when |scores| is large (small epsilon).
    plan = jnp.where(valid[:, None], jax.nn.softmax(scores + potential[None, :], axis=1), 0.0)

    has_mass = class_mass > 0
    # Centre over classes that carry mass: zero-mass classes have g = -inf.
    centre = (jnp.sum(jnp.where(has_mass, potential, 0.0))
              / jnp.maximum(jnp.sum(has_mass), 1))
    return SinkhornOutput(
        allocation=plan,
        potential=jnp.where(has_mass, potential - centre, -jnp.inf),
        row_error=jnp.max(jnp.where(valid, jnp.abs(jnp.sum(plan, axis=1) - 1.0), 0.0)),
        column_error=jnp.max(jnp.abs(jnp.sum(plan, axis=0) - num_valid * class_mass))
        / num_valid,
    )


def allocation_from_potential(noise_log_probs: jax.Array, student_log_probs: jax.Array,
                              potential: jax.Array, *,
                              epsilon: float | jax.Array = 2.0) -> jax.Array:
    """The closed form of the allocation for a given class potential.

    ``Q_i = softmax((noise_log_probs_i + student_log_probs_i) / epsilon + potential)``: the rows
    of the entropic plan once ``potential`` (``g`` of the module docstring) is known. With the
    ``g`` Sinkhorn finds over a set of samples it is that set's allocation; with a ``g`` carried
    across batches (:func:`class_potential_step`) it is an allocation over the whole stream.

    Args:
      noise_log_probs: [B, C] log-probabilities of ``f_N``.
      student_log_probs: [B, C] log-probabilities of the student.
      potential: [C] class potential in logit units.
      epsilon: entropic regularisation (> 0).

    Returns:
      Q [B, C] float32, rows on the simplex; no gradient flows to any input.
    """
    noise_log_probs, student_log_probs, potential, epsilon = (
        jax.lax.stop_gradient(jnp.asarray(x, jnp.float32))
        for x in (noise_log_probs, student_log_probs, potential, epsilon))
    return jax.nn.softmax((noise_log_probs + student_log_probs) / epsilon + potential, axis=-1)


def class_potential_step(potential: jax.Array, allocation: jax.Array, class_mass: jax.Array, *,
                         learning_rate: float | jax.Array,
                         where: jax.Array | None = None) -> jax.Array:
    """One stochastic dual-ascent step on the class potential towards a target class mass.

    ``g <- g + lr * (log m - log mean_i Q_i)``, then mean-centred over classes with mass. With
    ``lr = 1`` and the whole dataset as the batch this is exactly Sinkhorn's column update in the
    closed form (the next :func:`allocation_from_potential` then has column mass ``m`` up to the
    change of the row normalisers); with mini-batches and ``lr < 1`` it averages the batches'
    column errors, so the potential tracks the allocation of the whole training stream (the
    stated ``Q 1_N = sum_i f_L(x_i)``) in O(C) memory and no batch is forced to match ``m``.

    Args:
      potential: [C] current potential.
      allocation: [B, C] the batch's allocation under ``potential``.
      class_mass: [C] target class mass (sums to 1; zero-mass classes get ``-inf``-like
        potential through the log, so keep masses > 0 in practice).
      learning_rate: step size in (0, 1].
      where: optional [B] bool mask of the rows that count (padding excluded).

    Returns:
      [C] the new potential (float32, no gradient).
    """
    potential, allocation, class_mass = (jax.lax.stop_gradient(jnp.asarray(x, jnp.float32))
                                         for x in (potential, allocation, class_mass))
    tiny = jnp.finfo(jnp.float32).tiny
    batch_mass = jnp.mean(allocation, axis=0, where=None if where is None else where[:, None])
    has_mass = class_mass > 0
    step = jnp.where(has_mass, jnp.log(jnp.maximum(class_mass, tiny))
                     - jnp.log(jnp.maximum(batch_mass, tiny)), 0.0)
    new = potential + learning_rate * step
    centre = jnp.sum(jnp.where(has_mass, new, 0.0)) / jnp.maximum(jnp.sum(has_mass), 1)
    return jnp.where(has_mass, new - centre, -1e9)
