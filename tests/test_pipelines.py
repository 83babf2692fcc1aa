"""End-to-end pipelines on the bundled digits (smoke preset): D-SINK table, plots, reuse, sweep."""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from dsink_jax import configs, pipelines

# The tests share a module fixture: one worker builds it once.
pytestmark = pytest.mark.xdist_group("dsink_run")


def dsink_smoke_config(**overrides):
    args = dict(pipelines.dsink.ARGS, preset="smoke", noise="sym", noise_rate=0.3)
    args.update(overrides)
    config = pipelines.dsink.build_config(args)
    config.progress = False
    return config


@pytest.fixture(scope="module")
def dsink_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("dsink"))
    summary = pipelines.run(dsink_smoke_config(), workdir)
    return workdir, summary


def test_dsink_pipeline_writes_table_plots_and_stages(dsink_run):
    workdir, summary = dsink_run
    names = [row["name"] for row in summary["stages"]]
    assert names == ["baseline", "imbalance_teacher", "noise_teacher", "student"]
    on_disk = json.loads(open(os.path.join(workdir, "results.json")).read())
    # The results say how they were made.
    assert on_disk["config"]["dsink"]["alpha"] == 2.0 and on_disk["wall_seconds"] > 0
    assert {"versions", "jax_backend", "device_kind", "device_count", "process_count",
            "git_commit"} <= set(on_disk["provenance"])
    student = on_disk["stages"][-1]
    for key in ("test_accuracy", "many_shot_accuracy", "few_shot_accuracy", "correction_rate",
                "allocation_accuracy", "allocation_correction"):
        assert student[key] is not None, key
    assert 0 <= student["allocation_accuracy"] <= 1
    table = open(os.path.join(workdir, "results.md")).read()
    assert "| student | dsink |" in table and "alloc. acc." in table
    for png in ("per_class_accuracy.png", "correction_rate.png"):
        with open(os.path.join(workdir, "plots", png), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    # Teachers live under their loss's name, the student under dsink.stage_name; the default
    # f_N is CE, the baseline's loss, so that stage is trained once and serves both roles.
    for stage in ("ce", "la", "student"):
        assert os.path.exists(os.path.join(workdir, stage, "results.json"))
        assert os.listdir(os.path.join(workdir, stage, "checkpoints"))
    assert sorted(os.listdir(workdir)) == ["ce", "la", "plots", "results.json", "results.md",
                                           "student"]
    rows = {row["name"]: row for row in summary["stages"]}
    assert rows["noise_teacher"]["loss"] == rows["baseline"]["loss"] == "ce"
    assert rows["noise_teacher"]["params_fingerprint"] == rows["baseline"]["params_fingerprint"]
    # The student's post-hoc corrections are evaluated and recorded.
    assert set(student["posthoc"]) == {"raw", "label_prior", "class_mass"}  # online: f_L mass
    assert student["posthoc"]["raw"]["test_accuracy"] == pytest.approx(student["test_accuracy"])


def test_teachers_are_not_checkpointed_with_the_student(dsink_run):
    import orbax.checkpoint as ocp

    from dsink_jax.train import step as step_lib

    workdir, _ = dsink_run
    config = dsink_smoke_config()
    training_set = pipelines.prepare_training_set(config)
    teachers = pipelines.dsink.train_teachers(config, workdir, training_set)
    method = pipelines.build_method(config, training_set, objective=teachers["objective"],
                                    teacher_models=teachers["teacher_models"])
    student = step_lib.init_state(method, jax.random.PRNGKey(0), training_set.x_train[:1])
    manager = ocp.CheckpointManager(os.path.join(workdir, "student", "checkpoints"),
                                    item_handlers=ocp.StandardCheckpointHandler())
    saved = jax.tree.leaves(manager.item_metadata(manager.latest_step()),
                            is_leaf=lambda x: hasattr(x, "shape"))
    # Exactly the student's state, leaf for leaf: two teachers' parameters would double it.
    assert sorted(tuple(x.shape) for x in saved) == sorted(
        tuple(x.shape) for x in jax.tree.leaves(student))
    teacher_size = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(
        teachers["teacher_variables"]))
    assert teacher_size > 0
    assert sum(int(np.prod(x.shape)) for x in saved) == sum(
        int(np.prod(x.shape)) for x in jax.tree.leaves(student))


def test_finished_stages_are_reused(dsink_run, capsys):
    workdir, first = dsink_run
    again = pipelines.run(dsink_smoke_config(), workdir)
    out = capsys.readouterr().out
    assert out.count("reusing the finished stage") == 4
    assert [r["params_fingerprint"] for r in again["stages"]] == [
        r["params_fingerprint"] for r in first["stages"]]


def test_teacher_processes_train_the_teachers_at_once_to_the_same_models(dsink_run, tmp_path,
                                                                         capsys):
    workdir, first = dsink_run
    config = dsink_smoke_config()
    config.dsink.teacher_processes = 2
    assert pipelines.dsink.pretrain_teachers(config, str(tmp_path)) == ["ce", "la"]
    assert pipelines.dsink.pretrain_teachers(config, str(tmp_path)) == []  # finished: reused
    # The pipeline reuses them, and the students of 1 and 2 processes are one stage.
    shutil.copytree(os.path.join(workdir, "student"), os.path.join(tmp_path, "student"))
    capsys.readouterr()
    again = pipelines.run(config, str(tmp_path))
    assert capsys.readouterr().out.count("reusing the finished stage") == 4
    assert [r["params_fingerprint"] for r in again["stages"]] == [
        r["params_fingerprint"] for r in first["stages"]]
    config.dsink.teacher_processes = 0
    with pytest.raises(configs.ConfigError, match="teacher_processes=0 must be >= 1"):
        pipelines.dsink.validate(config)


def test_class_mass_from_the_clean_labels_is_the_clean_distribution(dsink_run):
    """The diagnostic `dsink.class_mass_source=clean_labels`: the allocation is held to the clean
    class distribution instead of f_L's estimate, and the option is in the student's identity
    only where it is set (finished students of before it stay reusable)."""
    workdir, _ = dsink_run
    config = dsink_smoke_config()
    training_set = pipelines.prepare_training_set(config)
    estimated = pipelines.dsink.train_teachers(config, workdir, training_set)["class_mass"]
    assert "class_mass_source" not in pipelines.dsink.identity_options(config.dsink)
    config.dsink.class_mass_source = "clean_labels"
    pipelines.dsink.validate(config)
    clean = pipelines.dsink.train_teachers(config, workdir, training_set)["class_mass"]
    counts = training_set.class_counts
    np.testing.assert_allclose(clean, counts / counts.sum(), rtol=1e-6)
    # Under 30 % symmetric noise f_L's label-prior mass is the noisy one, not the clean one.
    assert np.abs(estimated - clean).sum() > 0.05
    assert pipelines.dsink.identity_options(config.dsink)["class_mass_source"] == "clean_labels"
    config.dsink.allocation = "batch"  # a per-batch mass of f_L: refused before training
    with pytest.raises(configs.ConfigError, match="class_mass_source='clean_labels' is a fixed"):
        pipelines.dsink.validate(config)
    config.dsink.class_mass_source = "oracle"
    with pytest.raises(configs.ConfigError, match="allowed: imbalance_teacher, clean_labels"):
        pipelines.dsink.validate(config)
    # The student's prior: the given labels' by default (out of the identity), or the class mass.
    d = dsink_smoke_config().dsink
    assert "student_prior" not in pipelines.dsink.identity_options(d)
    d.student_prior = "class_mass"
    assert pipelines.dsink.identity_options(d)["student_prior"] == "class_mass"
    bad = dsink_smoke_config()
    bad.dsink.student_prior, bad.dsink.allocation = "class_mass", "batch"
    with pytest.raises(configs.ConfigError, match="student_prior=class_mass needs the training"):
        pipelines.dsink.validate(bad)


@pytest.mark.parametrize("overrides,trained", [
    (dict(allocation="dataset", base_loss="la", refresh_every_epochs=1, noise_loss="gce"), 1),
    (dict(allocation="online", base_loss="la", inference="class_mass"), 0),
    (dict(allocation="batch", init_from="imbalance_teacher", baseline_loss="none",
          class_mass_prior="none", student_logit_adjustment=0.0), 0),
])
def test_student_variants_reuse_the_teachers(dsink_run, capsys, overrides, trained):
    workdir, first = dsink_run
    config = dsink_smoke_config()
    with config.unlocked():
        for key, value in overrides.items():
            config.dsink[key] = value
        config.dsink.stage_name = "student_" + overrides["allocation"]
    summary = pipelines.run(config, workdir)
    out = capsys.readouterr().out
    teachers = 2 if overrides.get("baseline_loss") == "none" else 3
    assert out.count("reusing the finished stage") == teachers - trained
    names = [r["name"] for r in summary["stages"]]
    assert names[-1] == "student" and len(names) == teachers + 1
    student = summary["stages"][-1]
    assert student["dsink"]["allocation"] == overrides["allocation"]
    metrics = [json.loads(line) for line in open(
        os.path.join(workdir, config.dsink.stage_name, "metrics.jsonl"))]
    assert 0 <= metrics[-1]["train_allocation_accuracy"] <= 1
    if overrides["allocation"] != "batch":
        # Against f_L's class mass over the training set; the post-hoc table can divide it out.
        assert "class_mass" in student["posthoc"]
        assert metrics[-1]["train_marginal_error"] < 0.5
    if overrides["allocation"] == "online":
        assert metrics[-1]["train_potential_range"] > 0  # the class potential moved
        # inference=class_mass: the reported accuracy is the corrected one.
        assert student["test_accuracy"] == pytest.approx(
            student["posthoc"]["class_mass"]["test_accuracy"])
    # The teachers' parameters are untouched by the student's (warm-started) training.
    before = {r["loss"]: r["params_fingerprint"] for r in first["stages"][:-1]}
    reused = [r for r in summary["stages"][:-1] if r["loss"] in before]
    assert len(reused) == teachers - trained
    assert all(r["params_fingerprint"] == before[r["loss"]] for r in reused)


def test_cached_teachers_train_the_forward_students_without_augmentation(tmp_path):
    """With no augmentation the step's view is the eval image, so looking f_N up in its table
    (`dsink.teachers=cached`) trains the same student as running it on every step."""
    workdir = str(tmp_path)
    results = {}
    for mode in ("forward", "cached"):
        config = dsink_smoke_config(teachers=mode)
        config.data.crop_padding = 0  # digits: no flip either
        config.dsink.stage_name = f"student_{mode}"
        summary = pipelines.run(config, workdir)
        student = summary["stages"][-1]
        losses = [json.loads(line)["train_loss"] for line in open(
            os.path.join(workdir, config.dsink.stage_name, "metrics.jsonl"))]
        results[mode] = (student, losses)
    (forward, forward_losses), (cached, cached_losses) = results["forward"], results["cached"]
    np.testing.assert_allclose(cached_losses, forward_losses, rtol=1e-4)
    assert cached["per_class_accuracy"] == pytest.approx(forward["per_class_accuracy"])
    assert cached["allocation_accuracy"] == pytest.approx(forward["allocation_accuracy"],
                                                          abs=1e-3)
    # ... and the cached student's step holds tables, not the teacher's parameters.
    config = dsink_smoke_config(teachers="cached")
    config.data.crop_padding = 0
    training_set = pipelines.prepare_training_set(config)
    teachers = pipelines.dsink.train_teachers(config, workdir, training_set)
    (model,), (table,) = teachers["teacher_models"], teachers["teacher_variables"]
    assert type(model).__name__ == "CachedTeacher"
    assert table["log_probs"].shape == (training_set.num_train, training_set.num_classes)


def test_student_epochs_trains_only_the_student_longer(dsink_run, capsys):
    workdir, first = dsink_run
    config = dsink_smoke_config()
    config.dsink.student_epochs = config.optim.epochs + 1
    config.dsink.stage_name = "student_longer"
    summary = pipelines.run(config, workdir)
    assert capsys.readouterr().out.count("reusing the finished stage") == 3  # the teachers
    training_set = pipelines.prepare_training_set(config)
    steps = training_set.num_train // config.optim.batch_size
    on_disk = json.loads(open(os.path.join(workdir, "student_longer", "results.json")).read())
    assert on_disk["steps"] == (config.optim.epochs + 1) * steps
    assert on_disk["config"]["optim"]["epochs"] == config.optim.epochs + 1
    assert summary["stages"][1]["params_fingerprint"] == first["stages"][1]["params_fingerprint"]


def test_teacher_tables_too_large_fail_before_training(tmp_path, monkeypatch):
    monkeypatch.setattr(pipelines.dsink, "MAX_TEACHER_TABLE_BYTES", 1000)
    config = dsink_smoke_config(teachers="cached")
    with pytest.raises(configs.ConfigError, match=r"dsink.teachers=cached would hold 1 "
                                                  r"table\(s\) of \d+ x 10 .*teacher_cache_topk"):
        pipelines.run(config, str(tmp_path))
    config.dsink.teacher_cache_topk = 10
    with pytest.raises(configs.ConfigError, match="teacher_cache_topk=10 must be below the "
                                                  "number of classes 10"):
        pipelines.run(config, str(tmp_path))
    assert not os.listdir(tmp_path)


def test_sweep_member_equals_the_single_run_and_shares_teachers(dsink_run):
    workdir, summary = dsink_run
    config = dsink_smoke_config()
    grid = pipelines.dsink.parse_sweep([f"alpha=1,{config.dsink.alpha:g}"])
    result = pipelines.dsink.run_sweep(config, workdir, grid)
    members = {m["alpha"]: m for m in result["members"]}
    single = summary["stages"][-1]
    same = members[config.dsink.alpha]
    # The same student, trained inside the vmapped program: same predictions.
    assert same["test_accuracy"] == pytest.approx(single["test_accuracy"], abs=1e-9)
    assert same["per_class_accuracy"] == pytest.approx(single["per_class_accuracy"], abs=1e-9)
    assert os.path.exists(os.path.join(workdir, "sweep", "summary.md"))
    # Every member gets a single run's outputs: results, metrics per epoch, TensorBoard.
    for name in ("alpha1", f"alpha{config.dsink.alpha:g}"):
        member_dir = os.path.join(workdir, "sweep", name)
        on_disk = json.loads(open(os.path.join(member_dir, "results.json")).read())
        assert on_disk["diverged_at_step"] is None and "provenance" in on_disk
        epochs = [json.loads(l)["epoch"] for l in open(os.path.join(member_dir, "metrics.jsonl"))]
        assert epochs == list(range(1, config.optim.epochs + 1))
        assert os.listdir(os.path.join(member_dir, "tensorboard"))


def test_named_sweeps_stay_side_by_side_and_share_the_teachers(dsink_run, capsys):
    workdir, _ = dsink_run
    config = dsink_smoke_config()
    for name, alpha in (("sweep_a", 1.0), ("sweep_b", 3.0)):
        pipelines.dsink.run_sweep(config, workdir, {"alpha": [alpha]}, name=name)
    assert capsys.readouterr().out.count("reusing the finished stage") == 6  # 3 teachers x 2
    for name, member in (("sweep_a", "alpha1"), ("sweep_b", "alpha3")):
        summary = json.loads(open(os.path.join(workdir, name, "summary.json")).read())
        assert [m["name"] for m in summary["members"]] == [member]
    for bad in ("student", "ce", "a/b", ""):
        with pytest.raises(configs.ConfigError, match="sweep name"):
            pipelines.dsink.run_sweep(config, workdir, {"alpha": [1.0]}, name=bad)


def test_a_diverged_member_is_reported_and_the_others_go_on(dsink_run):
    workdir, _ = dsink_run
    config = dsink_smoke_config()
    grid = {"learning_rate": [config.optim.learning_rate, 1e30]}
    result = pipelines.dsink.run_sweep(config, workdir, grid)
    rows = {r["learning_rate"]: r for r in result["members"]}
    bad, good = rows[1e30], rows[config.optim.learning_rate]
    assert bad["diverged_at_step"] is not None and good["diverged_at_step"] is None
    assert result["members"][-1] is bad  # ranked last
    assert np.isfinite(good["test_accuracy"]) and good["test_accuracy"] > 0.1
    table = open(os.path.join(workdir, "sweep", "summary.md")).read()
    assert f"(diverged at step {bad['diverged_at_step']})" in table


@pytest.mark.parametrize("spec,message", [
    (["beta=1,2"], "cannot sweep 'beta'; allowed: alpha, epsilon"),
    (["alpha=x"], "values must be numbers"),
    (["alpha"], "not of the form"),
])
def test_bad_sweep_specs(spec, message):
    with pytest.raises(ValueError, match=message):
        pipelines.dsink.parse_sweep(spec)


def test_bad_dsink_options_fail_before_training(tmp_path):
    config = dsink_smoke_config()
    config.dsink.epsilon = 0.0
    with pytest.raises(configs.ConfigError, match="dsink.epsilon=0.0 must be >= 0.0001"):
        pipelines.run(config, str(tmp_path))
    assert not os.listdir(tmp_path)


def test_auto_noise_teacher_follows_the_final_schedule(tmp_path):
    """noise_loss="auto": CE up to AUTO_CE_MAX_EPOCHS epochs, GCE beyond, read from the final
    config (an `--config.optim.epochs` override counts); a loss name is used as given."""
    limit = pipelines.dsink.AUTO_CE_MAX_EPOCHS
    config = dsink_smoke_config()
    assert config.dsink.noise_loss == "auto"
    losses = lambda c: pipelines.dsink.teacher_losses(c)["noise_teacher"]
    config.optim.epochs = limit
    assert losses(config) == "ce"
    config.optim.epochs = limit + 1
    assert losses(config) == "gce"
    config.dsink.noise_loss = "sce"
    assert losses(config) == "sce"
    config.dsink.baseline_loss = "none"
    assert set(pipelines.dsink.teacher_losses(config)) == {"imbalance_teacher", "noise_teacher"}
    config.dsink.noise_loss = "robust"
    with pytest.raises(configs.ConfigError, match="dsink.noise_loss='robust'; allowed: auto, "):
        pipelines.run(config, str(tmp_path))


def test_ot_softmax_family_trains_end_to_end(tmp_path):
    from dsink_jax.models import classifier_weights
    from dsink_jax.ot import cell_masses, sample_unit_sphere
    from dsink_jax.train import step as step_lib
    from dsink_jax.train.checkpoint import Checkpointer
    from dsink_jax.train.objectives import make_ot_softmax_objective

    args = dict(pipelines.ot_softmax.ARGS, preset="smoke", inference="balanced")
    config = pipelines.ot_softmax.build_config(args)
    config.progress = False
    config.ot_softmax.references = ("ce",)
    summary = pipelines.run(config, str(tmp_path))
    names = [row["name"] for row in summary["stages"]]
    assert names == ["ce", "ot_softmax"]
    row = summary["stages"][-1]
    assert 0.2 < row["test_accuracy"] <= 1.0  # two smoke epochs learn (chance is 0.1)
    assert "| ot_softmax | ot_softmax |" in open(os.path.join(tmp_path, "results.md")).read()
    # The final state: heights re-solved towards the class frequencies, and the reported
    # accuracy is that of s cos(W, z) + the balanced heights.
    training_set = pipelines.prepare_training_set(config)
    objective = make_ot_softmax_objective(config.ot_softmax,
                                          class_counts=training_set.noisy_class_counts)
    method = pipelines.build_method(config, training_set, objective=objective)
    template = step_lib.init_state(method, jax.random.PRNGKey(0), training_set.x_train[:1])
    state, _ = Checkpointer(os.path.join(tmp_path, "ot_softmax", "checkpoints")).restore_latest(
        template)
    weights = classifier_weights(state.params)
    counts = np.maximum(training_set.noisy_class_counts, 1)
    nu = counts / counts.sum()
    points = sample_unit_sphere(jax.random.key(5), 50_000, weights.shape[1])
    error = lambda h: np.max(np.abs(np.asarray(cell_masses(
        weights, h, scale=config.ot_softmax.scale, points=points)) - nu))
    assert error(state.extra["potential"]) < 0.5 * error(np.zeros_like(nu))
    logits = step_lib.test_logits(state, training_set.x_test, method=method)
    accuracy = float(np.mean(np.asarray(logits).argmax(-1) == training_set.y_test))
    assert accuracy == pytest.approx(row["test_accuracy"], abs=1e-9)
    raw = np.asarray(logits - state.extra["balanced_potential"]).argmax(-1)
    assert not np.array_equal(raw, np.asarray(logits).argmax(-1))  # the heights matter
    metrics = [json.loads(line) for line in
               open(os.path.join(tmp_path, "ot_softmax", "metrics.jsonl"))]
    assert metrics[-1]["train_potential_range"] > 0


def test_bad_ot_softmax_options_fail_before_training(tmp_path):
    config = pipelines.ot_softmax.build_config(dict(pipelines.ot_softmax.ARGS, preset="smoke"))
    config.ot_softmax.temperature = 0.0
    with pytest.raises(configs.ConfigError, match="ot_softmax.temperature=0.0 must be > 0"):
        pipelines.run(config, str(tmp_path))


def test_a_changed_config_never_resumes_an_old_stage(tmp_path, capsys):
    config = dsink_smoke_config()
    config.optim.epochs = 1
    pipelines.baseline.run(config, str(tmp_path))
    changed = dsink_smoke_config()
    changed.optim.epochs = 1
    changed.optim.learning_rate = 0.01
    pipelines.baseline.run(changed, str(tmp_path))
    assert "holds a stage of another configuration: retraining" in capsys.readouterr().out
    stage = json.loads(open(os.path.join(tmp_path, "ce", "results.json")).read())
    assert stage["config"]["optim"]["learning_rate"] == 0.01


def test_a_stage_dir_of_another_identity_is_cleared_before_reuse(tmp_path, capsys):
    stage = str(tmp_path / "sweep")
    assert not pipelines.common.claim_stage_dir(stage, {"members": [1, 2]}, "sweep")
    open(os.path.join(stage, "checkpoint"), "w").close()
    assert pipelines.common.claim_stage_dir(stage, {"members": [1, 2]}, "sweep")
    assert os.path.exists(os.path.join(stage, "checkpoint"))  # same identity: kept
    assert not pipelines.common.claim_stage_dir(stage, {"members": [1, 3]}, "sweep")
    assert not os.path.exists(os.path.join(stage, "checkpoint"))  # another grid: cleared
    assert "holds a stage of another configuration" in capsys.readouterr().out
