"""Tests of the D-SINK loss: values, gradients, modes, transforms, bad input."""
import os
import subprocess
import sys
import textwrap

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import scipy.special

from dsink_jax.losses.dsink import distillation_terms, dsink_loss, global_class_mass
from dsink_jax.ot.sinkhorn import sinkhorn_allocation
from tests.multiprocess import xla_flags

B, C = 12, 4
ITERS = 300  # one static count throughout, so each shape compiles once


def _batch(seed):
    keys = jax.random.split(jax.random.key(seed), 4)
    student = 2.0 * jax.random.normal(keys[0], (B, C))
    noise_teacher = 2.0 * jax.random.normal(keys[1], (B, C))
    imbalance_teacher = 2.0 * jax.random.normal(keys[2], (B, C))
    labels = jax.random.randint(keys[3], (B,), 0, C)
    return student, noise_teacher, imbalance_teacher, labels


def _reference_allocation(student, noise_teacher, class_mass, epsilon=2.0):
    q = sinkhorn_allocation(
        jax.nn.log_softmax(noise_teacher), jax.nn.log_softmax(student),
        class_mass, epsilon=epsilon, num_iters=ITERS).allocation
    return q


def test_loss_value_and_aux_by_hand():
    student, noise_teacher, imbalance_teacher, labels = _batch(0)
    loss, aux = dsink_loss(student, noise_teacher, imbalance_teacher, labels,
                           alpha=3.0, num_iters=ITERS)
    mass = np.asarray(jax.nn.softmax(imbalance_teacher)).mean(0)
    q = np.asarray(_reference_allocation(student, noise_teacher, mass))
    log_p = np.asarray(jax.nn.log_softmax(student), np.float64)
    base = -log_p[np.arange(B), np.asarray(labels)]
    distill = -(q * log_p).sum(1)
    np.testing.assert_allclose(aux.class_mass, mass, rtol=1e-6)
    np.testing.assert_allclose(aux.allocation, q, atol=1e-6)
    np.testing.assert_allclose(aux.base, base, rtol=1e-5)
    np.testing.assert_allclose(aux.distill, distill, rtol=1e-5)
    np.testing.assert_allclose(aux.per_example, base + 3.0 * distill,
                               rtol=1e-5)
    np.testing.assert_allclose(loss, np.mean(base + 3.0 * distill), rtol=1e-5)
    q_safe = np.where(q > 0, q, 1.0)
    np.testing.assert_allclose(aux.allocation_entropy,
                               np.mean(-(q * np.log(q_safe)).sum(1)), rtol=1e-5)
    np.testing.assert_allclose(
        aux.marginal_error, np.max(np.abs(q.sum(0) - B * mass)) / B,
        atol=1e-7)
    assert aux.marginal_error < 1e-5
    assert bool(aux.finite)
    chex.assert_shape([aux.base, aux.distill, aux.per_example], (B,))
    chex.assert_shape(aux.allocation, (B, C))
    chex.assert_shape(loss, ())


def test_alpha_zero_is_plain_cross_entropy():
    student, noise_teacher, imbalance_teacher, labels = _batch(1)
    loss, _ = dsink_loss(student, noise_teacher, imbalance_teacher, labels,
                         alpha=0.0, num_iters=ITERS)
    expected = optax.losses.softmax_cross_entropy_with_integer_labels(
        student, labels).mean()
    np.testing.assert_allclose(loss, expected, rtol=1e-6)


def test_gradient_is_soft_label_gradient_with_q_fixed():
    student, noise_teacher, imbalance_teacher, labels = _batch(2)
    alpha = 2.5

    def loss_fn(logits):
        return dsink_loss(logits, noise_teacher, imbalance_teacher, labels,
                          alpha=alpha, num_iters=ITERS)[0]

    grad = jax.grad(loss_fn)(student)
    mass = jax.nn.softmax(imbalance_teacher).mean(0)
    q = _reference_allocation(student, noise_teacher, mass)

    def fixed_target_loss(logits):
        return jnp.mean(
            optax.losses.softmax_cross_entropy_with_integer_labels(logits, labels)
            + alpha * optax.losses.softmax_cross_entropy(logits, q))

    np.testing.assert_allclose(grad, jax.grad(fixed_target_loss)(student),
                               atol=1e-6)
    # And by hand: (p - onehot(y) + alpha (p - q)) / B, rows of q summing to 1.
    p = jax.nn.softmax(student)
    by_hand = (p - jax.nn.one_hot(labels, C) + alpha * (p - q)) / B
    np.testing.assert_allclose(grad, by_hand, atol=1e-6)


def test_teachers_and_class_mass_get_no_gradient():
    student, noise_teacher, imbalance_teacher, labels = _batch(3)
    mass = jnp.full((C,), 1.0 / C)

    def loss_fn(noise_teacher, imbalance_teacher, mass):
        batch_mode = dsink_loss(student, noise_teacher, imbalance_teacher, labels,
                                alpha=1.0, num_iters=ITERS)[0]
        global_mode = dsink_loss(student, noise_teacher, None, labels, alpha=1.0,
                                 class_mass=mass, num_iters=ITERS)[0]
        return batch_mode + global_mode

    grads = jax.grad(loss_fn, argnums=(0, 1, 2))(noise_teacher,
                                                 imbalance_teacher, mass)
    for grad in grads:
        np.testing.assert_array_equal(grad, 0.0)


def test_global_class_mass_mode():
    student, noise_teacher, imbalance_teacher, labels = _batch(4)
    all_logits = jax.random.normal(jax.random.key(9), (50, C)) + jnp.arange(C)
    mass = global_class_mass(all_logits)
    np.testing.assert_allclose(mass, jax.nn.softmax(all_logits).mean(0),
                               rtol=1e-6)
    np.testing.assert_allclose(mass.sum(), 1.0, atol=1e-6)
    _, aux = dsink_loss(student, noise_teacher, None, labels, alpha=1.0,
                        class_mass=mass, num_iters=ITERS)
    np.testing.assert_allclose(aux.class_mass, mass)
    np.testing.assert_allclose(aux.allocation.sum(0), B * mass, atol=1e-4)
    # The given vector is used as is, even when a batch teacher is passed.
    _, aux_both = dsink_loss(student, noise_teacher, imbalance_teacher, labels,
                             alpha=1.0, class_mass=mass, num_iters=ITERS)
    np.testing.assert_allclose(aux_both.allocation, aux.allocation)


def test_base_loss_none_is_distillation_only():
    student, noise_teacher, imbalance_teacher, labels = _batch(5)
    loss, aux = dsink_loss(student, noise_teacher, imbalance_teacher, None,
                           alpha=2.0, base_loss="none", num_iters=ITERS)
    np.testing.assert_array_equal(aux.base, 0.0)
    np.testing.assert_allclose(loss, 2.0 * aux.distill.mean(), rtol=1e-6)
    _, aux_ce = dsink_loss(student, noise_teacher, imbalance_teacher, labels,
                           alpha=2.0, num_iters=ITERS)
    np.testing.assert_allclose(aux.distill, aux_ce.distill, rtol=1e-6)


def test_base_loss_la_is_the_logit_adjusted_ce_by_hand():
    student, noise_teacher, imbalance_teacher, labels = _batch(13)
    prior = jnp.asarray([0.6, 0.25, 0.1, 0.05])
    loss, aux = dsink_loss(student, noise_teacher, imbalance_teacher, labels, alpha=2.0,
                           base_loss="la", label_prior=prior, la_tau=0.5, num_iters=ITERS)
    adjusted = np.asarray(student, np.float64) + 0.5 * np.log(np.asarray(prior, np.float64))
    log_p = adjusted - scipy.special.logsumexp(adjusted, axis=1, keepdims=True)
    np.testing.assert_allclose(aux.base, -log_p[np.arange(B), np.asarray(labels)], rtol=1e-5)
    # Only the base term changes: Q and the distillation term are those of base_loss="ce".
    _, aux_ce = dsink_loss(student, noise_teacher, imbalance_teacher, labels, alpha=2.0,
                           num_iters=ITERS)
    np.testing.assert_allclose(aux.allocation, aux_ce.allocation, atol=1e-7)
    np.testing.assert_allclose(aux.distill, aux_ce.distill, rtol=1e-6)
    np.testing.assert_allclose(loss, np.mean(aux.base + 2.0 * aux.distill), rtol=1e-6)
    assert not np.allclose(aux.base, aux_ce.base)


def test_distillation_terms_take_any_allocation():
    student, _, _, labels = _batch(14)
    q = jax.nn.softmax(jax.random.normal(jax.random.key(3), (B, C)))
    aux = distillation_terms(student, q, labels, alpha=1.5)
    log_p = np.asarray(jax.nn.log_softmax(student), np.float64)
    np.testing.assert_allclose(aux.distill, -(np.asarray(q) * log_p).sum(1), rtol=1e-5)
    np.testing.assert_allclose(aux.per_example, aux.base + 1.5 * aux.distill, rtol=1e-6)
    grad_q = jax.grad(lambda q: distillation_terms(student, q, labels,
                                                   alpha=1.0).per_example.sum())(q)
    np.testing.assert_array_equal(grad_q, 0.0)  # Q is a target


def test_ott_backend_matches_native_under_jit():
    batch = _batch(6)
    native = jax.jit(lambda *a: dsink_loss(*a, alpha=1.0, num_iters=ITERS))
    via_ott = jax.jit(lambda *a: dsink_loss(*a, alpha=1.0, num_iters=ITERS,
                                            backend="ott"))
    (loss_n, aux_n), (loss_o, aux_o) = native(*batch), via_ott(*batch)
    np.testing.assert_allclose(aux_n.allocation, aux_o.allocation,
                               atol=1e-5)
    np.testing.assert_allclose(loss_n, loss_o, rtol=1e-5)


@pytest.mark.parametrize("backend", ["native", "ott"])
def test_sinkhorn_mode_reaches_the_solver(backend):
    # A batch whose class-2 kernel column underflows at epsilon 2 (f_N's logit -2e4 there):
    # "auto" falls back to the log domain (the "log" loss exactly), a forced "kernel" solve
    # fails its check and the loss says so through `finite`.
    student, noise_teacher, imbalance_teacher, labels = _batch(13)
    noise_teacher = noise_teacher.at[:, 2].set(-2e4)
    losses = {mode: dsink_loss(student, noise_teacher, imbalance_teacher, labels, alpha=1.0,
                               num_iters=ITERS, backend=backend, sinkhorn_mode=mode)
              for mode in ("auto", "log", "kernel")}
    np.testing.assert_array_equal(losses["auto"][0], losses["log"][0])
    np.testing.assert_array_equal(losses["auto"][1].allocation, losses["log"][1].allocation)
    assert bool(losses["auto"][1].finite) and bool(losses["log"][1].finite)
    assert not bool(losses["kernel"][1].finite)
    # On an ordinary batch the two domains give the same loss.
    batch = _batch(14)
    kernel, log = (dsink_loss(*batch, alpha=1.0, num_iters=ITERS, backend=backend,
                              sinkhorn_mode=mode)[0] for mode in ("kernel", "log"))
    np.testing.assert_allclose(kernel, log, rtol=1e-6)


def test_no_retracing_across_steps():
    chex.clear_trace_counter()

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(student, noise_teacher, imbalance_teacher, labels, alpha):
        return jax.value_and_grad(
            lambda s: dsink_loss(s, noise_teacher, imbalance_teacher, labels,
                                 alpha=alpha, num_iters=ITERS)[0])(student)

    losses = [float(step(*_batch(10 + k), jnp.float32(0.5 * k))[0])
              for k in range(3)]
    assert len(set(losses)) == 3


def test_vmap_over_alpha_and_epsilon_equals_loop():
    batch = _batch(7)
    alphas = jnp.array([0.5, 1.0, 3.0])
    epsilons = jnp.array([1.0, 2.0, 4.0])
    losses, aux = jax.vmap(
        lambda a, e: dsink_loss(*batch, alpha=a, epsilon=e, num_iters=ITERS))(
            alphas, epsilons)
    chex.assert_shape(aux.allocation, (3, B, C))
    for k in range(3):
        loss, aux_k = dsink_loss(*batch, alpha=float(alphas[k]),
                                 epsilon=float(epsilons[k]), num_iters=ITERS)
        np.testing.assert_allclose(losses[k], loss, rtol=1e-5)
        np.testing.assert_allclose(aux.allocation[k], aux_k.allocation,
                                   atol=1e-6)
    assert len(set(np.asarray(losses).tolist())) == 3


def test_finite_flag_under_jit_with_nan_input():
    student, noise_teacher, imbalance_teacher, labels = _batch(8)
    loss_fn = jax.jit(lambda s: dsink_loss(s, noise_teacher, imbalance_teacher,
                                           labels, alpha=1.0,
                                           num_iters=ITERS)[1].finite)
    assert bool(loss_fn(student))
    assert not bool(loss_fn(student.at[3, 1].set(jnp.nan)))


def test_batch_sharded_over_devices_matches_single_device():
    # A fresh interpreter: the host device count is fixed when jax starts.
    script = textwrap.dedent("""
        import jax, jax.numpy as jnp, numpy as np
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
        from dsink_jax.losses.dsink import dsink_loss
        assert jax.device_count() == 2, jax.devices()
        keys = jax.random.split(jax.random.key(0), 4)
        batch = [2.0 * jax.random.normal(k, (8, 3)) for k in keys[:3]]
        batch.append(jax.random.randint(keys[3], (8,), 0, 3))
        fn = jax.jit(lambda *a: dsink_loss(*a, alpha=2.0, num_iters=100))
        loss, aux = fn(*batch)
        mesh = Mesh(np.array(jax.devices()), ("batch",))
        sharded = [jax.device_put(x, NamedSharding(mesh, P("batch")))
                   for x in batch]
        loss_s, aux_s = fn(*sharded)
        assert len(sharded[0].sharding.device_set) == 2
        np.testing.assert_allclose(loss_s, loss, rtol=1e-5)
        np.testing.assert_allclose(aux_s.allocation, aux.allocation,
                                   atol=1e-6)
        print("OK")
    """)
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=xla_flags("--xla_force_host_platform_device_count=2"))
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = repo + os.pathsep + env.get("PYTHONPATH", "")
    result = subprocess.run([sys.executable, "-c", script], env=env,
                            capture_output=True, text=True, timeout=120,
                            check=False)
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"alpha": -1.0}, ValueError, r"alpha=-1.0.*>= 0"),
        ({"alpha": float("inf")}, ValueError, r"alpha=inf"),
        ({"alpha": 1.0, "epsilon": 0.0}, ValueError, r"epsilon=0.0"),
        ({"alpha": 1.0, "num_iters": 0}, ValueError, r"num_iters=0"),
        ({"alpha": 1.0, "backend": "pot"}, ValueError, r"backend='pot'"),
        ({"alpha": 1.0, "sinkhorn_mode": "scaling"}, ValueError,
         r"sinkhorn_mode='scaling'; allowed values: \('auto', 'log', 'kernel'\)"),
        ({"alpha": 1.0, "base_loss": "gce"}, ValueError,
         r"base_loss='gce'.*'ce', 'la', 'none'"),
        ({"alpha": 1.0, "base_loss": "la"}, ValueError, r"base_loss='la' needs label_prior"),
        ({"alpha": 1.0, "base_loss": "la", "label_prior": jnp.ones(C)}, ValueError,
         r"label_prior=.*sum to 1"),
        ({"alpha": 1.0, "base_loss": "la", "label_prior": jnp.ones(3) / 3}, ValueError,
         r"label_prior has shape \(3,\)"),
        ({"alpha": 1.0, "class_mass": jnp.ones(C)}, ValueError,
         r"class_mass sums to 4"),
        ({"alpha": 1.0, "class_mass": jnp.ones(3) / 3}, ValueError,
         r"class_mass has shape \(3,\)"),
    ],
)
def test_bad_options_raise(kwargs, error, match):
    with pytest.raises(error, match=match):
        dsink_loss(*_batch(11), **kwargs)


def test_bad_arrays_raise():
    student, noise_teacher, imbalance_teacher, labels = _batch(12)
    with pytest.raises(ValueError, match=r"noise_teacher_logits has shape "
                                         r"\(12, 3\); expected \(12, 4\)"):
        dsink_loss(student, noise_teacher[:, :3], imbalance_teacher, labels,
                   alpha=1.0)
    with pytest.raises(ValueError, match=r"imbalance_teacher_logits has shape"):
        dsink_loss(student, noise_teacher, imbalance_teacher[:5], labels,
                   alpha=1.0)
    with pytest.raises(ValueError, match=r"labels has shape \(5,\)"):
        dsink_loss(student, noise_teacher, imbalance_teacher, labels[:5],
                   alpha=1.0)
    with pytest.raises(ValueError, match=r"labels range over \[0, 4\]"):
        dsink_loss(student, noise_teacher, imbalance_teacher,
                   labels.at[0].set(4).at[1].set(0), alpha=1.0)
    with pytest.raises(TypeError, match=r"labels has dtype float32"):
        dsink_loss(student, noise_teacher, imbalance_teacher,
                   labels.astype(jnp.float32), alpha=1.0)
    with pytest.raises(ValueError, match=r"imbalance_teacher_logits=None needs "
                                         r"a class_mass"):
        dsink_loss(student, noise_teacher, None, labels, alpha=1.0)
    with pytest.raises(ValueError, match=r"labels=None needs base_loss='none'"):
        dsink_loss(student, noise_teacher, imbalance_teacher, None, alpha=1.0)
    with pytest.raises(ValueError, match=r"student_logits has non-finite"):
        dsink_loss(student.at[0, 0].set(jnp.inf), noise_teacher,
                   imbalance_teacher, labels, alpha=1.0)
    with pytest.raises(ValueError, match=r"imbalance_teacher_logits has "
                                         r"non-finite"):
        dsink_loss(student, noise_teacher, imbalance_teacher.at[0, 0].set(jnp.nan),
                   labels, alpha=1.0)
    with pytest.raises(ValueError, match=r"shape \(7,\); expected \[N, C\]"):
        global_class_mass(jnp.ones(7))


@pytest.mark.parametrize("mode", ["batch", "global"])
def test_padding_plus_a_mask_equals_the_unpadded_batch(mode):
    student, noise_teacher, imbalance_teacher, labels = _batch(21)
    pad = lambda x, fill: jnp.concatenate([x, jnp.full((5,) + x.shape[1:], fill, x.dtype)])
    where = jnp.arange(B + 5) < B
    mass = jnp.asarray([0.4, 0.3, 0.2, 0.1]) if mode == "global" else None
    kwargs = dict(alpha=2.0, num_iters=ITERS, class_mass=mass)
    loss, aux = dsink_loss(student, noise_teacher, imbalance_teacher, labels, **kwargs)
    padded = (pad(student, 3.0), pad(noise_teacher, -2.0), pad(imbalance_teacher, 9.0),
              pad(labels, 0))
    loss_m, aux_m = dsink_loss(*padded, where=where, **kwargs)
    np.testing.assert_allclose(loss_m, loss, rtol=1e-5)
    np.testing.assert_allclose(aux_m.allocation[:B], aux.allocation, atol=2e-6)
    np.testing.assert_allclose(aux_m.class_mass, aux.class_mass, rtol=1e-6)
    np.testing.assert_allclose(aux_m.per_example[:B], aux.per_example, rtol=1e-5)
    np.testing.assert_array_equal(aux_m.per_example[B:], 0.0)
    np.testing.assert_allclose(aux_m.allocation_entropy, aux.allocation_entropy, rtol=1e-5)
    # Gradients: padded rows get none, the others exactly those of the unpadded batch.
    grad = jax.grad(lambda s: dsink_loss(s, *padded[1:], where=where, **kwargs)[0])(padded[0])
    grad_alone = jax.grad(lambda s: dsink_loss(s, *_batch(21)[1:], **kwargs)[0])(student)
    np.testing.assert_allclose(grad[:B], grad_alone, atol=1e-6)
    np.testing.assert_array_equal(grad[B:], 0.0)
    # The unmasked padded batch is a different problem (the mask matters).
    loss_u, _ = dsink_loss(*padded, **kwargs)
    assert abs(float(loss_u) - float(loss)) > 1e-3


def test_reduction_none_gives_the_per_example_losses():
    batch = _batch(22)
    per_example, aux = dsink_loss(*batch, alpha=1.0, num_iters=ITERS, reduction="none")
    chex.assert_shape(per_example, (B,))
    np.testing.assert_array_equal(per_example, aux.per_example)
    loss, _ = dsink_loss(*batch, alpha=1.0, num_iters=ITERS)
    np.testing.assert_allclose(jnp.mean(per_example), loss, rtol=1e-6)
    with pytest.raises(ValueError, match="reduction='sum'; allowed values"):
        dsink_loss(*batch, alpha=1.0, reduction="sum")
