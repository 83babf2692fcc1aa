"""Tests of the D-SINK Sinkhorn allocation against closed forms and oracles."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import ot as pot
import pytest
import scipy.optimize
import scipy.special

from dsink_jax.ot.sinkhorn import (KERNEL_LOG_FLOOR, SINKHORN_MODES, SinkhornOutput,
                                   allocation_from_potential, class_potential_step,
                                   sinkhorn_allocation)

BACKENDS = ("native", "ott")


def _problem(seed, batch_size=12, num_classes=4, scale=2.0):
    """Random log-probabilities of f_N and f, and a class mass."""
    k_noise, k_student, k_mass = jax.random.split(jax.random.key(seed), 3)
    noise = jax.nn.log_softmax(
        scale * jax.random.normal(k_noise, (batch_size, num_classes)))
    student = jax.nn.log_softmax(
        scale * jax.random.normal(k_student, (batch_size, num_classes)))
    mass = jax.nn.softmax(jax.random.normal(k_mass, (num_classes,)))
    return noise, student, mass


def _dual_oracle(noise, student, mass, epsilon):
    """Q from minimising the convex dual over g with Newton steps in float64.

    The row constraint is eliminated in closed form (q_i = softmax(S_i + g)),
    leaving F(g) = sum_i logsumexp(S_i + g) - B <m, g> (+ a penalty on mean(g),
    which F does not see), whose gradient is the column-marginal violation.
    """
    scores = (np.asarray(noise, np.float64) + np.asarray(student, np.float64))
    scores /= epsilon
    mass = np.asarray(mass, np.float64)
    batch_size, num_classes = scores.shape

    def objective(g):
        value = scipy.special.logsumexp(scores + g, axis=1).sum()
        return value - batch_size * mass @ g + 0.5 * g.mean() ** 2

    def gradient(g):
        probs = scipy.special.softmax(scores + g, axis=1)
        return probs.sum(0) - batch_size * mass + g.mean() / num_classes

    def hessian(g):
        probs = scipy.special.softmax(scores + g, axis=1)
        return (np.diag(probs.sum(0)) - probs.T @ probs
                + np.full((num_classes, num_classes), 1 / num_classes ** 2))

    result = scipy.optimize.minimize(
        objective, np.zeros(num_classes), jac=gradient, hess=hessian,
        method="trust-exact", options={"gtol": 1e-12})
    # Column sums within 1e-6 of B m: the float64 floor of this objective.
    assert np.max(np.abs(gradient(result.x))) < 1e-6, result.message
    return scipy.special.softmax(scores + result.x, axis=1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_marginals_after_convergence(backend):
    noise, student, mass = _problem(0)
    info = sinkhorn_allocation(noise, student, mass, num_iters=300,
                                  backend=backend)
    q = info.allocation
    chex.assert_shape(q, (12, 4))
    assert q.dtype == jnp.float32
    assert isinstance(info, SinkhornOutput)
    np.testing.assert_allclose(q.sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(q.sum(axis=0), 12 * mass, atol=1e-4)
    assert np.all(np.asarray(q) >= 0)
    # The reported errors are the measured ones.
    np.testing.assert_allclose(
        info.column_error, np.max(np.abs(q.sum(0) - 12 * mass)) / 12, atol=1e-7)
    np.testing.assert_allclose(
        info.row_error, np.max(np.abs(q.sum(1) - 1)), atol=1e-7)
    assert info.column_error < 1e-5


def test_column_error_reports_non_convergence():
    # One iteration on a peaked problem leaves a visible class-mass violation;
    # the info must say so (it is the only marginal that carries the residual).
    noise, student, mass = _problem(1, scale=4.0)
    info = sinkhorn_allocation(noise, student, mass, num_iters=1)
    q = info.allocation
    measured = np.max(np.abs(np.asarray(q).sum(0) - 12 * np.asarray(mass))) / 12
    assert measured > 1e-3
    np.testing.assert_allclose(info.column_error, measured, rtol=1e-5)
    np.testing.assert_allclose(q.sum(axis=1), 1.0, atol=1e-6)


def test_one_iteration_by_hand():
    # native = exactly num_iters (column, row) updates from zero potentials:
    # after one, Q = row_normalise(K * B m / colsum(K)), K = exp(-P / eps).
    noise, student, mass = _problem(2)
    epsilon = 1.5
    kernel = np.exp((np.asarray(noise, np.float64) + np.asarray(student)) /
                    epsilon)
    scaled = kernel * 12 * np.asarray(mass) / kernel.sum(0)
    expected = scaled / scaled.sum(1, keepdims=True)
    for backend in BACKENDS:
        q = sinkhorn_allocation(noise, student, mass, epsilon=epsilon,
                                   num_iters=1, backend=backend).allocation
        np.testing.assert_allclose(q, expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("epsilon", [0.5, 2.0, 5.0])
def test_closed_form_softmax_with_class_potential(epsilon):
    # docs/method.md: q_i = softmax((z^N_i + z_i) / epsilon + g); at epsilon = 2 it is
    # softmax(z^N/2 + z/2 + g), the class-shifted geometric mean.
    noise, student, mass = _problem(3)
    info = sinkhorn_allocation(noise, student, mass, epsilon=epsilon,
                                  num_iters=300)
    q = info.allocation
    expected = jax.nn.softmax((noise + student) / epsilon + info.potential)
    np.testing.assert_allclose(q, expected, atol=2e-6)
    np.testing.assert_allclose(jnp.mean(info.potential), 0.0, atol=1e-5)
    # g is the unique (up to a constant) potential: the dual oracle's Q matches.
    np.testing.assert_allclose(q, _dual_oracle(noise, student, mass, epsilon),
                               atol=1e-5)


def test_geometric_mean_when_class_mass_already_matches():
    # If m equals the batch mean of softmax((z^N + z)/2), no shift is needed:
    # g = 0 and Q = softmax(z^N/2 + z/2), i.e. row-normalised sqrt(f_N * f).
    noise, student, _ = _problem(4)
    geometric = np.sqrt(np.exp(np.asarray(noise, np.float64) +
                               np.asarray(student)))
    geometric /= geometric.sum(1, keepdims=True)
    mass = geometric.mean(0)
    info = sinkhorn_allocation(noise, student, mass, num_iters=300)
    q = info.allocation
    np.testing.assert_allclose(q, geometric, atol=1e-6)
    np.testing.assert_allclose(info.potential, 0.0, atol=1e-5)


@pytest.mark.parametrize("epsilon", [1.0, 2.0])
def test_pot_oracle(epsilon):
    noise, student, mass = _problem(5)
    cost = -(np.asarray(noise, np.float64) + np.asarray(student, np.float64))
    plan = pot.sinkhorn(np.full(12, 1 / 12), np.asarray(mass, np.float64), cost,
                        reg=epsilon, numItermax=5000, stopThr=1e-10, warn=False)
    for backend in BACKENDS:
        q = sinkhorn_allocation(noise, student, mass, epsilon=epsilon,
                                   num_iters=300, backend=backend).allocation
        np.testing.assert_allclose(q, 12 * plan, atol=1e-5)


def test_constrained_primal_optimiser_oracle():
    # The D-SINK inner problem as stated: min sum_i KL(q_i||f_N) + KL(q_i||f)
    # s.t. rows sum to 1 and columns to B m, solved by SLSQP on a 6x3 problem.
    noise, student, mass = _problem(6, batch_size=6, num_classes=3, scale=1.0)
    log_noise = np.asarray(noise, np.float64)
    log_student = np.asarray(student, np.float64)
    mass = np.asarray(mass, np.float64)

    def objective(flat):
        q = np.clip(flat.reshape(6, 3), 1e-300, None)
        value = np.sum(q * (2 * np.log(q) - log_noise - log_student))
        grad = 2 * np.log(q) + 2 - log_noise - log_student
        return value, grad.ravel()

    constraints = [
        {"type": "eq", "fun": lambda x: x.reshape(6, 3).sum(1) - 1.0},
        {"type": "eq", "fun": lambda x: x.reshape(6, 3).sum(0)[:-1]
                                        - 6 * mass[:-1]},
    ]
    result = scipy.optimize.minimize(
        objective, np.tile(mass, 6), jac=True, method="SLSQP",
        bounds=[(1e-12, 1.0)] * 18, constraints=constraints,
        options={"ftol": 1e-14, "maxiter": 1000})
    assert result.success, result.message
    q = sinkhorn_allocation(noise, student, mass, epsilon=2.0, num_iters=300).allocation
    np.testing.assert_allclose(q, result.x.reshape(6, 3), atol=1e-4)


@pytest.mark.parametrize("num_iters", [1, 300])
def test_backends_agree_at_every_iteration_count(num_iters):
    noise, student, mass = _problem(7)
    info_native = sinkhorn_allocation(
        noise, student, mass, epsilon=0.7, num_iters=num_iters)
    q_native = info_native.allocation
    info_ott = sinkhorn_allocation(
        noise, student, mass, epsilon=0.7, num_iters=num_iters, backend="ott")
    q_ott = info_ott.allocation
    np.testing.assert_allclose(q_native, q_ott, atol=1e-5)
    np.testing.assert_allclose(info_native.potential, info_ott.potential,
                               atol=1e-4)
    np.testing.assert_allclose(info_native.column_error, info_ott.column_error,
                               atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_mass_class_gets_empty_column(backend):
    noise, student, _ = _problem(8)
    mass = jnp.array([0.5, 0.0, 0.25, 0.25])
    info = sinkhorn_allocation(noise, student, mass, num_iters=300,
                                  backend=backend)
    q = info.allocation
    assert np.all(np.isfinite(q))
    np.testing.assert_allclose(q[:, 1], 0.0, atol=1e-7)
    np.testing.assert_allclose(q.sum(0), 12 * mass, atol=1e-4)
    assert info.potential[1] == -np.inf
    potential = np.asarray(info.potential)[[0, 2, 3]]
    np.testing.assert_allclose(potential.sum(), 0.0, atol=1e-5)


def test_no_gradient_flows_through_allocation():
    noise, student, mass = _problem(9)
    weights = jax.random.normal(jax.random.key(1), noise.shape)

    def probe(noise, student, mass, epsilon):
        return jnp.sum(weights * sinkhorn_allocation(noise, student, mass,
                                                     epsilon=epsilon, num_iters=5).allocation)

    grads = jax.grad(probe, argnums=(0, 1, 2, 3))(noise, student, mass, 2.0)
    for grad in grads:
        np.testing.assert_array_equal(grad, 0.0)


def test_bfloat16_inputs_give_float32():
    noise, student, mass = _problem(10)
    q = sinkhorn_allocation(noise.astype(jnp.bfloat16),
                            student.astype(jnp.bfloat16), mass, num_iters=20).allocation
    assert q.dtype == jnp.float32
    np.testing.assert_allclose(q.sum(1), 1.0, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_jit_matches_eager_without_retracing(backend):
    chex.clear_trace_counter()  # the counter is shared across parametrisations

    @jax.jit
    @chex.assert_max_traces(n=1)
    def solve(noise, student, mass):
        return sinkhorn_allocation(noise, student, mass, num_iters=300,
                                   backend=backend).allocation

    for seed in range(3):
        noise, student, mass = _problem(20 + seed)
        np.testing.assert_allclose(
            solve(noise, student, mass),
            sinkhorn_allocation(noise, student, mass, num_iters=300,
                                backend=backend).allocation, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_vmap_over_epsilon_equals_loop(backend):
    noise, student, mass = _problem(11)
    epsilons = jnp.array([0.5, 1.0, 2.0, 4.0])
    info = jax.vmap(
        lambda eps: sinkhorn_allocation(noise, student, mass, epsilon=eps,
                                        num_iters=300, backend=backend))(epsilons)
    batched = info.allocation
    chex.assert_shape(batched, (4, 12, 4))
    chex.assert_shape(info.potential, (4, 4))
    for k, eps in enumerate([0.5, 1.0, 2.0, 4.0]):
        np.testing.assert_allclose(
            batched[k],
            sinkhorn_allocation(noise, student, mass, epsilon=eps, num_iters=300,
                                backend=backend).allocation, atol=1e-6)
    # Different epsilons give different allocations (the sweep is not a no-op).
    assert np.max(np.abs(batched[0] - batched[3])) > 1e-2


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"epsilon": 0.0}, ValueError, r"epsilon=0.0.*>= 0.0001"),
        ({"epsilon": 1e-30}, ValueError, r"epsilon=1e-30.*>= 0.0001"),
        ({"epsilon": -1.0}, ValueError, r"epsilon=-1.0"),
        ({"epsilon": float("nan")}, ValueError, r"epsilon=nan"),
        ({"epsilon": jnp.ones(2)}, ValueError, r"epsilon has shape \(2,\)"),
        ({"num_iters": 0}, ValueError, r"num_iters=0.*>= 1"),
        ({"num_iters": 2.5}, TypeError, r"num_iters=2.5"),
        ({"num_iters": True}, TypeError, r"num_iters=True"),
        ({"backend": "pot"}, ValueError, r"backend='pot'.*native.*ott"),
        ({"mode": "scaling"}, ValueError,
         r"mode='scaling'; allowed values: \('auto', 'log', 'kernel'\)"),
        ({"mode": None}, ValueError, r"mode=None; allowed values"),
    ],
)
def test_bad_options_raise(kwargs, error, match):
    noise, student, mass = _problem(12)
    with pytest.raises(error, match=match):
        sinkhorn_allocation(noise, student, mass, **kwargs).allocation


def test_bad_arrays_raise():
    noise, student, mass = _problem(13)
    with pytest.raises(ValueError, match=r"student_log_probs has shape \(12, 3\)"):
        sinkhorn_allocation(noise, student[:, :3], mass).allocation
    with pytest.raises(ValueError, match=r"noise_log_probs has shape \(12,\)"):
        sinkhorn_allocation(noise[:, 0], student[:, 0], mass).allocation
    with pytest.raises(ValueError, match=r"class_mass has shape \(3,\).*\(4,\)"):
        sinkhorn_allocation(noise, student, mass[:3]).allocation
    with pytest.raises(ValueError, match=r"class_mass sums to 2"):
        sinkhorn_allocation(noise, student, 2 * mass).allocation
    with pytest.raises(ValueError, match=r"nonnegative"):
        sinkhorn_allocation(noise, student, jnp.array([1.5, -0.5, 0.0, 0.0])).allocation
    with pytest.raises(ValueError, match=r"noise_log_probs has a non-finite "
                                         r"entry nan at index \(2, 1\)"):
        sinkhorn_allocation(noise.at[2, 1].set(jnp.nan), student, mass).allocation
    with pytest.raises(ValueError, match=r"student_log_probs has a non-finite "
                                         r"entry -inf"):
        sinkhorn_allocation(noise, student.at[0, 0].set(-jnp.inf), mass).allocation


def test_static_checks_run_under_jit():
    # Shapes and options are checked at trace time, even for traced arrays.
    noise, student, mass = _problem(14)
    with pytest.raises(ValueError, match=r"class_mass has shape"):
        jax.jit(lambda n, s, m: sinkhorn_allocation(n, s, m).allocation)(noise, student,
                                                               mass[:2])
    with pytest.raises(ValueError, match=r"epsilon=-2.0"):
        jax.jit(lambda n, s, m: sinkhorn_allocation(n, s, m, epsilon=-2.0).allocation)(
            noise, student, mass)


# ----------------------------------------------------------------- closed form and dual ascent

def test_closed_form_with_sinkhorns_potential_is_sinkhorns_plan():
    noise, student, mass = _problem(21, batch_size=40, num_classes=5)
    info = sinkhorn_allocation(noise, student, mass, num_iters=300)
    plan = info.allocation
    closed = allocation_from_potential(noise, student, info.potential, epsilon=2.0)
    np.testing.assert_allclose(closed, plan, atol=1e-5)
    np.testing.assert_allclose(np.sum(closed, axis=1), 1.0, atol=1e-6)


def test_full_batch_potential_steps_converge_to_the_sinkhorn_allocation():
    # lr = 1 on the whole set is Sinkhorn's column update in the closed form.
    noise, student, mass = _problem(22, batch_size=60, num_classes=6)
    potential = jnp.zeros((6,))
    for _ in range(300):
        q = allocation_from_potential(noise, student, potential)
        potential = class_potential_step(potential, q, mass, learning_rate=1.0)
    q = allocation_from_potential(noise, student, potential)
    np.testing.assert_allclose(np.mean(q, axis=0), mass, atol=1e-5)
    reference = sinkhorn_allocation(noise, student, mass, num_iters=300).allocation
    np.testing.assert_allclose(q, reference, atol=1e-4)
    assert abs(float(jnp.mean(potential))) < 1e-5  # mean-centred


def test_minibatch_dual_ascent_tracks_the_dataset_marginal_not_each_batch():
    # A dataset of 2,000 samples streamed in batches of 50 with lr 0.05: the carried potential
    # approaches the dataset-level one, while single batches stay free to deviate from m.
    noise, student, mass = _problem(23, batch_size=2000, num_classes=5, scale=3.0)
    info = sinkhorn_allocation(noise, student, mass, num_iters=500)
    _ = info.allocation
    step = jax.jit(lambda g, n, s: class_potential_step(
        g, allocation_from_potential(n, s, g), mass, learning_rate=0.05))
    potential = jnp.zeros((5,))
    rng = np.random.default_rng(0)
    for _ in range(30):  # epochs
        for idx in rng.permutation(2000).reshape(-1, 50):
            potential = step(potential, noise[idx], student[idx])
    np.testing.assert_allclose(potential, info.potential, atol=0.1)
    q = allocation_from_potential(noise, student, potential)
    # Within the stochastic fluctuation of a constant step (the last batches move g a little).
    np.testing.assert_allclose(np.mean(q, axis=0), mass, atol=0.02)
    batch_error = np.max(np.abs(np.mean(q[:50], axis=0) - mass))
    assert batch_error > 0.02  # a batch is not forced to the global marginal


def test_zero_mass_class_gets_no_allocation_and_potential_stays_finite():
    noise, student, _ = _problem(24, batch_size=30, num_classes=4)
    mass = jnp.asarray([0.5, 0.3, 0.2, 0.0])
    potential = jnp.zeros((4,))
    for _ in range(50):
        potential = class_potential_step(
            potential, allocation_from_potential(noise, student, potential), mass,
            learning_rate=1.0)
    assert np.all(np.isfinite(np.asarray(potential)))
    q = allocation_from_potential(noise, student, potential)
    np.testing.assert_allclose(q[:, 3], 0.0, atol=1e-12)
    np.testing.assert_allclose(np.mean(q, axis=0)[:3], mass[:3], atol=1e-5)


def test_closed_form_and_potential_step_carry_no_gradient():
    noise, student, mass = _problem(25)

    def f(noise, student, potential):
        q = allocation_from_potential(noise, student, potential)
        return jnp.sum(q[:, 0]) + jnp.sum(class_potential_step(potential, q, mass,
                                                               learning_rate=0.5))

    grads = jax.grad(f, argnums=(0, 1, 2))(noise, student, jnp.zeros((4,)))
    for g in grads:
        np.testing.assert_array_equal(g, 0.0)


# ----------------------------------------------------------------------- masks (where)

@pytest.mark.parametrize("backend", BACKENDS)
def test_padded_rows_masked_out_leave_the_other_rows_unchanged(backend):
    noise, student, mass = _problem(30, batch_size=10, num_classes=4)
    junk = jax.nn.log_softmax(5.0 * jax.random.normal(jax.random.key(31), (6, 4)))
    padded_noise = jnp.concatenate([noise, junk])
    padded_student = jnp.concatenate([student, junk[::-1]])
    where = jnp.arange(16) < 10
    alone = sinkhorn_allocation(noise, student, mass, num_iters=300, backend=backend)
    masked = sinkhorn_allocation(padded_noise, padded_student, mass, num_iters=300,
                                 backend=backend, where=where)
    np.testing.assert_allclose(masked.allocation[:10], alone.allocation, atol=2e-6)
    np.testing.assert_array_equal(masked.allocation[10:], 0.0)
    np.testing.assert_allclose(masked.potential, alone.potential, atol=2e-5)
    np.testing.assert_allclose(masked.column_error, alone.column_error, atol=1e-6)
    # Without the mask the padding does change the real rows (the test is not vacuous).
    unmasked = sinkhorn_allocation(padded_noise, padded_student, mass, num_iters=300,
                                   backend=backend)
    assert float(jnp.max(jnp.abs(unmasked.allocation[:10] - alone.allocation))) > 1e-2


def test_a_mask_works_under_jit_and_a_bad_mask_is_refused():
    noise, student, mass = _problem(32)
    where = jnp.arange(12) < 7
    jitted = jax.jit(lambda w: sinkhorn_allocation(noise, student, mass, where=w).allocation)
    np.testing.assert_allclose(jitted(where)[:7], sinkhorn_allocation(
        noise[:7], student[:7], mass).allocation, atol=2e-6)
    with pytest.raises(ValueError, match=r"where has shape \(5,\); expected \(12,\)"):
        sinkhorn_allocation(noise, student, mass, where=where[:5])
    with pytest.raises(TypeError, match="where has dtype int32; expected bool"):
        sinkhorn_allocation(noise, student, mass, where=where.astype(jnp.int32))
    with pytest.raises(ValueError, match="masks out every row"):
        sinkhorn_allocation(noise, student, mass, where=jnp.zeros(12, bool))


def test_potential_step_ignores_masked_rows():
    noise, student, mass = _problem(33, batch_size=8)
    q = allocation_from_potential(noise, student, jnp.zeros(4))
    padded = jnp.concatenate([q, jnp.eye(4)[jnp.zeros(4, int)]])  # four rows all on class 0
    step = class_potential_step(jnp.zeros(4), q, mass, learning_rate=0.5)
    masked = class_potential_step(jnp.zeros(4), padded, mass, learning_rate=0.5,
                                  where=jnp.arange(12) < 8)
    np.testing.assert_allclose(masked, step, atol=1e-6)


# --------------------------------------------------------- solve modes: kernel, log and auto

def _solve_all_modes(noise, student, mass, **kwargs):
    return {mode: sinkhorn_allocation(noise, student, mass, mode=mode, **kwargs)
            for mode in SINKHORN_MODES}


def _guard_column_max(noise, student, epsilon, where=None):
    """Independent of the code under test: min over classes of the best row-shifted score."""
    scores = (np.asarray(noise, np.float64) + np.asarray(student, np.float64)) / epsilon
    if where is not None:
        scores = scores[np.asarray(where)]
    return (scores - scores.max(axis=1, keepdims=True)).max(axis=0).min()


def _underflowing_column_problem():
    """16 x 4, epsilon 2: class 2's kernel column exp(~-5e3) underflows in every row."""
    noise, student, mass = _problem(47, batch_size=16, num_classes=4)
    return noise.at[:, 2].set(-1e4), student, mass


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("num_iters", [1, 7, 300])
def test_kernel_mode_performs_the_log_domain_iterations(backend, num_iters):
    # Same iterations from the same start, g up to a constant (removed by the centring): the
    # same Q at every iteration count, not only after convergence.
    for seed, (batch_size, num_classes) in enumerate([(64, 10), (200, 50)]):
        noise, student, mass = _problem(40 + seed, batch_size, num_classes, scale=3.0)
        assert _guard_column_max(noise, student, 2.0) > -KERNEL_LOG_FLOOR  # well conditioned
        solved = _solve_all_modes(noise, student, mass, epsilon=2.0, num_iters=num_iters,
                                  backend=backend)
        for mode in ("kernel", "auto"):
            np.testing.assert_allclose(solved[mode].allocation, solved["log"].allocation,
                                       atol=2e-6)
            np.testing.assert_allclose(solved[mode].potential, solved["log"].potential,
                                       atol=2e-5)
            np.testing.assert_allclose(solved[mode].column_error, solved["log"].column_error,
                                       atol=1e-6)
            np.testing.assert_allclose(solved[mode].allocation.sum(1), 1.0, atol=1e-5)
    if num_iters == 300:
        assert float(solved["kernel"].column_error) < 1e-5  # converged, not just equal


@pytest.mark.parametrize("backend", BACKENDS)
def test_kernel_mode_pot_oracle(backend):
    noise, student, mass = _problem(42, batch_size=64, num_classes=10, scale=3.0)
    cost = -(np.asarray(noise, np.float64) + np.asarray(student, np.float64))
    plan = pot.sinkhorn(np.full(64, 1 / 64), np.asarray(mass, np.float64), cost, reg=2.0,
                        numItermax=10000, stopThr=1e-12, warn=False)
    for mode in ("kernel", "auto"):
        q = sinkhorn_allocation(noise, student, mass, epsilon=2.0, num_iters=500,
                                backend=backend, mode=mode).allocation
        np.testing.assert_allclose(q, 64 * plan, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("num_iters", [1, 300])
def test_kernel_mode_padded_rows_masked_out_leave_the_other_rows_unchanged(backend, num_iters):
    noise, student, mass = _problem(43, batch_size=10, num_classes=4)
    # Padding is garbage: rows far above every real row (were they counted in the initial row
    # scaling, the real rows would start clamped and iteration 1 would differ) and rows far
    # below (were they counted in the row shift or the kernel, the columns would change).
    junk = jnp.concatenate([jnp.full((3, 4), 100.0), jnp.full((3, 4), -1e4).at[:, 1].set(0.0)])
    where = jnp.arange(16) < 10
    alone = sinkhorn_allocation(noise, student, mass, num_iters=num_iters, backend=backend,
                                mode="log")
    for mode in ("kernel", "auto"):
        masked = sinkhorn_allocation(jnp.concatenate([noise, junk]),
                                     jnp.concatenate([student, junk[::-1]]), mass,
                                     num_iters=num_iters, backend=backend, where=where,
                                     mode=mode)
        np.testing.assert_allclose(masked.allocation[:10], alone.allocation, atol=2e-6)
        np.testing.assert_array_equal(masked.allocation[10:], 0.0)
        np.testing.assert_allclose(masked.potential, alone.potential, atol=2e-5)
        np.testing.assert_allclose(masked.column_error, alone.column_error, atol=1e-6)
        np.testing.assert_allclose(masked.row_error, alone.row_error, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["column_underflows", "tiny_epsilon"])
def test_auto_falls_back_to_log_where_a_kernel_column_underflows(backend, case):
    if case == "column_underflows":
        (noise, student, mass), epsilon = _underflowing_column_problem(), 2.0
    else:
        noise, student, mass = _problem(44, batch_size=16, num_classes=4)
        # Class 3 is nobody's best class, by at least 0.5: at epsilon 1e-3 its best shifted
        # score is <= -500.
        noise = noise.at[:, 3].set(jnp.min(noise + student, axis=1) - 0.5 - student[:, 3])
        epsilon = 1e-3
    assert _guard_column_max(noise, student, epsilon) < -KERNEL_LOG_FLOOR  # the guard refuses
    solved = _solve_all_modes(noise, student, mass, epsilon=epsilon, num_iters=50,
                              backend=backend)
    # "auto" ran the log-domain solve: exactly its result, finite.
    for field in SinkhornOutput._fields:
        np.testing.assert_array_equal(getattr(solved["auto"], field),
                                      getattr(solved["log"], field), err_msg=field)
    assert np.all(np.isfinite(solved["auto"].allocation))
    assert np.all(np.isfinite(solved["auto"].potential))
    np.testing.assert_allclose(solved["auto"].allocation.sum(1), 1.0, atol=1e-5)
    # The forced kernel solve overflows; its check turns every field to NaN (not a wrong Q).
    for field in SinkhornOutput._fields:
        assert np.all(np.isnan(getattr(solved["kernel"], field))), field


def _overflowing_past_the_guard_problem():
    """8 x 3, epsilon 2: every class has a kernel entry of 1 (the guard passes), but class 0
    has mass 1e-25 and rows 0-3 are ~40 nats closer to it than to the others: in the scaling
    domain class 0's scaling underflows, while the log domain solves it."""
    logits = np.random.default_rng(0).normal(size=(8, 3))
    logits[:4, 0] += 40.0
    noise = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32))
    mass = np.array([1e-25, 0.5, 0.5])
    return noise, noise, jnp.asarray(mass / mass.sum(), jnp.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_auto_falls_back_to_log_when_the_kernel_solve_fails_past_the_guard(backend):
    noise, student, mass = _overflowing_past_the_guard_problem()
    assert _guard_column_max(noise, student, 2.0) >= -KERNEL_LOG_FLOOR  # the guard passes
    solved = _solve_all_modes(noise, student, mass, epsilon=2.0, num_iters=50,
                              backend=backend)
    assert np.all(np.isnan(solved["kernel"].allocation))  # the kernel solve did fail
    for field in SinkhornOutput._fields:
        np.testing.assert_array_equal(getattr(solved["auto"], field),
                                      getattr(solved["log"], field), err_msg=field)
    assert np.all(np.isfinite(solved["auto"].allocation))
    assert float(solved["auto"].column_error) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_auto_chooses_per_problem_under_jit_and_vmap(backend):
    # Traced inputs: the choice is lax.cond on the data. Under vmap the predicate is batched,
    # cond becomes a select, both solves run, and each problem still gets its own result.
    good = _problem(48, batch_size=16, num_classes=4)
    bad = _underflowing_column_problem()
    solve = jax.jit(lambda n, s, m: sinkhorn_allocation(n, s, m, num_iters=50,
                                                        backend=backend))  # mode="auto"
    forced = jax.jit(lambda n, s, m: sinkhorn_allocation(n, s, m, num_iters=50,
                                                         backend=backend, mode="kernel"))
    logs = [sinkhorn_allocation(*p, num_iters=50, backend=backend, mode="log")
            for p in (good, bad)]
    stacked = jax.tree.map(lambda *x: jnp.stack(x), good, bad)
    batched = jax.vmap(solve)(*stacked)
    for k, problem in enumerate((good, bad)):
        for out in (solve(*problem), jax.tree.map(lambda x, k=k: x[k], batched)):
            np.testing.assert_allclose(out.allocation, logs[k].allocation, atol=2e-6)
            np.testing.assert_allclose(out.potential, logs[k].potential, atol=2e-5)
            assert np.all(np.isfinite(out.allocation))
    # The batched forced kernel fails on the bad problem only: the vmapped auto had to choose.
    batched_kernel = jax.vmap(forced)(*stacked)
    assert np.all(np.isfinite(batched_kernel.allocation[0]))
    assert np.all(np.isnan(batched_kernel.allocation[1]))
    # vmap over a traced epsilon: 1e-3 sends the well-conditioned problem to the log domain.
    noise, student, mass = _problem(49, batch_size=16, num_classes=4)
    noise = noise.at[:, 3].set(jnp.min(noise + student, axis=1) - 0.5 - student[:, 3])
    epsilons = jnp.array([2.0, 1e-3])
    swept = jax.vmap(lambda e: sinkhorn_allocation(noise, student, mass, epsilon=e,
                                                   num_iters=50, backend=backend))(epsilons)
    for k, eps in enumerate([2.0, 1e-3]):
        expected = sinkhorn_allocation(noise, student, mass, epsilon=eps, num_iters=50,
                                       backend=backend, mode="log")
        np.testing.assert_allclose(swept.allocation[k], expected.allocation, atol=2e-6)
    assert np.all(np.isfinite(swept.allocation))


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_mass_class_in_kernel_mode(backend):
    noise, student, _ = _problem(8)
    mass = jnp.array([0.5, 0.0, 0.25, 0.25])
    solved = _solve_all_modes(noise, student, mass, num_iters=300, backend=backend)
    for mode in ("kernel", "auto"):
        info = solved[mode]
        assert np.all(np.isfinite(info.allocation))
        np.testing.assert_allclose(info.allocation[:, 1], 0.0, atol=1e-7)
        assert info.potential[1] == -np.inf
        np.testing.assert_allclose(info.allocation, solved["log"].allocation, atol=2e-6)


def test_the_guard_threshold_and_its_mask():
    # The guard itself (a speed choice: whichever way it errs, "auto"'s result is that of a
    # checked kernel solve or of the log domain): class 1's best row-shifted score is -(floor
    # -/+ 0.5); masked rows, however close to class 1, do not count.
    from dsink_jax.ot.sinkhorn import _kernel_usable, _row_shift
    has_mass = jnp.array([True, True])
    valid = jnp.array([True, True, False])
    for offset, usable in ((-0.5, True), (0.5, False)):
        scores = jnp.array([[0.0, -KERNEL_LOG_FLOOR - offset], [0.0, -100.0], [-5.0, 0.0]])
        kernel = jnp.exp(_row_shift(scores, valid)[0])
        assert bool(_kernel_usable(kernel, has_mass)) is usable
        # A class without mass does not count.
        assert bool(_kernel_usable(kernel, jnp.array([True, False])))
