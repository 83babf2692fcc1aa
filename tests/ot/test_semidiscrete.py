"""Tests for dsink_jax.ot.semidiscrete: closed forms, oracles, optimality and transforms."""
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize
import scipy.special

from dsink_jax.ot.semidiscrete import cell_masses
from dsink_jax.ot.semidiscrete import sample_unit_sphere
from dsink_jax.ot.semidiscrete import semidiscrete_potential
from dsink_jax.ot.semidiscrete import update_potential


def _unit(x):
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def _problem(seed, num_classes, dim, concentration=1.0):
    # NumPy draws: jax.random.dirichlet costs seconds of compilation on CPU, for test data.
    gen = np.random.default_rng(seed)
    weights = gen.standard_normal((num_classes, dim)).astype(np.float32)
    nu = gen.dirichlet(np.full(num_classes, concentration)).astype(np.float32)
    return jnp.asarray(weights), jnp.asarray(nu / nu.sum())


@functools.lru_cache(maxsize=None)
def _check_sample(seed, num_points, dim):
    """Uniform points on the sphere from NumPy: much faster than threefry for 1e5 points."""
    x = np.random.default_rng(seed).standard_normal((num_points, dim), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


# Shared solver settings, so most tests reuse one compiled solver.
_SOLVER = {"num_samples": 2048, "num_steps": 200}


def _hard_energy(weights, nu, h, scale, points):
    logits = scale * _unit(points) @ _unit(weights).T + h
    return jnp.mean(jnp.max(logits, axis=-1)) - jnp.dot(nu, h)


@pytest.mark.parametrize(
    "num_classes, dim, concentration, tol",
    [
        # Mass std of a 100k-point check sample is <= 1.6e-3; the solve adds about as much.
        (10, 16, 1.0, 0.006),
        # C = 100: masses down to ~2e-4; abs error 1e-3 to 1.7e-3 over seeds (MC floor of 2048
        # samples per step, averaged), i.e. up to ~35 % of the smallest masses: the honest
        # tolerance is absolute.
        (100, 64, 2.0, 0.003),
    ],
)
def test_solved_cells_carry_target_masses(num_classes, dim, concentration, tol):
    weights, nu = _problem(0, num_classes, dim, concentration)
    scale = 16.0
    h = semidiscrete_potential(weights, nu, scale=scale, rng=jax.random.key(1), **_SOLVER).potential
    check_points = _check_sample(2, 100_000, dim)
    mass = cell_masses(weights, h, scale=scale, points=check_points)
    np.testing.assert_allclose(mass, nu, atol=tol, rtol=0)
    assert abs(float(jnp.mean(h))) < 1e-5
    # The tolerance is meaningful: without the potential the cells are far from nu.
    mass_without = cell_masses(weights, jnp.zeros(num_classes), scale=scale, points=check_points)
    assert float(jnp.max(jnp.abs(mass_without - nu))) > 5 * tol


def test_two_antipodal_classes_match_spherical_cap_closed_form():
    # Weights w and -w: class 0's cell is the cap {<w, x> >= a} with a = -h_0 / s (h mean zero).
    # On S^{d-1}, t = <w, x> has density ~ (1 - t^2)^((d-3)/2), so for a >= 0
    # P(t >= a) = I_{1-a^2}((d-1)/2, 1/2) / 2 (regularised incomplete beta).
    cap_mass = lambda a, dim: 0.5 * scipy.special.betainc((dim - 1) / 2, 0.5, 1 - a**2)
    # The formula against Archimedes: on S^2 the cap mass is (1 - a) / 2.
    np.testing.assert_allclose(cap_mass(np.linspace(0, 1, 5), 3), (1 - np.linspace(0, 1, 5)) / 2,
                               rtol=1e-12)
    dim, scale, nu0 = 16, 5.0, 0.3
    a = scipy.optimize.brentq(lambda a: cap_mass(a, dim) - nu0, 0.0, 1.0)
    w = _unit(jnp.arange(1.0, dim + 1.0))
    h = semidiscrete_potential(jnp.stack([w, -w]), jnp.array([nu0, 1 - nu0]), scale=scale,
                               rng=jax.random.key(0), **_SOLVER).potential
    # d m_0 / d h_0 is the cap's boundary density / (2 s), ~0.3 here: a mass error of 1e-3 moves
    # h by ~0.003.
    np.testing.assert_allclose(h, [-scale * a, scale * a], atol=0.03)


def _bayes_problem(scale, num_points, seed):
    num_classes, dim = 10, 16
    weights = _unit(jnp.asarray(np.random.default_rng(seed).standard_normal((num_classes, dim)),
                                jnp.float32))
    prior = jnp.exp(-jnp.arange(num_classes) / (num_classes - 1) * jnp.log(20.0))  # Ratio 20.
    log_prior = jnp.log(prior / prior.sum())
    log_prior -= log_prior.mean()
    points = jnp.asarray(_check_sample(seed + 100, num_points, dim))
    # Bayes-consistent logits s<w_c, x> + log prior_c: their mean posterior is the target; the
    # entropic (eps = 1) energy is strictly convex modulo constants, so log prior is THE answer.
    nu = jnp.mean(jax.nn.softmax(scale * points @ weights.T + log_prior, axis=-1), axis=0)
    return weights, nu, log_prior, points


def test_entropic_potential_of_bayes_consistent_logits_is_log_prior_on_given_points():
    weights, nu, log_prior, points = _bayes_problem(10.0, 2048, seed=0)
    info = semidiscrete_potential(weights, nu, scale=10.0, rng=jax.random.key(1),
                                     entropic_epsilon=1.0, source_points=points,
                                     **_SOLVER)
    h = info.potential
    np.testing.assert_allclose(h, log_prior, atol=0.02)
    assert float(info.mass_error) < 1e-3
    # The other options reach the same answer: cosine decay, last iterate (no averaging).
    h_cosine = semidiscrete_potential(weights, nu, scale=10.0, rng=jax.random.key(1),
                                      entropic_epsilon=1.0, source_points=points,
                                      lr_decay="cosine", average_fraction=1 / 200, **_SOLVER).potential
    np.testing.assert_allclose(h_cosine, log_prior, atol=0.02)
    # Not vacuous: the hard-cell potential for the same masses is a different vector.
    h_hard = semidiscrete_potential(weights, nu, scale=10.0, rng=jax.random.key(1),
                                       source_points=points, **_SOLVER).potential
    assert float(jnp.max(jnp.abs(h_hard - log_prior))) > 0.1


@pytest.mark.parametrize("backend", ["native", "ott"])
def test_entropic_potential_of_bayes_consistent_logits_is_log_prior_on_the_sphere(backend):
    # mu = uniform on the sphere, sampled afresh each step; nu from 200k points (std < 1e-3).
    weights, nu, log_prior, _ = _bayes_problem(4.0, 200_000, seed=0)
    h = semidiscrete_potential(weights, nu, scale=4.0, rng=jax.random.key(1),
                               entropic_epsilon=1.0, backend=backend, **_SOLVER).potential
    np.testing.assert_allclose(h, log_prior, atol=0.02)


def test_ott_backend_agrees_with_native_backend_on_hard_cells():
    weights, nu = _problem(3, 10, 16, concentration=3.0)
    solve = lambda backend: semidiscrete_potential(
        weights, nu, scale=10.0, rng=jax.random.key(4), backend=backend, **_SOLVER).potential
    h_native, h_ott = solve("native"), solve("ott")
    # Both are noisy estimates (ott averages ~10 iterates by EMA, ours 100): over 4 seeds they
    # differed by at most 0.05, on heights spanning several logits.
    np.testing.assert_allclose(h_native, h_ott, atol=0.1)
    assert float(jnp.max(h_native) - jnp.min(h_native)) > 1.0
    check_points = _check_sample(2, 100_000, 16)  # Shared with the test above (cached).
    np.testing.assert_allclose(cell_masses(weights, h_ott, scale=10.0, points=check_points), nu,
                               atol=0.01)  # Observed 0.002 to 0.005 over 4 seeds.


def test_solution_minimises_the_energy_and_info_is_consistent():
    # Hard cells on given points (the same compiled solver as the Bayes test's hard solve).
    weights, nu, _, points = _bayes_problem(10.0, 2048, seed=0)
    info = semidiscrete_potential(weights, nu, scale=10.0, rng=jax.random.key(7),
                                     source_points=points, **_SOLVER)
    h = info.potential
    energy = _hard_energy(weights, nu, h, 10.0, points)
    np.testing.assert_allclose(info.energy, energy, rtol=1e-5)
    np.testing.assert_allclose(info.cell_mass, cell_masses(weights, h, scale=10.0, points=points))
    np.testing.assert_allclose(info.mass_error, jnp.max(jnp.abs(info.cell_mass - nu)), rtol=1e-5)
    # Convexity + (near) zero subgradient: no perturbation lowers the energy by more than the
    # residual mass error allows.
    deltas = 0.3 * jnp.asarray(np.random.default_rng(8).standard_normal((64, 10)), jnp.float32)
    perturbed = jax.jit(jax.vmap(lambda d: _hard_energy(weights, nu, h + d, 10.0, points)))(deltas)
    slack = float(info.mass_error) * jnp.sum(jnp.abs(deltas), axis=1)
    assert bool(jnp.all(perturbed >= energy - slack - 1e-5))
    assert float(info.mass_error) < 0.01


def test_entropic_masses_are_the_gradient_of_the_entropic_energy():
    weights, nu = _problem(9, 5, 16)
    points = sample_unit_sphere(jax.random.key(10), 64, 16)
    eps, scale = 0.5, 6.0

    def energy(h):
        logits = scale * points @ _unit(weights).T + h
        return jnp.mean(eps * jax.nn.logsumexp(logits / eps, axis=-1)) - jnp.dot(nu, h)

    h = jnp.array([0.5, -1.0, 0.2, 0.0, 0.3])
    grad = cell_masses(weights, h, scale=scale, points=points, entropic_epsilon=eps) - nu
    np.testing.assert_allclose(jax.jit(jax.grad(energy))(h), grad, atol=1e-6)
    # Finite differences of the energy confirm the autodiff gradient used above.
    jax.test_util.check_grads(jax.jit(energy), (h,), order=1, modes=["rev"], atol=1e-2, rtol=1e-2)


def test_hard_cell_masses_match_a_numpy_count():
    weights, _ = _problem(12, 4, 3)
    points = np.random.default_rng(13).standard_normal((50, 3)).astype(np.float32)
    h = jnp.array([0.3, -0.2, 0.0, 0.1])
    mass = cell_masses(weights, h, scale=2.0, points=7.0 * points)  # Point norms are ignored.
    w = np.asarray(_unit(weights))
    unit_points = points / np.linalg.norm(points, axis=1, keepdims=True)
    counts = np.bincount(np.argmax(2.0 * unit_points @ w.T + np.asarray(h), axis=1), minlength=4)
    np.testing.assert_allclose(mass, counts / 50, atol=1e-7)


def test_jit_and_vmap_over_masses_and_scale_match_single_solves_without_retracing():
    weights, _ = _problem(14, 5, 16)
    nus = jnp.asarray(np.random.default_rng(15).dirichlet(np.ones(5), 3), jnp.float32)
    scales = jnp.array([4.0, 8.0, 16.0])

    @jax.jit
    @chex.assert_max_traces(n=1)
    def solve(nu, scale, init):
        return semidiscrete_potential(weights, nu, scale=scale, rng=jax.random.key(16),
                                      num_samples=256, num_steps=10, init=init).potential

    init = jnp.zeros(5)
    batched = jax.jit(jax.vmap(solve, in_axes=(0, 0, None)))(nus, scales, init)
    # vmap batches the jaxpr traced at per-example shapes, which these calls reuse: new scales,
    # masses and warm starts do not retrace (assert_max_traces would raise).
    singles = jnp.stack([solve(nus[i], scales[i], init) for i in range(3)])
    np.testing.assert_allclose(batched, singles, atol=1e-4)
    solve(nus[0], scales[0] + 1.0, singles[0])  # A strongly typed scalar, like scales[i].
    chex.assert_shape(batched, (3, 5))
    # Different targets give different potentials (the vmap really maps).
    assert float(jnp.max(jnp.abs(batched[0] - batched[1]))) > 0.1


def test_warm_start_stays_near_the_solution():
    weights, nu = _problem(18, 100, 64, concentration=2.0)
    scale = 16.0
    h_star = semidiscrete_potential(weights, nu, scale=scale, rng=jax.random.key(19), **_SOLVER).potential
    check_points = _check_sample(2, 100_000, 64)  # Shared with the test above (cached).
    error = lambda h: float(jnp.max(jnp.abs(cell_masses(weights, h, scale=scale,
                                                        points=check_points) - nu)))
    warm = lambda init: semidiscrete_potential(weights, nu, scale=scale, rng=jax.random.key(21),
                                               num_samples=1024, num_steps=5, learning_rate=0.01,
                                               init=init).potential
    h_warm = warm(h_star + 7.0)  # A constant shift is no change: h is defined up to constants.
    # Adam moves each height by about the learning rate per step: 5 x 0.01 (observed 0.04).
    assert float(jnp.max(jnp.abs(h_warm - h_star))) < 0.06
    assert error(h_warm) < error(h_star) + 0.002
    assert error(warm(jnp.zeros(100))) > 5 * error(h_warm)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"scale": 0.0}, "scale must be > 0"),
        ({"scale": -1.0}, "scale must be > 0"),
        ({"target_mass": jnp.array([0.5, 0.3, 0.1])}, "summing to 0.9"),
        ({"target_mass": jnp.array([1.2, -0.1, -0.1])}, "entries >= 0"),
        ({"target_mass": jnp.array([0.5, 0.5])}, r"target_mass must have shape \[C\] = \(3,\)"),
        ({"class_weights": jnp.ones((3,))}, r"class_weights must have shape \[C, d\]"),
        ({"init": jnp.zeros(4)}, r"init must have shape \[C\]"),
        ({"num_samples": 0}, "num_samples must be an integer >= 1, got 0"),
        ({"num_steps": 0}, "num_steps must be an integer >= 1, got 0"),
        ({"num_steps": 2.5}, "num_steps must be an integer >= 1, got 2.5"),
        ({"learning_rate": 0.0}, "learning_rate must be > 0"),
        ({"entropic_epsilon": 0.0}, "entropic_epsilon must be > 0"),
        ({"average_fraction": 0.0}, r"average_fraction must be in \(0, 1\]"),
        ({"lr_decay": "linear"}, "lr_decay must be 'cosine' or 'constant', got 'linear'"),
        ({"backend": "pot"}, "backend='pot'; allowed values: \\('native', 'ott'\\)"),
        ({"source_points": jnp.ones((5, 4))},
         r"source_points must have shape \[N, d\] with d = 2"),
        ({"backend": "ott", "source_points": jnp.ones((5, 2))},
         "source_points needs backend='native'"),
        ({"backend": "ott", "target_mass": jnp.array([0.5, 0.5, 0.0])}, "strictly positive"),
    ],
)
def test_bad_inputs_raise_before_work(kwargs, match):
    args = {"class_weights": jnp.eye(3, 2), "target_mass": jnp.full((3,), 1 / 3),
            "scale": 1.0, "rng": jax.random.key(0)}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        semidiscrete_potential(args.pop("class_weights"), args.pop("target_mass"), **args).potential


def test_cell_masses_bad_inputs_raise():
    with pytest.raises(ValueError, match=r"points must have shape \[N, d\] with d = 2"):
        cell_masses(jnp.eye(3, 2), jnp.zeros(3), scale=1.0, points=jnp.ones((4, 3)))
    with pytest.raises(ValueError, match="scale must be > 0"):
        cell_masses(jnp.eye(3, 2), jnp.zeros(3), scale=-2.0, points=jnp.ones((4, 2)))
    with pytest.raises(ValueError, match=r"potential must have shape \[C\] = \(3,\)"):
        cell_masses(jnp.eye(3, 2), jnp.zeros(2), scale=1.0, points=jnp.ones((4, 2)))


def test_update_potential_is_the_warm_started_solve_and_tracks_moved_weights():
    weights, nu = _problem(5, 10, 16, concentration=3.0)
    h0 = semidiscrete_potential(weights, nu, scale=10.0, rng=jax.random.key(0), **_SOLVER).potential
    moved = weights + 0.05 * jax.random.normal(jax.random.key(9), weights.shape)
    h1 = update_potential(h0, moved, nu, scale=10.0, rng=jax.random.key(2), num_samples=2048,
                          num_steps=20, learning_rate=0.02)
    direct = semidiscrete_potential(moved, nu, scale=10.0, rng=jax.random.key(2),
                                    num_samples=2048, num_steps=20, learning_rate=0.02, init=h0).potential
    np.testing.assert_array_equal(h1, direct)
    points = _check_sample(7, 100_000, 16)
    error = lambda h: float(jnp.max(jnp.abs(cell_masses(moved, h, scale=10.0, points=points) - nu)))
    assert error(h1) < error(h0)  # the re-solve follows the weights
