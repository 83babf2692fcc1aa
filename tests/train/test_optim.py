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


def _hand_written_multiplier(schedule, *, total_steps, warmup_steps, drop_steps=(),
                             drop_factors=()):
    """The formula the library used before its schedules were optax's (the reference)."""
    def fn(step):
        step = np.float64(step)
        warm = min(1.0, (step + 1.0) / max(warmup_steps, 1)) if warmup_steps else 1.0
        if schedule == "constant":
            return warm
        if schedule == "cosine":
            span = max(total_steps - warmup_steps, 1)
            progress = np.clip((step - warmup_steps) / span, 0.0, 1.0)
            return warm * 0.5 * (1.0 + np.cos(np.pi * progress))
        mult = 1.0
        for at, factor in zip(drop_steps, drop_factors):
            mult = factor if step >= at else mult
        return warm * mult
    return fn


@pytest.mark.parametrize("preset", ["paper", "cpu", "smoke"])
def test_every_preset_keeps_its_step_by_step_learning_rate(preset):
    from dsink_jax import configs
    optim_config = configs.build_config("baseline", dict(
        configs.COMMON_ARGS, dataset="cifar10", preset=preset)).optim
    steps_per_epoch = 97  # CIFAR-10-LT ratio 100 at batch 128
    total = optim_config.epochs * steps_per_epoch
    kwargs = dict(
        total_steps=total,
        warmup_steps=int(round(optim_config.warmup_epochs * steps_per_epoch)),
        drop_steps=tuple(int(round(f * optim_config.epochs)) * steps_per_epoch
                         for f in optim_config.lr_drop_fractions),
        drop_factors=tuple(optim_config.lr_drop_factors))
    new = jax.jit(jax.vmap(optim.lr_multiplier(optim_config.schedule, **kwargs)))
    reference = _hand_written_multiplier(optim_config.schedule, **kwargs)
    steps = np.arange(total + 1)
    np.testing.assert_allclose(new(steps), [reference(s) for s in steps], rtol=2e-6, atol=1e-7)
    # And through the optimizer: its first update is -lr * multiplier(0) * gradient.
    tx = optim.from_config(optim_config, steps_per_epoch=steps_per_epoch)
    p = {"w": jnp.zeros(())}
    upd, _ = tx.update({"w": jnp.ones(())}, tx.init(p), p)
    np.testing.assert_allclose(upd["w"], -optim_config.learning_rate * reference(0), rtol=1e-5)


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
