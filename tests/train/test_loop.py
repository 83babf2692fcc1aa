"""End-to-end training on the bundled digits: results, resume, bad input, retracing."""

import json
import os

import chex
import jax
import numpy as np
import pytest

from dsink_jax import configs, pipelines
from dsink_jax.train import loop
from dsink_jax.train import step as step_lib


def smoke_config(**overrides):
    args = dict(configs.COMMON_ARGS, preset="smoke", noise="sym", noise_rate=0.2)
    args.update(overrides)
    config = configs.build_config("baseline", args)
    config.progress = False
    return config


@pytest.fixture(scope="module")
def digits_set():
    return pipelines.prepare_training_set(smoke_config())


def test_a_log_file_gets_a_progress_line_every_epoch(tmp_path, digits_set, capsys):
    config = smoke_config()
    config.progress = True  # stderr is not a terminal here: lines, not a bar
    config.optim.epochs, config.eval_every_epochs = 3, 2
    method = pipelines.build_method(config, digits_set)
    loop.train(config, str(tmp_path), training_set=digits_set, method=method, name="m")
    lines = [l for l in capsys.readouterr().err.splitlines() if l.startswith("[m]")]
    assert [l.split(" loss ")[0] for l in lines] == [f"[m] epoch {k}/3" for k in (1, 2, 3)]
    assert "images/s" in lines[0] and "test accuracy" in lines[1] and "test accuracy" in lines[2]


class _Interrupt(Exception):
    pass


def test_results_have_the_documented_fields(tmp_path, digits_set):
    config = smoke_config()
    method = pipelines.build_method(config, digits_set)
    results, _ = loop.train(config, str(tmp_path), training_set=digits_set, method=method)
    on_disk = json.loads((tmp_path / "results.json").read_text())
    for key in ("test_accuracy", "many_shot_accuracy", "medium_shot_accuracy",
                "few_shot_accuracy", "per_class_accuracy", "class_counts", "realised_noise_rate",
                "images_per_sec", "params_fingerprint", "config", "correction_rate"):
        assert key in on_disk, key
    assert on_disk["params_fingerprint"] == results["params_fingerprint"]
    assert len(on_disk["per_class_accuracy"]) == 10
    assert 0.0 <= on_disk["test_accuracy"] <= 1.0
    # Two smoke epochs on digits already learn something (chance is 0.1).
    assert on_disk["test_accuracy"] > 0.3
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(l)["epoch"] for l in lines] == [1, 2]
    assert os.listdir(tmp_path / "tensorboard")


@pytest.mark.parametrize("loss", ["elr", "ldam_drw", "select_la"])
def test_interrupted_run_resumes_to_identical_parameters(tmp_path, digits_set, loss):
    # ELR and select_la carry per-sample memory (select_la's labels as int32, its selection
    # from epoch 2 of 4 here) and LDAM-DRW switches weights by step: all must resume.
    config = smoke_config(loss=loss)
    config.optim.epochs = 4
    method = pipelines.build_method(config, digits_set)
    straight, _ = loop.train(config, str(tmp_path / "straight"), training_set=digits_set,
                             method=method)

    def interrupt_at_3(state, epoch):
        if epoch == 3:
            raise _Interrupt()
        return {}

    with pytest.raises(_Interrupt):
        loop.train(config, str(tmp_path / "resumed"), training_set=digits_set, method=method,
                   epoch_hook=interrupt_at_3)
    # Checkpoints are numbered by optimizer step: the last one is that of epoch 2.
    steps_per_epoch = digits_set.num_train // config.optim.batch_size
    saved = sorted(int(n) for n in os.listdir(tmp_path / "resumed" / "checkpoints") if n.isdigit())
    assert saved[-1] == 2 * steps_per_epoch
    resumed, _ = loop.train(config, str(tmp_path / "resumed"), training_set=digits_set,
                            method=method)
    assert resumed["params_fingerprint"] == straight["params_fingerprint"]
    epochs = [json.loads(l)["epoch"]
              for l in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2, 3, 4]


def test_nan_stops_naming_the_step_and_keeps_last_checkpoint(tmp_path, digits_set):
    config = smoke_config()
    config.optim.epochs = 3
    config.optim.learning_rate = 1e30  # diverges within the second epoch at the latest
    method = pipelines.build_method(config, digits_set)
    with pytest.raises(loop.NonFiniteLossError, match=r"at step \d+"):
        loop.train(config, str(tmp_path), training_set=digits_set, method=method)
    assert not (tmp_path / "results.json").exists()


def test_train_step_is_traced_once(digits_set):
    config = smoke_config()
    method = pipelines.build_method(config, digits_set)
    state = step_lib.init_state(method, jax.random.PRNGKey(0), digits_set.x_train[:1])

    @chex.assert_max_traces(n=1)
    def traced(state, batch):
        return step_lib.train_step(state, batch, method=method)

    step = jax.jit(traced, donate_argnums=0)
    rng = np.random.default_rng(0)
    for _ in range(3):
        idx = rng.choice(digits_set.x_train.shape[0], 16, replace=False).astype(np.int32)
        batch = {"images": digits_set.x_train[idx], "labels": digits_set.noisy_labels[idx],
                 "indices": idx}
        state, metrics = step(state, batch)
    assert int(state.step) == 3
    assert bool(metrics["finite"])


def test_batch_larger_than_dataset_fails_before_training(tmp_path, digits_set):
    config = smoke_config()
    config.optim.batch_size = 10**6
    method = pipelines.build_method(config, digits_set)
    with pytest.raises(ValueError, match="batch_size=1000000 is larger than the training set"):
        loop.train(config, str(tmp_path), training_set=digits_set, method=method)


def test_unwritable_workdir_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(PermissionError, match="not writable"):
        pipelines.common.check_workdir(str(blocker / "sub"))


def _dsink_dataset_method(config, digits_set):
    """A D-SINK student with the dataset-level allocation, against fixed fake teacher logits."""
    from dsink_jax.train import objectives
    d = pipelines.dsink.build_config(dict(pipelines.dsink.ARGS, preset="smoke")).dsink
    with d.unlocked():
        d.allocation = "dataset"
        d.refresh_every_epochs = 2
        d.base_loss = "la"
    num_train, num_classes = digits_set.x_train.shape[0], digits_set.num_classes
    noise_logits = np.asarray(jax.random.normal(jax.random.PRNGKey(3), (num_train, num_classes)))
    mass = np.full(num_classes, 1.0 / num_classes, np.float32)
    objective = objectives.make_dsink_objective(
        d, clean_labels=digits_set.clean_labels, steps_per_epoch=4, class_mass=mass,
        class_counts=digits_set.noisy_class_counts)
    refresh = objectives.dataset_allocation_refresh(
        d, noise_teacher_logits=noise_logits, class_mass=mass,
        class_counts=digits_set.noisy_class_counts, every_epochs=2)
    return pipelines.build_method(config, digits_set, objective=objective), refresh


def test_dataset_allocation_is_refreshed_on_schedule_and_resumes_exactly(tmp_path, digits_set):
    config = smoke_config()
    config.optim.epochs = 4
    method, refresh = _dsink_dataset_method(config, digits_set)
    refreshed_at = []

    def counting_refresh(state, epoch, predict):
        out = refresh(state, epoch, predict)
        if out is not None:
            refreshed_at.append(epoch)
        return out

    straight, state = loop.train(config, str(tmp_path / "straight"), training_set=digits_set,
                                 method=method, refresh_extra=counting_refresh)
    assert refreshed_at == [0, 2]
    table = np.asarray(state.extra["allocation"])
    np.testing.assert_allclose(table.sum(1), 1.0, atol=1e-5)
    np.testing.assert_allclose(table.mean(0), 0.1, atol=1e-4)  # the uniform class mass

    def interrupt_at_3(state, epoch):
        if epoch == 3:
            raise _Interrupt()
        return {}

    with pytest.raises(_Interrupt):
        loop.train(config, str(tmp_path / "resumed"), training_set=digits_set, method=method,
                   refresh_extra=refresh, epoch_hook=interrupt_at_3)
    resumed, _ = loop.train(config, str(tmp_path / "resumed"), training_set=digits_set,
                            method=method, refresh_extra=refresh)
    assert resumed["params_fingerprint"] == straight["params_fingerprint"]
    record = json.loads((tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["train_marginal_error"] < 0.2 and "train_allocation_accuracy" in record


def test_a_warm_start_begins_from_the_given_variables(tmp_path, digits_set):
    config = smoke_config()
    method = pipelines.build_method(config, digits_set)
    _, donor = loop.train(config, str(tmp_path / "donor"), training_set=digits_set, method=method)
    config.optim.epochs = 1
    config.optim.learning_rate = 1e-30  # the parameters cannot move measurably
    config.optim.weight_decay = 0.0
    method = pipelines.build_method(config, digits_set)  # the optimizer of the new config
    _, warm = loop.train(config, str(tmp_path / "warm"), training_set=digits_set, method=method,
                         init_variables=donor.variables)
    _, cold = loop.train(config, str(tmp_path / "cold"), training_set=digits_set, method=method)
    for a, b in zip(jax.tree.leaves(warm.params), jax.tree.leaves(donor.params)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-20)
    assert not all(np.allclose(a, b) for a, b in zip(jax.tree.leaves(cold.params),
                                                     jax.tree.leaves(donor.params)))


def test_the_loop_trains_an_ot_softmax_sweep_whose_member_equals_the_single_run(tmp_path):
    # OT-softmax is an ordinary objective: the same loop, sweep path and step run it.
    from dsink_jax.train.objectives import make_ot_softmax_objective

    config = pipelines.ot_softmax.build_config(dict(pipelines.ot_softmax.ARGS, preset="smoke"))
    config.progress = False
    config.optim.epochs = 1
    training_set = pipelines.prepare_training_set(config)
    objective = make_ot_softmax_objective(config.ot_softmax,
                                          class_counts=training_set.noisy_class_counts)
    method = pipelines.build_method(config, training_set, objective=objective)
    single, _ = loop.train(config, str(tmp_path / "single"), training_set=training_set,
                           method=method)
    states = [step_lib.init_state(method, jax.random.PRNGKey(seed), training_set.x_train[:1])
              for seed in (config.seed, config.seed + 1)]
    stacked = jax.tree.map(lambda *xs: jax.numpy.stack(xs), *states)
    members, _ = loop.train(config, str(tmp_path / "sweep"), training_set=training_set,
                            method=method, members=loop.Members(("seed0", "seed1"), stacked))
    assert members[0]["test_accuracy"] == pytest.approx(single["test_accuracy"], abs=1e-9)
    assert members[0]["per_class_accuracy"] == pytest.approx(single["per_class_accuracy"],
                                                             abs=1e-9)
    assert members[1]["params_fingerprint"] != members[0]["params_fingerprint"]
    for name in ("seed0", "seed1"):
        assert (tmp_path / "sweep" / name / "results.json").exists()
