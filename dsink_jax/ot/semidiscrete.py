"""Semi-discrete optimal transport from the unit sphere to a cosine classifier's classes.

A cosine classifier with unit class weights ``w_c``, scale ``s`` and per-class heights ``h_c``
predicts ``argmax_c s<w_c, x> + h_c`` for a unit feature ``x``. Its decision cells
``L_c(h) = {x in S^{d-1} : s<w_c, x> + h_c >= s<w_j, x> + h_j for all j}`` form a power diagram
of the sphere. Semi-discrete OT asks for the heights ``h`` such that each cell carries a target
mass ``nu_c`` under a source measure ``mu`` on the sphere. (OT-dynamic softmax, Jin et al., JCST
2025; see ``docs/method.md`` section 2 for which parts are stated there and which are ours.)

The heights minimise the convex (dual) energy

    E(h) = E_{x~mu}[max_c (s<w_c, x> + h_c)] - sum_c nu_c h_c,

whose (sub)gradient is ``mass_c(h) - nu_c``, the cell mass minus its target. The entropic
(soft-cell) version replaces the max by ``eps * logsumexp(. / eps)``:

    E_eps(h) = E_{x~mu}[eps * logsumexp_c((s<w_c, x> + h_c) / eps)] - <nu, h>,

with gradient ``E_x[softmax((s<w, x> + h) / eps)] - nu`` (soft cell masses). It is smooth with
curvature at most ``1 / eps``, so it is better conditioned than the hard energy when the classes are
separable. Both energies are invariant to adding a constant to ``h``; we return the mean-zero
minimiser.

Solver (ours): stochastic dual descent. Every step draws a fresh Monte-Carlo batch
``x ~ mu`` (``jax.random.fold_in(rng, step)``), estimates the (soft or one-hot argmax) cell masses,
takes an Adam step (optax) on ``h`` with gradient ``mass - nu`` and re-centres ``h`` to mean zero
(Adam's per-coordinate scaling would otherwise let the mean drift). A ``lax.scan`` over a fixed
number of steps keeps ``jit`` and ``vmap`` predictable. Monte-Carlo noise is averaged out by
returning the Polyak average of the last half of the iterates (``average_fraction=0.5``; Polyak
and Juditsky 1992). A constant learning rate is the default (``lr_decay="constant"``); a cosine
decay is an option. We measured both (C in {10, 100}, s in {8, 16, 30}, 100 and 300 steps of
2048 samples): constant + tail average was about as accurate or better in all but one case,
because a decayed rate limits how far ``h`` can travel from a cold start (about
``learning_rate * num_steps / 2`` logits), while Adam's own step shrinks near the optimum, where
the gradient is mostly noise.

Learning rate: a fresh Adam moves every height by about ``learning_rate`` in its first step,
whatever the gradient's size (its step is normalised). A cold start needs ``learning_rate *
num_steps`` well above the spread of the heights (about ``s`` times the spread of the weights'
geometry plus the log-ratio of the masses): 0.1 and 100 to 300 steps. Warm-started once per
training step, where the optimum moves little, use a small rate (0.01 to 0.03) and 1 to 10
steps: with 0.1 the warm start itself jitters by 0.1 per call (measured at C = 100, d = 64).

``mu`` is the uniform measure on ``S^{d-1}`` (the "uniform distribution condition"; sampled as
normalised Gaussians), or the empirical measure of given ``source_points`` (then every step uses
all points, whose scores ``s<w_c, x>`` are computed once: a deterministic full-batch gradient).

ott-jax backend (``backend="ott"``): ott-jax 0.6 ships
:class:`ott.solvers.linear.semidiscrete.SemidiscreteSolver`, stochastic dual ascent for a sampled
continuous source and a discrete target. It fits our problem with the cost
``c(x, y_c) = -<x, y_c>`` (:class:`ott.geometry.costs.NegDotProduct`), ``y_c = s w_c``, and a
sampler of uniform unit vectors. Two differences are bridged here: (1) ott's entropic
c-transform weighs the soft assignment by the target marginal, ``softmax((g - c) / eps + log nu)``,
so its dual vector relates to our heights by ``h = g + eps * log(nu)`` (mean-centred); hence
``backend="ott"`` needs strictly positive target masses; (2) ott returns an exponential moving
average of its iterates instead of our tail average. The backend only samples (it takes no
``source_points``) and runs a fixed number of steps (its convergence test is disabled). It is
there as an independent cross-check (tests compare both); ``backend="native"`` (this module) is the default.

Monte-Carlo tolerance: with ``N`` samples per step a cell mass is estimated with standard error
``sqrt(nu_c (1 - nu_c) / N)``; the averaged iterate is far less noisy than one step.
"""
from __future__ import annotations

import functools
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dsink_jax._checks import check_positive as _check_positive
from dsink_jax._checks import concrete as _concrete
from dsink_jax._checks import l2_normalize as _l2_normalise
from dsink_jax.ot.backends import BACKENDS

__all__ = [
    "BACKENDS",
    "PotentialOutput",
    "cell_masses",
    "semidiscrete_potential",
    "sample_unit_sphere",
    "update_potential",
]

# Class masses are float32 sums; a distribution may be off by rounding, not by more.
_SIMPLEX_ATOL = 1e-4


class PotentialOutput(NamedTuple):
    """The heights of a potential solve and their diagnostics.

    Attributes:
      potential: [C] float32 heights ``h`` with mean zero.
      cell_mass: [C] cell masses of the returned potential, measured on a fresh Monte-Carlo
        sample (``source_points`` when given).
      mass_error: [] ``max_c |cell_mass_c - nu_c|``.
      energy: [] the (hard or entropic) dual energy at the returned potential, on the same sample.
    """

    potential: jax.Array
    cell_mass: jax.Array
    mass_error: jax.Array
    energy: jax.Array


def _check_shapes(class_weights, potential=None, *, potential_name: str = "potential") -> int:
    if jnp.ndim(class_weights) != 2:
        raise ValueError(
            f"class_weights must have shape [C, d], got shape {jnp.shape(class_weights)}.")
    num_classes = jnp.shape(class_weights)[0]
    if potential is not None and jnp.shape(potential) != (num_classes,):
        raise ValueError(
            f"{potential_name} must have shape [C] = ({num_classes},) to match class_weights "
            f"{jnp.shape(class_weights)}, got shape {jnp.shape(potential)}.")
    return num_classes


def sample_unit_sphere(rng: jax.Array, num_samples: int, dim: int,
                       dtype=jnp.float32) -> jax.Array:
    """Draws points from the uniform measure on the unit sphere ``S^{dim-1}``.

    Args:
      rng: PRNG key.
      num_samples: number of points ``N``.
      dim: ambient dimension ``d``.
      dtype: floating dtype.

    Returns:
      [N, d] unit vectors (normalised standard Gaussians, which are rotation invariant).
    """
    return _l2_normalise(jax.random.normal(rng, (num_samples, dim), dtype))


def _logits(unit_points: jax.Array, unit_weights: jax.Array, potential: jax.Array,
            scale) -> jax.Array:
    return scale * unit_points @ unit_weights.T + potential


def _masses_from_logits(logits: jax.Array, entropic_epsilon: float | None) -> jax.Array:
    num_classes = logits.shape[-1]
    if entropic_epsilon is None:
        # One-hot argmax is the exact subgradient of the max; ties have measure zero under mu.
        assignment = jax.nn.one_hot(jnp.argmax(logits, axis=-1), num_classes, dtype=logits.dtype)
    else:
        assignment = jax.nn.softmax(logits / entropic_epsilon, axis=-1)
    return jnp.mean(assignment, axis=0)


def _energy_from_logits(logits: jax.Array, target_mass: jax.Array, potential: jax.Array,
                        entropic_epsilon: float | None) -> jax.Array:
    if entropic_epsilon is None:
        smooth_max = jnp.max(logits, axis=-1)
    else:
        smooth_max = entropic_epsilon * jax.nn.logsumexp(logits / entropic_epsilon, axis=-1)
    return jnp.mean(smooth_max) - jnp.dot(target_mass, potential)


def cell_masses(class_weights: jax.Array, potential: jax.Array, *, scale,
                points: jax.Array, entropic_epsilon: float | None = None) -> jax.Array:
    """Masses of the cosine-classifier cells under the empirical measure of ``points``.

    Args:
      class_weights: [C, d] class weights (normalised inside).
      potential: [C] heights ``h``.
      scale: positive logit scale ``s``.
      points: [N, d] points (normalised inside: the cells are cones).
      entropic_epsilon: ``None`` for hard cells (fraction of points whose argmax is ``c``), or a
        positive temperature for soft cells (mean softmax probability of ``c``).

    Returns:
      [C] cell masses, summing to one.

    Raises:
      ValueError: on mismatched shapes or a non-positive ``scale`` / ``entropic_epsilon``.
    """
    _check_shapes(class_weights, potential)
    if jnp.ndim(points) != 2 or jnp.shape(points)[1] != jnp.shape(class_weights)[1]:
        raise ValueError(
            f"points must have shape [N, d] with d = {jnp.shape(class_weights)[1]} from "
            f"class_weights, got shape {jnp.shape(points)}.")
    _check_positive("scale", scale)
    if entropic_epsilon is not None:
        _check_positive("entropic_epsilon", entropic_epsilon)
    return _cell_masses(class_weights, potential, scale, points, entropic_epsilon=entropic_epsilon)


@functools.partial(jax.jit, static_argnames=("entropic_epsilon",))
def _cell_masses(class_weights, potential, scale, points, *, entropic_epsilon):
    logits = _logits(_l2_normalise(points), _l2_normalise(class_weights), potential, scale)
    return _masses_from_logits(logits, entropic_epsilon)


def _validate_solver_inputs(class_weights, target_mass, *, scale, num_samples, num_steps,
                            learning_rate, init, entropic_epsilon, source_points,
                            average_fraction, lr_decay, backend) -> None:
    _check_shapes(class_weights, target_mass, potential_name="target_mass")
    if init is not None:
        _check_shapes(class_weights, init, potential_name="init")
    _check_positive("scale", scale)
    _check_positive("learning_rate", learning_rate)
    if entropic_epsilon is not None:
        _check_positive("entropic_epsilon", entropic_epsilon)
    for name, value in (("num_samples", num_samples), ("num_steps", num_steps)):
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}.")
    if not 0.0 < average_fraction <= 1.0:
        raise ValueError(
            f"average_fraction must be in (0, 1] (1 averages all iterates, 1/num_steps keeps the "
            f"last one), got {average_fraction!r}.")
    if lr_decay not in ("cosine", "constant"):
        raise ValueError(f"lr_decay must be 'cosine' or 'constant', got {lr_decay!r}.")
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}; allowed values: {BACKENDS}.")
    nu = _concrete(target_mass)
    if nu is not None:
        if np.any(nu < 0) or abs(float(np.sum(nu, dtype=np.float64)) - 1.0) > _SIMPLEX_ATOL:
            raise ValueError(
                "target_mass must be a distribution over the C classes (entries >= 0 summing "
                f"to 1), got entries in [{nu.min():.4g}, {nu.max():.4g}] summing to "
                f"{nu.sum():.6g}.")
        if backend == "ott" and np.any(nu <= 0):
            raise ValueError(
                "backend='ott' needs strictly positive target_mass (ott weighs soft cells by "
                f"log nu), got min {nu.min():.4g}; use backend='native'.")
    if source_points is not None:
        if backend == "ott":
            raise ValueError(
                "backend='ott' samples mu itself; source_points needs backend='native'.")
        dim = jnp.shape(class_weights)[1]
        if jnp.ndim(source_points) != 2 or jnp.shape(source_points)[1] != dim:
            raise ValueError(
                f"source_points must have shape [N, d] with d = {jnp.shape(class_weights)[1]} from "
                f"class_weights, got shape {jnp.shape(source_points)}.")


def _schedule(learning_rate, num_steps: int, lr_decay: str) -> optax.Schedule:
    if lr_decay == "constant":
        return optax.constant_schedule(learning_rate)
    return optax.cosine_decay_schedule(learning_rate, decay_steps=num_steps, alpha=0.01)


def semidiscrete_potential(
    class_weights: jax.Array,
    target_mass: jax.Array,
    *,
    scale,
    rng: jax.Array,
    num_samples: int = 4096,
    num_steps: int = 100,
    learning_rate=0.1,
    init: jax.Array | None = None,
    entropic_epsilon: float | None = None,
    source_points: jax.Array | None = None,
    lr_decay: Literal["constant", "cosine"] = "constant",
    average_fraction: float = 0.5,
    backend: Literal["native", "ott"] = "native",
) -> PotentialOutput:
    """Heights ``h`` whose cosine-classifier cells carry the target masses (semi-discrete OT).

    Minimises ``E(h) = E_{x~mu}[max_c (s<w_c, x> + h_c)] - <nu, h>`` (or its entropic version) by
    stochastic dual descent with Adam; see the module docstring for the method.

    Args:
      class_weights: [C, d] class weights ``w`` (normalised inside: a cosine classifier).
      target_mass: [C] target masses ``nu``, a distribution (entries >= 0 summing to 1). A zero
        mass pushes its height down without bound (the cell must vanish): avoid it.
      scale: positive logit scale ``s`` (a Python float or a traced scalar, e.g. under ``vmap``).
      rng: PRNG key; step ``t`` samples with ``jax.random.fold_in(rng, t)``.
      num_samples: Monte-Carlo points per step (ignored with ``source_points``).
      num_steps: number of dual steps (fixed: no early stop).
      learning_rate: Adam's initial learning rate, in logit units: after the first step every
        ``h_c`` has moved by about ``learning_rate`` (Adam normalises the step). Cold start: 0.1
        with 100+ steps; warm start every training step: 0.01 to 0.03 with 1 to 10 steps.
      init: [C] optional warm start, e.g. the previous training step's potential.
      entropic_epsilon: ``None`` for hard cells (the exact semi-discrete OT), or a positive
        temperature for soft cells: masses are mean softmax probabilities of the logits / eps.
      source_points: optional [N, d] points defining ``mu`` as their empirical measure (normalised
        inside), used in full at every step, instead of the uniform measure on the sphere.
      lr_decay: ``"constant"`` learning rate, or ``"cosine"``: anneal it to 1 % over ``num_steps``.
      average_fraction: return the average of the last ``ceil(average_fraction * num_steps)``
        iterates (Polyak tail averaging); ``1 / num_steps`` returns the last iterate.
      backend: ``"native"`` (this module) or ``"ott"`` (ott-jax's ``SemidiscreteSolver``; no
        ``source_points``, positive ``target_mass``, an exponential moving average of the iterates
        instead of ``average_fraction``).

    Returns:
      A :class:`PotentialOutput`: the potential ``h`` and its cell masses, mass error and
      energy, measured on a fresh sample (``fold_in(rng, num_steps)``) of ``num_samples``
      points, or on ``source_points`` (under ``jit``, unused diagnostics cost nothing).

    Raises:
      ValueError: on mismatched shapes, a non-distribution ``target_mass`` (checked when
        concrete), non-positive ``scale`` / ``learning_rate`` / ``entropic_epsilon``, or
        ``num_samples`` / ``num_steps`` < 1.
    """
    _validate_solver_inputs(
        class_weights, target_mass, scale=scale, num_samples=num_samples, num_steps=num_steps,
        learning_rate=learning_rate, init=init, entropic_epsilon=entropic_epsilon,
        source_points=source_points, average_fraction=average_fraction, lr_decay=lr_decay,
        backend=backend)
    num_classes = jnp.shape(class_weights)[0]
    init = jnp.zeros((num_classes,), jnp.float32) if init is None else init
    return _solve(
        jnp.asarray(class_weights, jnp.float32), jnp.asarray(target_mass, jnp.float32),
        jnp.asarray(init, jnp.float32), scale, rng,
        None if source_points is None else jnp.asarray(source_points, jnp.float32),
        learning_rate, num_samples=num_samples, num_steps=num_steps,
        entropic_epsilon=entropic_epsilon, lr_decay=lr_decay, average_fraction=average_fraction,
        backend=backend)


def update_potential(
    potential: jax.Array,
    class_weights: jax.Array,
    target_mass: jax.Array,
    *,
    scale,
    rng: jax.Array,
    num_samples: int = 1024,
    num_steps: int = 5,
    learning_rate=0.02,
    entropic_epsilon: float | None = None,
    backend: Literal["native", "ott"] = "native",
) -> jax.Array:
    """The "dynamic" re-solve: a few dual steps from the previous heights after the weights moved.

    OT-dynamic softmax calls this after each optimizer step (or every k steps): the optimum
    moves little between two steps, so a warm start with a small learning rate and a handful of
    Monte-Carlo steps tracks it (see the module docstring for why the rate must be small). The
    same as :func:`semidiscrete_potential` with ``init=potential``.

    Args:
      potential: [C] the current heights (the warm start).
      class_weights: [C, d] the classifier's weights after the update.
      target_mass: [C] the cell masses to keep.
      scale, rng, num_samples, num_steps, learning_rate, entropic_epsilon, backend: as in
        :func:`semidiscrete_potential` (``entropic_epsilon`` 0 or None: hard cells).

    Returns:
      [C] the new heights (mean zero).
    """
    return semidiscrete_potential(
        class_weights, target_mass, scale=scale, rng=rng, num_samples=num_samples,
        num_steps=num_steps, learning_rate=learning_rate, init=potential,
        entropic_epsilon=entropic_epsilon or None, backend=backend).potential


# Jitted once per static configuration, so eager calls (tests, notebooks) hit the compile cache;
# under an outer jit it is simply inlined.
@functools.partial(
    jax.jit, static_argnames=("num_samples", "num_steps", "entropic_epsilon", "lr_decay",
                              "average_fraction", "backend"))
def _solve(class_weights, nu, init, scale, rng, source_points, learning_rate, *, num_samples,
           num_steps, entropic_epsilon, lr_decay, average_fraction, backend):
    dim = class_weights.shape[1]
    unit_weights = _l2_normalise(class_weights)
    h0 = init - jnp.mean(init)
    if source_points is not None:
        # Given points: the scores s<w_c, x> are the same at every step; compute them once.
        fixed_scores = scale * _l2_normalise(source_points) @ unit_weights.T

    def scores_at(step):
        """[N, C] scores s<w_c, x> of the step's points (without the heights)."""
        if source_points is not None:
            return fixed_scores
        points = sample_unit_sphere(jax.random.fold_in(rng, step), num_samples, dim)
        return scale * points @ unit_weights.T

    if backend == "ott":
        potential = _solve_ott(unit_weights, nu, scale=scale, rng=rng, num_samples=num_samples,
                               num_steps=num_steps, init=h0, learning_rate=learning_rate,
                               lr_decay=lr_decay, entropic_epsilon=entropic_epsilon)
    else:
        potential = _solve_jax(nu, scores_at=scores_at, num_steps=num_steps, init=h0,
                               learning_rate=learning_rate, lr_decay=lr_decay,
                               entropic_epsilon=entropic_epsilon, average_fraction=average_fraction)
    logits = scores_at(num_steps) + potential
    mass = _masses_from_logits(logits, entropic_epsilon)
    return PotentialOutput(
        potential=potential, cell_mass=mass, mass_error=jnp.max(jnp.abs(mass - nu)),
        energy=_energy_from_logits(logits, nu, potential, entropic_epsilon))


def _solve_jax(nu, *, scores_at, num_steps, init, learning_rate, lr_decay, entropic_epsilon,
               average_fraction):
    optimizer = optax.adam(_schedule(learning_rate, num_steps, lr_decay))
    # The tolerance keeps e.g. 0.1 * 10 = 1.0000000000000002 at one iterate, not two.
    num_averaged = max(1, int(np.ceil(average_fraction * num_steps - 1e-9)))
    first_averaged = num_steps - num_averaged

    def step(carry, t):
        h, opt_state, h_sum = carry
        logits = scores_at(t) + h
        grad = _masses_from_logits(logits, entropic_epsilon) - nu
        updates, opt_state = optimizer.update(grad, opt_state, h)
        h = optax.apply_updates(h, updates)
        h = h - jnp.mean(h)
        h_sum = h_sum + jnp.where(t >= first_averaged, h, 0.0)
        return (h, opt_state, h_sum), None

    carry = (init, optimizer.init(init), jnp.zeros_like(init))
    (_, _, h_sum), _ = jax.lax.scan(step, carry, jnp.arange(num_steps))
    return h_sum / num_averaged


def _solve_ott(unit_weights, nu, *, scale, rng, num_samples, num_steps, init, learning_rate,
               lr_decay, entropic_epsilon):
    # Imported here: ott pulls in jaxopt and friends, which only this backend needs.
    from ott.geometry import costs, semidiscrete_pointcloud
    from ott.problems.linear import semidiscrete_linear_problem
    from ott.solvers.linear import semidiscrete

    def sampler(key, shape, dtype):
        return sample_unit_sphere(key, shape[0], shape[1], dtype)

    epsilon = 0.0 if entropic_epsilon is None else float(entropic_epsilon)
    # cost -<x, s w_c>: ott's (g_c - cost) equals our logit minus h_c.
    geom = semidiscrete_pointcloud.SemidiscretePointCloud(
        sampler, scale * unit_weights, cost_fn=costs.NegDotProduct(), epsilon=epsilon)
    problem = semidiscrete_linear_problem.SemidiscreteLinearProblem(geom, b=nu)
    log_nu = jnp.log(nu)
    solver = semidiscrete.SemidiscreteSolver(
        num_iterations=num_steps,
        batch_size=num_samples,
        optimizer=optax.adam(_schedule(learning_rate, num_steps, lr_decay)),
        # A negative threshold disables the early stop: a fixed step count, like backend="native".
        threshold=-1.0,
        error_eval_every=num_steps,
        error_num_repeats=1,
        # ott's EMA weighs the newest iterate by this factor: a window of about 10 steps, and the
        # last iterate for runs of at most 10 steps (where the EMA would still remember init).
        potential_ema=min(1.0, 10.0 / num_steps),
    )
    # ott's soft assignment is softmax((g - cost) / eps + log nu): h = g + eps log nu.
    g_init = init - epsilon * log_nu
    output = solver(rng, problem, g_init=g_init)
    potential = output.g + epsilon * log_nu
    return potential - jnp.mean(potential)
