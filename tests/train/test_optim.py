"""The optimizer equals PyTorch's SGD update; schedules have the published shape."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dsink_jax.train import optim


def test_step_schedule_ldam_drw_shape():
    # 200 epochs of 10 steps: 5 warm-up epochs, x0.01 at 160, x0.0001 at 180.
    fn = optim.lr_multiplier("step", total_steps=2000, warmup_steps=50,
                             drop_steps=(1600, 1800), drop_factors=(0.01, 0.0001))
    np.testing.assert_allclose(fn(0), 1 / 50, rtol=1e-6)
    np.testing.assert_allclose(fn(49), 1.0)
    np.testing.assert_allclose(fn(1599), 1.0)
    np.testing.assert_allclose(fn(1600), 0.01)
    np.testing.assert_allclose(fn(1800), 0.0001)


def test_cosine_schedule_ends_at_zero_and_is_monotone():
    fn = optim.lr_multiplier("cosine", total_steps=100, warmup_steps=10)
    values = np.array([fn(s) for s in range(100)])
    assert np.all(np.diff(values[10:]) <= 1e-7)
    np.testing.assert_allclose(fn(10), 1.0, atol=1e-6)
    np.testing.assert_allclose(fn(100), 0.0, atol=1e-6)


def test_unknown_schedule_raises():
    with pytest.raises(ValueError, match="poly.*allowed: step, cosine, constant"):
        optim.lr_multiplier("poly", total_steps=10, warmup_steps=0)


def test_sgd_matches_pytorch_update_rule():
    lr, mom, wd = 0.1, 0.9, 0.01
    tx = optim.sgd(learning_rate=lr, momentum=mom, weight_decay=wd,
                   multiplier=lambda s: jnp.ones(()))
    p = {"w": jnp.array([1.0, -2.0])}
    state = tx.init(p)
    buf = np.zeros(2)
    ref = np.array([1.0, -2.0])
    for g in ([0.5, 0.1], [-0.2, 0.3], [0.0, 1.0]):
        upd, state = tx.update({"w": jnp.array(g)}, state, p)
        p = optax.apply_updates(p, upd)
        d = np.array(g) + wd * ref  # PyTorch: d_p = g + wd * p; buf = m * buf + d_p; p -= lr * buf
        buf = mom * buf + d
        ref = ref - lr * buf
    np.testing.assert_allclose(p["w"], ref, rtol=1e-6)


def test_learning_rate_is_an_injected_hyperparameter_for_sweeps():
    tx = optim.sgd(learning_rate=0.1, momentum=0.0, weight_decay=0.0,
                   multiplier=lambda s: jnp.ones(()))
    p = {"w": jnp.zeros(())}

    def one_step(lr):
        state = tx.init(p)
        state.hyperparams["learning_rate"] = lr
        upd, _ = tx.update({"w": jnp.ones(())}, state, p)
        return upd["w"]

    out = jax.vmap(one_step)(jnp.array([0.1, 0.5]))
    np.testing.assert_allclose(out, [-0.1, -0.5], rtol=1e-6)
