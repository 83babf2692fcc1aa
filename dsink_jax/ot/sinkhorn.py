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

Three solve modes (``mode``, ours; :data:`SINKHORN_MODES`):

* ``"log"``: the log-domain iterations above (two ``logsumexp`` passes over the
  [B, C] scores per iteration).
* ``"kernel"``: the same iterations in the scaling domain. Each valid row of the
  scores is shifted by its maximum (the plan is invariant to per-row shifts; every
  row's largest kernel entry becomes 1, so no row underflows), the kernel
  ``K = exp(shifted)`` is computed once, and each iteration is two matrix-vector
  products, ``v = target / (K^T u)`` then ``u = 1 / (K v)``; ``g = log v``. The
  start ``u_0 = exp(rowmax - max rowmax)`` is the log domain's zero row potential
  in shifted units, so both modes perform the same iterations up to a constant
  shift of ``g`` (removed by the centring) and agree to float32 rounding at any
  ``num_iters`` (a row whose maximum is more than :data:`KERNEL_LOG_FLOOR` below the
  batch's largest starts at ``exp(-KERNEL_LOG_FLOOR)`` instead, which changes the
  first column update only). At the paper's ``epsilon = 2`` this measured 4-10x faster
  on a 2-core CPU (benchmarks/README.md). Forced, it checks its result: if any final
  scaling of a valid row or of a class with mass is non-finite or zero (an
  overflow or underflow anywhere in the iterations carries through to them),
  every field of the output is NaN (``dsink_loss``'s ``finite`` flag then reads
  False) rather than silently wrong. Not checked: kernel entries below float32's
  range (shifted scores < -87) count as 0; each such entry's share of its row
  is below ``e^-87 v_c / v_c*`` (``c*`` the row's best class), negligible unless
  the class potentials themselves span ~80 nats.
* ``"auto"`` (the default): the kernel solve when a guard on the shifted scores
  says it is safe (every class with mass has a kernel entry of at least
  ``exp(-KERNEL_LOG_FLOOR)`` over the valid rows), else, or when the kernel
  solve's check fails (the guard is a cheap pre-check, not a guarantee: e.g. a
  class mass of 1e-25 next to rows that are far from every other class
  underflows that class's scaling), the log-domain solve, whose result is then
  exactly that of ``"log"``. The choice is made on the data at run time with
  ``jax.lax.cond``, so one compiled program serves both; under ``vmap`` with a
  batched predicate ``cond`` becomes a ``select`` and *both* solves run (the
  result is still per-problem correct, at the cost of the two).

Kernel mode on the ``"ott"`` backend is ott's ``Sinkhorn(lse_mode=False)`` on the
same kernel and start, through a small Geometry subclass (:func:`_scaling_geometry`)
that keeps the fixed-epsilon products fast and the divisions exact. The final plan
is always ``softmax(scores + g)``, computed in the log domain.
"""
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dsink_jax._checks import is_concrete as _is_concrete
from dsink_jax.ot.backends import BACKENDS

__all__ = ["SinkhornOutput", "sinkhorn_allocation", "allocation_from_potential",
           "class_potential_step", "BACKENDS", "KERNEL_LOG_FLOOR", "SINKHORN_MODES"]


# Tolerance on ``sum(class_mass) == 1`` for concrete inputs: float32 means of
# softmax outputs over a large dataset drift by ~1e-6, far below this.
_MASS_SUM_TOL = 1e-4
# The solve runs in float32 on scores (log f_N + log f) / epsilon: below this, the scores of
# ordinary log-probabilities leave float32's useful range (and the plan is a hard assignment
# already, for all practical purposes).
MIN_EPSILON = 1e-4
# Solve modes of sinkhorn_allocation (ours, see the module docstring): "auto" = the scaling-domain
# solve where the guard allows, else the log domain; "log" and "kernel" force one of them.
SINKHORN_MODES = ("auto", "log", "kernel")
# The "auto" guard, in logit units: kernel mode runs only when every class with mass has, after
# the row shift, a shifted score >= -KERNEL_LOG_FLOOR in some valid row, i.e. a kernel entry
# >= e^-30 ~ 1e-13. Why 30: float32's normal range is e^-87 .. e^88 (1.2e-38 .. 3.4e38). Every
# row's largest kernel entry is 1 and every massive column's is >= e^-F, so a class scaling needs
# at most a factor e^F over the row scalings to reach its target (v_c <= T_c e^F / u_i* for its
# best row i*), and the first column sums are >= e^-2F (the initial row scalings are clamped at
# e^-F too). F = 30 keeps these within e^-60 .. e^30 and leaves e^27 .. e^57 of float32's range
# for what the scalings also absorb (the batch size and the class-mass ratios, T_c = B_valid
# m_c), so with ordinary batch sizes and class-mass ratios the scalings stay finite and normal
# over any num_iters (a class mass of 1e-25 can still underflow: see the tests). A larger F
# would eat that headroom; a smaller one would send ordinary problems to the slower log
# domain (at epsilon 2 a column's best shifted score is the gap, halved, between the summed
# log-probabilities of the sample that likes the class best and that sample's favourite; on
# benchmarks/allocation.py's problems, logits of std 3, the worst class sits at -0.4 .. -4.7
# for 128 .. 4096 rows and 10 .. 8142 classes). The guard is a
# cheap pre-check, not a proof (tiny class masses can still underflow a scaling): the kernel
# solve's own finiteness check is the net behind it.
KERNEL_LOG_FLOOR = 30.0


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


def _validate_options(num_classes, class_mass, epsilon, num_iters, backend, mode="auto"):
    """Checks the solver options; shared with callers that jit the solve.

    Args:
      num_classes: C.
      class_mass: [C] or None (None: computed later by the caller).
      epsilon, num_iters, backend, mode: as in :func:`sinkhorn_allocation`.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}; allowed values: {BACKENDS}.")
    if not isinstance(mode, str) or mode not in SINKHORN_MODES:
        raise ValueError(f"mode={mode!r}; allowed values: {SINKHORN_MODES}.")
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
              num_iters, backend, where=None, mode="auto"):
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
    _validate_options(noise_shape[1], class_mass, epsilon, num_iters, backend, mode)
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


def _row_shift(scores, valid):
    """The scores minus each row's maximum, masked rows set to ``-inf``; and the row maxima.

    The plan is invariant to per-row shifts of the scores (they move only the row potential),
    and after this one every valid row's largest kernel entry ``exp(shifted)`` is exactly 1.
    """
    row_max = jnp.max(scores, axis=1)
    shifted = jnp.where(valid[:, None], scores - row_max[:, None], -jnp.inf)
    return shifted, row_max


def _kernel_usable(kernel, has_mass):
    """The "auto" guard: [] bool, every class with mass has a kernel entry >= e^-floor.

    Args:
      kernel: [B, C] exp of the row-shifted scores, masked rows 0.
      has_mass: [C] bool classes with positive mass.
    """
    column_max = jnp.max(kernel, axis=0)  # masked rows are 0
    # exp is monotone and e^-KERNEL_LOG_FLOOR is a normal float32, so this is
    # max_i shifted_ic >= -KERNEL_LOG_FLOOR (NaN compares False: then the log domain runs).
    return jnp.all(jnp.where(has_mass, column_max >= float(np.exp(-KERNEL_LOG_FLOOR)), True))


def _initial_row_scaling(row_max, valid):
    """The log domain's zero row potential in shifted units: u_0 = exp(rowmax - max rowmax).

    Clamped below at exp(-KERNEL_LOG_FLOOR) so that no valid row starts at zero (which would
    change the first column sums more than the clamp does); masked rows are 0.
    """
    top = jnp.max(jnp.where(valid, row_max, -jnp.inf))
    log_scaling = jnp.maximum(row_max - top, -KERNEL_LOG_FLOOR)
    return jnp.where(valid, jnp.exp(jnp.where(valid, log_scaling, 0.0)), 0.0)


def _scalings_ok(log_row_scaling, log_class_scaling, valid, has_mass):
    """[] bool: every valid row's and massive class's scaling is finite and nonzero.

    An overflow (inf), an underflow to zero or a 0 * inf (NaN) anywhere in the iterations
    reaches the final scalings: each update is computed from the previous one.
    """
    return jnp.logical_and(
        jnp.all(jnp.where(valid, jnp.isfinite(log_row_scaling), True)),
        jnp.all(jnp.where(has_mass, jnp.isfinite(log_class_scaling), True)))


def _native_kernel_potential(kernel, column_target, row_scaling, num_iters, valid, has_mass):
    """Scaling-domain Sinkhorn; returns (g [C] = log v, [] bool scalings finite and nonzero).

    Args:
      kernel: [B, C] exp of the row-shifted scores, masked rows 0.
      column_target: [C] B_valid * class_mass.
      row_scaling: [B] the initial u (masked rows 0).
      num_iters: iterations (static).
      valid: [B] bool rows that take part.
      has_mass: [C] bool classes with positive mass.
    """
    def one_iteration(carry, _):
        row_scaling, _ = carry
        # Column update then row update, as in the log domain. `vec @ kernel` rather than
        # `kernel.T @ vec`: XLA:CPU materialises the transpose of the latter (4x slower).
        # Zero-mass classes get v = 0 (avoiding 0 / 0 when their column underflows), masked
        # rows u = 0 (their kernel row is 0, so 1 / 0 would give inf and then 0 * inf = NaN).
        class_scaling = jnp.where(has_mass, column_target / (row_scaling @ kernel), 0.0)
        row_scaling = jnp.where(valid, 1.0 / (kernel @ class_scaling), 0.0)
        return (row_scaling, class_scaling), None

    init = (row_scaling, jnp.zeros(kernel.shape[1:], kernel.dtype))
    (row_scaling, class_scaling), _ = jax.lax.scan(one_iteration, init, None, length=num_iters)
    # log 0 = -inf for zero-mass classes, as in the log domain.
    class_potential = jnp.log(class_scaling)
    return class_potential, _scalings_ok(jnp.log(row_scaling), class_potential, valid, has_mass)


@functools.cache
def _scaling_geometry():
    """An ott-jax Geometry for kernel-mode Sinkhorn at a fixed epsilon (created once, lazily).

    ott's own :class:`~ott.geometry.geometry.Geometry` is correct but slow here: it raises the
    kernel to the power ``epsilon / epsilon(iteration)`` on every product (a [B, C] ``pow``,
    since epsilon is traced), multiplies by the transposed kernel (materialised by XLA:CPU),
    and replaces zero denominators by 1 in the scaling updates, which hides an underflow (the
    scaling silently becomes the marginal). This subclass, for a constant epsilon (no
    schedule, so the power is 1), multiplies by the kernel as stored and divides as is, so an
    underflow gives inf and the finiteness check sees it. Measured at B x C = 4096 x 1000, 50
    iterations: ~1250 ms with the stock Geometry against ~100 ms with this one.
    """
    from ott.geometry import geometry

    @jax.tree_util.register_pytree_node_class
    class ScalingGeometry(geometry.Geometry):
        """Kernel matrix given; fixed epsilon; exact division in the scaling update."""

        def apply_kernel(self, vec, eps=None, axis=0):
            del eps  # constant epsilon: the schedule's power is 1
            kernel = self.kernel_matrix
            return kernel @ vec if axis == 1 else vec @ kernel

        def update_scaling(self, scaling, marginal, iteration=None, axis=0):
            del iteration
            return jnp.where(marginal > 0, marginal / self.apply_kernel(scaling, axis=axis), 0.0)

    return ScalingGeometry


def _ott_kernel_potential(kernel, class_mass, epsilon, num_iters, valid, row_scaling,
                          has_mass):
    """ott-jax kernel-mode Sinkhorn; returns (g [C] in logit units, [] bool scalings ok).

    ``kernel`` is exp of the row-shifted scores, i.e. the kernel of the row-shifted cost
    ``cost_i - min_c cost_ic``, which changes f but not g. In kernel mode ott keeps scalings
    ``u = exp(f / eps)``, ``v = exp(g / eps)`` and reports ``f = eps log u``, ``g = eps log v``
    (``Sinkhorn.output_from_state``, ``Geometry.potential_from_scaling``), so ``g / epsilon``
    is ``log v``, the class potential up to a constant, as in lse mode.
    """
    from ott.problems.linear import linear_problem
    from ott.solvers.linear import sinkhorn as ott_sinkhorn

    num_valid = jnp.sum(valid)
    geom = _scaling_geometry()(kernel_matrix=kernel, epsilon=epsilon)
    problem = linear_problem.LinearProblem(
        geom, a=valid.astype(kernel.dtype) / num_valid, b=class_mass)
    solver = ott_sinkhorn.Sinkhorn(
        lse_mode=False, threshold=0.0, inner_iterations=num_iters,
        min_iterations=num_iters, max_iterations=num_iters)
    # Initial scalings (u, v) = (the log domain's start, 1): v is recomputed first.
    out = solver(problem, init=(row_scaling, jnp.where(has_mass, 1.0, 0.0)))
    class_potential = out.g / epsilon
    return class_potential, _scalings_ok(out.f / epsilon, class_potential, valid, has_mass)


def sinkhorn_allocation(
    noise_log_probs: jax.Array,
    student_log_probs: jax.Array,
    class_mass: jax.Array,
    *,
    epsilon: float | jax.Array = 2.0,
    num_iters: int = 50,
    backend: str = "ott",
    where: jax.Array | None = None,
    mode: str = "auto",
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
      mode: "auto" (the default), "log" or "kernel" (:data:`SINKHORN_MODES`, see the module
        docstring): the scaling-domain solve where a guard on the data allows it, else the
        log domain; or one of the two forced. A forced "kernel" solve whose scalings
        overflow or underflow (likely where the guard would refuse) returns NaN in every field.

    Returns:
      A :class:`SinkhornOutput`: the allocation Q [B, C] and the potential and
      marginal errors of the solve.

    Raises:
      ValueError, TypeError: on bad shapes, options or (concrete) values, before
        any computation. Under tracing, non-finite inputs cannot be detected
        here; they propagate as NaN into Q (the loss exposes ``finite``).
    """
    _validate(noise_log_probs, student_log_probs, class_mass, epsilon,
              num_iters, backend, where, mode)
    valid = (jnp.ones(jnp.shape(noise_log_probs)[:1], bool) if where is None
             else jnp.asarray(where))
    return _solve(noise_log_probs, student_log_probs, class_mass, epsilon, valid,
                  num_iters=num_iters, backend=backend, mode=mode)


# Jitted so that eager calls compile once per shape instead of dispatching op
# by op (and re-tracing ott's solver) on every call; under an outer jit it is
# inlined. epsilon is an argument, not static, so new values do not recompile.
@functools.partial(jax.jit, static_argnames=("num_iters", "backend", "mode"))
def _solve(noise_log_probs, student_log_probs, class_mass, epsilon, valid, *,
           num_iters, backend, mode="auto"):
    """The computation of :func:`sinkhorn_allocation`, on validated inputs."""
    # Targets only: no gradient through the solver. float32 throughout, even
    # for bfloat16 inputs, since the potentials accumulate over iterations.
    noise_log_probs, student_log_probs, class_mass, epsilon = (
        jax.lax.stop_gradient(jnp.asarray(x, jnp.float32))
        for x in (noise_log_probs, student_log_probs, class_mass, epsilon))
    num_valid = jnp.sum(valid).astype(jnp.float32)
    cost = -(noise_log_probs + student_log_probs)
    has_mass = class_mass > 0

    scores = cost / -epsilon

    def log_solve():
        if backend == "native":
            # log(0) = -inf is fine: that class's column is then exactly zero.
            log_column_target = jnp.log(num_valid * class_mass)
            return _native_potential(scores, log_column_target, num_iters, valid)
        return _ott_potential(cost, class_mass, epsilon, num_iters, valid)

    def kernel_solve(kernel, row_max):
        row_scaling = _initial_row_scaling(row_max, valid)
        if backend == "native":
            return _native_kernel_potential(kernel, num_valid * class_mass, row_scaling,
                                            num_iters, valid, has_mass)
        return _ott_kernel_potential(kernel, class_mass, epsilon, num_iters, valid,
                                     row_scaling, has_mass)

    def kernel_refused(kernel, row_max):
        del kernel, row_max
        return jnp.full(class_mass.shape, jnp.nan, jnp.float32), jnp.array(False)

    # Full float32 precision on accelerators (TPU matmuls default to bfloat16
    # passes): the kernel solves are matrix-vector products, ott's kernels may be too.
    # (lax.cond traces its branches here, inside the context.)
    with jax.default_matmul_precision("float32"):
        if mode == "log":
            potential = log_solve()
        else:
            shifted, row_max = _row_shift(scores, valid)
            kernel = jnp.exp(shifted)  # masked rows: exp(-inf) = 0
            if mode == "kernel":
                potential, ok = kernel_solve(kernel, row_max)
            else:
                # Run time choice on the (traced) data; one compiled program for both. Under
                # vmap a batched predicate turns each cond into a select: both sides run.
                # The kernel is made outside the cond, in one pass with the shift and the
                # guard (wasted only when the guard refuses, next to a log solve's 2 x
                # num_iters passes).
                kernel_potential, ok = jax.lax.cond(_kernel_usable(kernel, has_mass),
                                                    kernel_solve, kernel_refused, kernel, row_max)
                potential = jax.lax.cond(ok, lambda: kernel_potential, log_solve)
    # All modes end with the row update: each row of Q is softmax(scores_i + g). Taken as a softmax,
    # it avoids adding and cancelling huge terms when |scores| is large (small epsilon).
    plan = jnp.where(valid[:, None], jax.nn.softmax(scores + potential[None, :], axis=1), 0.0)

    # Centre over classes that carry mass: zero-mass classes have g = -inf.
    centre = (jnp.sum(jnp.where(has_mass, potential, 0.0))
              / jnp.maximum(jnp.sum(has_mass), 1))
    output = SinkhornOutput(
        allocation=plan,
        potential=jnp.where(has_mass, potential - centre, -jnp.inf),
        row_error=jnp.max(jnp.where(valid, jnp.abs(jnp.sum(plan, axis=1) - 1.0), 0.0)),
        column_error=jnp.max(jnp.abs(jnp.sum(plan, axis=0) - num_valid * class_mass))
        / num_valid,
    )
    if mode == "kernel":
        # A failed forced kernel solve returns NaN everywhere, not a wrong finite plan. Set
        # explicitly: a NaN potential does not reliably make Q NaN on XLA:CPU (in testing,
        # softmax(scores + where(ok, g, nan)) with ok False came out finite and wrong).
        output = SinkhornOutput(*(jnp.where(ok, x, jnp.nan) for x in output))
    return output


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
