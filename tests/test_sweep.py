"""The sweep step: members updated together equal members updated alone."""

import functools

import jax
import numpy as np
import pytest

from dsink_jax import pipelines
from dsink_jax.train import step as step_lib
from dsink_jax.train.objectives import make_dsink_objective


@pytest.fixture(scope="module")
def setup():
    # The per-batch allocation: both teachers run inside the members' program.
    config = pipelines.dsink.build_config(dict(
        pipelines.dsink.ARGS, preset="smoke", allocation="batch", class_mass_prior="none",
        student_logit_adjustment=0.0))
    training_set = pipelines.prepare_training_set(config)
    teacher = pipelines.common.make_model(config, training_set.num_classes)
    teacher_vars = teacher.init(jax.random.PRNGKey(7), np.zeros((1, 8, 8, 1), np.float32))
    objective = make_dsink_objective(config.dsink, clean_labels=training_set.clean_labels,
                                     steps_per_epoch=10)
    method = pipelines.build_method(config, training_set, objective=objective,
                                    teacher_models=(teacher, teacher))
    members = pipelines.dsink.members_of({"alpha": [0.5, 4.0], "learning_rate": [0.01, 0.1]}, config)
    idx = np.arange(64, dtype=np.int32)
    batch = {"images": training_set.x_train[idx], "labels": training_set.noisy_labels[idx],
             "indices": idx}
    return config, method, members, batch, (teacher_vars, teacher_vars), training_set


@pytest.mark.parametrize("mode", step_lib.MEMBER_MODES)
def test_sweep_step_equals_single_steps(setup, mode):
    config, method, members, batch, teacher_vars, training_set = setup
    data_rng = jax.random.split(jax.random.PRNGKey(config.seed))[1]
    states = pipelines.dsink.init_members(method, members, training_set.x_train[:1])
    step = jax.jit(functools.partial(step_lib.members_step, data_rng=data_rng, method=method,
                                     mode=mode))
    swept, metrics = step(states, batch, teacher_vars)
    assert metrics["loss"].shape == (4,)
    for i in range(len(members)):
        alone = jax.tree.map(lambda x, i=i: x[i], states)
        alone = alone.replace(rng=data_rng)  # the sweep's shared data key
        new, _ = step_lib.train_step(alone, batch, teacher_vars, method=method)
        for a, b in zip(jax.tree.leaves(new.params),
                        jax.tree.leaves(jax.tree.map(lambda x, i=i: x[i], swept.params))):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # Different hyperparameters really give different students.
    assert not np.allclose(jax.tree.leaves(swept.params)[0][0], jax.tree.leaves(swept.params)[0][3])


def test_unknown_member_mode():
    with pytest.raises(ValueError, match="mode='pmap'; allowed: vmap, unroll"):
        step_lib.members_step(None, None, data_rng=None, method=None, mode="pmap")
