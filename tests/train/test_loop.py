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


@pytest.mark.parametrize("loss", ["elr", "ldam_drw"])
def test_interrupted_run_resumes_to_identical_parameters(tmp_path, digits_set, loss):
    # ELR carries per-sample memory and LDAM-DRW switches weights by step: both must resume.
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
    assert sorted(os.listdir(tmp_path / "resumed" / "checkpoints"))[-1] == "2"
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
        pipelines.check_before_training(smoke_config(), str(blocker / "sub"))
