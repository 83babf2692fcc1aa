"""Experiment pipelines: a config in, trained stages and a results table out.

Each function here is what `experiments/main.py` calls for one experiment family; they are
importable so a notebook or a test runs exactly what the command line runs.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
from typing import Any, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from dsink_jax import configs as configs_lib
from dsink_jax import data as data_lib
from dsink_jax import plots
from dsink_jax.dsink import global_class_mass
from dsink_jax.models import get_model
from dsink_jax.train import loop, optim, parallel
from dsink_jax.train import step as step_lib
from dsink_jax.train.checkpoint import Checkpointer
from dsink_jax.train.objectives import (ALLOCATION_TEACHERS, LOSS_KIND, Objective,
                                        dataset_allocation_refresh, make_dsink_objective,
                                        make_objective)

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def prepare_training_set(config) -> data_lib.TrainingSet:
    """Loads the configured source and applies the long tail, then the label noise."""
    data = config.data
    dataset = data_lib.load_dataset(configs_lib.dataset_spec(data.dataset),
                                    data_dir=data.data_dir or None)
    return data_lib.make_training_set(
        dataset, imbalance_ratio=data.imbalance, profile=data.profile, noise=data.noise,
        noise_rate=data.noise_rate, seed=config.seed, real_noise_key=data.real_noise_key or None)


def augment_for(config, training_set: data_lib.TrainingSet) -> step_lib.Augment:
    """Augmentation constants: per-channel statistics of the training images."""
    mean, std = data_lib.channel_stats(training_set.x_train)
    return step_lib.Augment(mean=tuple(float(m) for m in mean), std=tuple(float(s) for s in std),
                            crop_padding=int(config.data.crop_padding),
                            flip=bool(config.data.flip))


def make_model(config, num_classes: int, *, head: str = "linear"):
    return get_model(config.model.name, num_classes=num_classes, width=config.model.width,
                     head=head, dtype=_DTYPES[config.model.dtype])


def build_method(config, training_set: data_lib.TrainingSet, *, loss: str | None = None,
                 objective: Objective | None = None, teacher_models: tuple = ()
                 ) -> step_lib.Method:
    """The supervised method of a config: model, SGD, the bound loss, augmentation.

    Args:
      config: experiment config.
      training_set: the data (class counts and size bind the loss).
      loss: a loss name overriding `config.loss`.
      objective: a ready objective (e.g. D-SINK's); overrides `loss`.
      teacher_models: frozen modules whose logits the objective receives.
    """
    steps_per_epoch = training_set.x_train.shape[0] // config.optim.batch_size
    if objective is None:
        objective = make_objective(
            loss or config.loss, config.loss_options,
            class_counts=training_set.noisy_class_counts, num_train=training_set.x_train.shape[0],
            steps_per_epoch=steps_per_epoch, epochs=config.optim.epochs)
    return step_lib.Method(
        model=make_model(config, training_set.num_classes, head=objective.head),
        tx=optim.from_config(config.optim, steps_per_epoch=max(steps_per_epoch, 1)),
        objective=objective, augment=augment_for(config, training_set),
        teacher_models=tuple(teacher_models))


def check_before_training(config, workdir: str) -> None:
    """Every check that can fail fast: config values and the workdir."""
    configs_lib.validate_config(config)
    loop.ensure_writable_dir(workdir)


# --------------------------------------------------------------------------- tables

TABLE_COLUMNS = (
    ("test_accuracy", "overall"),
    ("many_shot_accuracy", "many"),
    ("medium_shot_accuracy", "medium"),
    ("few_shot_accuracy", "few"),
    ("correction_rate", "corrected"),
)


def format_percent(value: Any) -> str:
    """A fraction as a percentage with one decimal ("-" for None); other values as text."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{100 * value:.1f}"
    return str(value)


def results_table(rows: Iterable[dict], *, extra_columns: tuple = ()) -> str:
    """A Markdown table of stage results (accuracies in %)."""
    columns = TABLE_COLUMNS + tuple(extra_columns)
    header = "| stage | loss | " + " | ".join(title for _, title in columns) + " |"
    lines = [header, "|" + "---|" * (len(columns) + 2)]
    for row in rows:
        cells = [row.get("name", "?"), row.get("loss", "?")]
        cells += [format_percent(row.get(key)) for key, _ in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def data_header(training_set: data_lib.TrainingSet) -> str:
    s = training_set
    return (f"{s.name} ({s.source}): {s.x_train.shape[0]} training images, ratio "
            f"{s.imbalance_ratio:g} ({s.profile}), noise {s.noise} {s.noise_rate:g} "
            f"(realised {s.realised_noise_rate:.3f}), {s.x_test.shape[0]} test images")


def write_summary(workdir: str, rows: list[dict], training_set: data_lib.TrainingSet,
                  *, extra_columns: tuple = (), extra: dict | None = None) -> str:
    """Writes `results.json` and `results.md` for a pipeline and returns the Markdown."""
    table = results_table(rows, extra_columns=extra_columns)
    markdown = (f"# Results\n\n{data_header(training_set)}\n\n"
                "Accuracies in % on the clean test set; many > 100, few < 20 training images; "
                "corrected = mislabelled training samples predicted as their true label.\n\n"
                f"{table}\n")
    if parallel.is_writer():
        with open(os.path.join(workdir, "results.md"), "w") as f:
            f.write(markdown)
    summary = {"data": training_set.summary(), "stages": rows, **(extra or {})}
    loop.write_json(os.path.join(workdir, "results.json"), summary)
    return markdown


def _stage_row(name: str, loss: str, results: dict) -> dict:
    keep = ("test_accuracy", "many_shot_accuracy", "medium_shot_accuracy", "few_shot_accuracy",
            "correction_rate", "images_per_sec", "params_fingerprint", "per_class_accuracy")
    return {"name": name, "loss": loss, "robust_to": LOSS_KIND.get(loss, "-"),
            **{k: results.get(k) for k in keep}}


# --------------------------------------------------------------------------- baseline

def run_baseline(config, workdir: str) -> dict:
    """The `baseline` family: one model trained with `config.loss`.

    Writes `workdir/results.json`, `workdir/results.md` and the stage's own outputs under
    `workdir/<loss>/`. Returns the summary dict.
    """
    check_before_training(config, workdir)
    training_set = prepare_training_set(config)
    method = build_method(config, training_set)
    stage_dir = os.path.join(workdir, config.loss)
    results, _ = train_or_reuse_stage(config, stage_dir, training_set=training_set,
                                      method=method, name=config.loss,
                                      identity=_stage_identity(config, config.loss))
    rows = [_stage_row(config.loss, config.loss, results)]
    markdown = write_summary(workdir, rows, training_set)
    print(markdown)
    return json.loads(json.dumps({"stages": rows}, default=str))


# --------------------------------------------------------------------------- D-SINK

def _stage_identity(config, loss: str) -> dict:
    """What determines a trained auxiliary stage; a finished stage is reused when it matches."""
    c = config.to_dict()
    return {"data": c["data"], "model": c["model"], "optim": c["optim"], "seed": c["seed"],
            "loss": loss, "loss_options": c["loss_options"]}


def train_or_reuse_stage(config, stage_dir: str, *, training_set, method, name: str,
                         identity: dict, **train_kwargs) -> tuple[dict, Any]:
    """Trains a stage, or reuses it when `stage_dir` holds a finished run of the same identity.

    `stage_dir/identity.json` records what the stage is (data, model, optimizer, seed, loss and
    its options) when it starts. A finished stage (`results.json`, final checkpoint) of the same
    identity is reused, its state restored from the checkpoint; an unfinished one resumes from
    its checkpoints. A stage of another identity (a changed config) is removed and retrained,
    so a resume never continues someone else's run.
    """
    identity = json.loads(json.dumps(identity))  # as it reads back from JSON
    identity_path = os.path.join(stage_dir, "identity.json")
    results_path = os.path.join(stage_dir, "results.json")
    if os.path.exists(stage_dir):
        previous_identity = None
        if os.path.exists(identity_path):
            with open(identity_path) as f:
                previous_identity = json.load(f)
        if previous_identity != identity:
            print(f"[{name}] {stage_dir} holds a stage of another configuration: retraining")
            if parallel.is_writer():
                shutil.rmtree(stage_dir)
        elif os.path.exists(results_path):
            template = step_lib.init_state(method, jax.random.PRNGKey(config.seed),
                                           training_set.x_train[:1])
            restored = Checkpointer(os.path.join(stage_dir, "checkpoints"),
                                    keep=config.keep_checkpoints).restore_latest(template)
            if restored is not None and restored[1] == config.optim.epochs:
                print(f"[{name}] reusing the finished stage in {stage_dir}")
                with open(results_path) as f:
                    return json.load(f), restored[0]
    loop.ensure_writable_dir(stage_dir)
    loop.write_json(identity_path, identity)
    results, state = loop.train(config, stage_dir, training_set=training_set, method=method,
                                name=name, **train_kwargs)
    results["identity"] = identity
    loop.write_json(results_path, results)
    return results, state


TEACHER_ROLES = (("baseline", "baseline_loss"), ("imbalance_teacher", "imbalance_loss"),
                 ("noise_teacher", "noise_loss"))


def train_teachers(config, workdir: str, training_set) -> dict:
    """Trains (or reuses) the CE baseline and the two auxiliaries of the `dsink` family.

    Each stage lives in `workdir/<loss>/`, named by its loss, so that trying another f_N or f_L
    in the same workdir adds a stage instead of replacing one. `dsink.baseline_loss="none"`
    skips the reference stage (it does not feed the student).

    Returns:
      {"rows": table rows, "curves": correction-rate curves, "objective": the student's bound
       D-SINK objective, "teacher_models" / "teacher_variables": the frozen modules and
       variables whose logits the student's step needs (per `dsink.allocation`),
       "refresh_extra": the loop hook of the "dataset" allocation (else None), "class_mass":
       the training-set class mass of f_L (None in the "batch" mode with `class_mass=batch`),
       "stage_variables": {role: (model, variables)}, "fingerprints": the teachers' parameter
       hashes}.
    """
    d = config.dsink
    rows, curves, stages = [], {}, {}
    for role, field in TEACHER_ROLES:
        loss = d[field]
        if loss == "none":
            continue
        method = build_method(config, training_set, loss=loss)
        stage_dir = os.path.join(workdir, loss)
        results, state = train_or_reuse_stage(
            config, stage_dir, training_set=training_set, method=method, name=role,
            identity=_stage_identity(config, loss))
        rows.append(_stage_row(role, loss, results))
        curves[role] = plots.read_metric_curve(os.path.join(stage_dir, "metrics.jsonl"),
                                               "correction_rate")
        stages[role] = (method.model, state.variables)

    noise_model, noise_vars = stages["noise_teacher"]
    imbalance_model, imbalance_vars = stages["imbalance_teacher"]
    steps_per_epoch = training_set.x_train.shape[0] // config.optim.batch_size
    augment = augment_for(config, training_set)

    def train_logits(model, variables):  # eval mode, unaugmented training images
        predict = jax.jit(lambda v, x: step_lib.predict_logits(v, x, model=model,
                                                               augment=augment))
        return step_lib.batched_predict(predict, variables, training_set.x_train,
                                        config.eval_batch_size)

    class_mass = None
    if d.class_mass == "global" or d.allocation != "batch":
        class_mass = np.asarray(global_class_mass(train_logits(imbalance_model, imbalance_vars)))
    objective = make_dsink_objective(d, clean_labels=training_set.clean_labels,
                                     steps_per_epoch=steps_per_epoch, class_mass=class_mass,
                                     class_counts=training_set.noisy_class_counts,
                                     la_tau=config.loss_options.la_tau)
    by_role = {"noise": (noise_model, noise_vars), "imbalance": (imbalance_model, imbalance_vars)}
    needed = [by_role[r] for r in ALLOCATION_TEACHERS[d.allocation]]
    refresh = None
    if d.allocation == "dataset":
        refresh = dataset_allocation_refresh(
            d, noise_teacher_logits=train_logits(noise_model, noise_vars), class_mass=class_mass,
            class_counts=training_set.noisy_class_counts, train_images=training_set.x_train,
            every_epochs=int(d.refresh_every_epochs))
    return {"rows": rows, "curves": curves, "objective": objective,
            "teacher_models": tuple(m for m, _ in needed),
            "teacher_variables": tuple(v for _, v in needed),
            "refresh_extra": refresh, "class_mass": class_mass, "stage_variables": stages,
            "fingerprints": [next(r["params_fingerprint"] for r in rows if r["name"] == role)
                             for role in ("imbalance_teacher", "noise_teacher")]}


def inference_priors(config, training_set, class_mass: np.ndarray | None) -> dict:
    """The class priors a post-hoc correction may divide out: {name: [C] or None}.

    "raw": no correction; "label_prior": the given-label distribution; "class_mass": f_L's class
    mass over the training set (the allocation's class marginal in the dataset modes).
    """
    counts = np.maximum(training_set.noisy_class_counts, 1).astype(np.float64)
    priors = {"raw": None, "label_prior": counts / counts.sum()}
    if class_mass is not None:
        priors["class_mass"] = np.asarray(class_mass, np.float64)
    return priors


def posthoc_evaluations(config, training_set, method, state, priors: dict) -> dict:
    """Test summaries of the final model under each post-hoc correction (logits - log prior).

    One forward pass over the test set; returns {name: {"test_accuracy", "many_shot_accuracy",
    "medium_shot_accuracy", "few_shot_accuracy", "per_class_accuracy"}}.
    """
    mesh = parallel.make_mesh(config.num_devices)
    rep, sharded = parallel.replicated(mesh), parallel.batch_sharded(mesh)
    predict = jax.jit(lambda s, x: step_lib.predict_logits(s.variables, x, model=method.model,
                                                           augment=method.augment),
                      in_shardings=(rep, sharded), out_shardings=rep)
    batch = -(-config.eval_batch_size // mesh.devices.size) * mesh.devices.size
    logits = step_lib.batched_predict(predict, parallel.replicate(state, mesh),
                                      training_set.x_test, batch,
                                      put=functools.partial(parallel.global_batch, mesh=mesh))
    out = {}
    for name, prior in priors.items():
        adjusted = logits if prior is None else logits - np.log(np.maximum(prior, 1e-12))
        summary = loop.summarise_predictions(adjusted.argmax(-1), None, training_set, config)
        out[name] = {k: summary[k] for k in ("test_accuracy", "many_shot_accuracy",
                                             "medium_shot_accuracy", "few_shot_accuracy",
                                             "per_class_accuracy")}
    return out


def run_dsink(config, workdir: str) -> dict:
    """The `dsink` family: CE baseline, f_L, f_N, then the D-SINK student (METHOD.md §1).

    Each stage trains in its own directory of `workdir` (teachers under their loss's name, the
    student under `dsink.stage_name`) with its own checkpoints and `results.json`; a finished
    stage is reused when the command runs again. The teachers are frozen and passed to the
    student's step as arguments, never checkpointed with it. Writes `workdir/results.json`,
    `workdir/results.md` and `workdir/plots/*.png`; returns the summary.
    """
    check_before_training(config, workdir)
    configs_lib.validate_dsink_config(config)
    training_set = prepare_training_set(config)
    d = config.dsink
    teachers = train_teachers(config, workdir, training_set)
    rows, curves = teachers["rows"], teachers["curves"]
    method = build_method(config, training_set, objective=teachers["objective"],
                          teacher_models=teachers["teacher_models"])
    init_variables = None
    if d.init_from == "imbalance_teacher":
        init_variables = teachers["stage_variables"]["imbalance_teacher"][1]
    priors = inference_priors(config, training_set, teachers["class_mass"])
    shift = (None if priors[d.inference] is None
             else -np.log(np.maximum(priors[d.inference], 1e-12)).astype(np.float32))

    def predict_fn(state, images):
        logits = step_lib.predict_logits(state.variables, images, model=method.model,
                                         augment=method.augment)
        return logits if shift is None else logits + shift

    student_dir = os.path.join(workdir, d.stage_name)
    identity = {**_stage_identity(config, "dsink"), "dsink": d.to_dict(),
                "teachers": teachers["fingerprints"]}
    results, state = train_or_reuse_stage(
        config, student_dir, training_set=training_set, method=method, name=d.stage_name,
        identity=identity, teacher_variables=teachers["teacher_variables"],
        refresh_extra=teachers["refresh_extra"], init_variables=init_variables,
        predict_fn=predict_fn)
    student_row = _stage_row("student", "dsink", results)
    student_row["posthoc"] = posthoc_evaluations(config, training_set, method, state, priors)
    student_row["dsink"] = d.to_dict()
    metrics_path = os.path.join(student_dir, "metrics.jsonl")
    epochs, values = plots.read_metric_curve(metrics_path, "train_allocation_accuracy")
    student_row["allocation_accuracy"] = values[-1] if values else None
    _, corr = plots.read_metric_curve(metrics_path, "train_allocation_correction")
    student_row["allocation_correction"] = corr[-1] if corr else None
    rows.append(student_row)
    curves["student"] = plots.read_metric_curve(metrics_path, "correction_rate")
    curves["student allocation (train, running)"] = plots.read_metric_curve(
        metrics_path, "train_allocation_correction")

    plot_dir = os.path.join(workdir, "plots")
    os.makedirs(plot_dir, exist_ok=True)
    plots.per_class_accuracy_vs_size(rows, training_set.class_counts,
                                     os.path.join(plot_dir, "per_class_accuracy.png"))
    plots.correction_over_epochs(curves, os.path.join(plot_dir, "correction_rate.png"))
    markdown = write_summary(
        workdir, rows, training_set,
        extra_columns=(("allocation_accuracy", "alloc. acc."),
                       ("allocation_correction", "alloc. corrected")),
        extra={"dsink": d.to_dict(), "allocation_accuracy_curve": {"epochs": epochs,
                                                                 "values": values}})
    print(markdown)
    return {"stages": rows}


# --------------------------------------------------------------------------- OT-dynamic softmax

def run_ot_softmax(config, workdir: str) -> dict:
    """The `ot_softmax` family: reference losses (CE, LA, Balanced Softmax), then the
    OT-dynamic softmax model with SupCon (METHOD.md §2), all on the same data.

    Writes `workdir/results.json`, `workdir/results.md`, `workdir/plots/per_class_accuracy.png`
    and one directory per stage.
    """
    from dsink_jax.train import ot_softmax as ots

    check_before_training(config, workdir)
    configs_lib.validate_ot_softmax_config(config)
    training_set = prepare_training_set(config)
    o = config.ot_softmax
    rows = []
    for loss in o.references:
        method = build_method(config, training_set, loss=loss)
        results, _ = train_or_reuse_stage(
            config, os.path.join(workdir, loss), training_set=training_set, method=method,
            name=loss, identity=_stage_identity(config, loss))
        rows.append(_stage_row(loss, loss, results))

    options = ots.OTSoftmaxOptions.from_config(o, training_set.noisy_class_counts)
    steps_per_epoch = training_set.x_train.shape[0] // config.optim.batch_size
    backbone = make_model(config, training_set.num_classes, head="cosine")
    method = step_lib.Method(
        model=ots.OTSoftmaxNet(backbone=backbone, projection_dim=int(o.projection_dim)),
        tx=optim.from_config(config.optim, steps_per_epoch=max(steps_per_epoch, 1)),
        objective=ots.potential_objective(training_set.num_classes),
        augment=augment_for(config, training_set))
    results, _ = train_or_reuse_stage(
        config, os.path.join(workdir, "ot_softmax"), training_set=training_set, method=method,
        name="ot_softmax", identity={**_stage_identity(config, "ot_softmax"),
                                     "ot_softmax": o.to_dict()},
        step_fn=functools.partial(ots.ot_softmax_step, method=method, options=options),
        predict_fn=functools.partial(ots.ot_softmax_predict, method=method, options=options))
    rows.append(_stage_row("ot_softmax", "ot_softmax", results))
    plot_dir = os.path.join(workdir, "plots")
    os.makedirs(plot_dir, exist_ok=True)
    plots.per_class_accuracy_vs_size(rows, training_set.class_counts,
                                     os.path.join(plot_dir, "per_class_accuracy.png"))
    markdown = write_summary(workdir, rows, training_set, extra={"ot_softmax": o.to_dict()})
    print(markdown)
    return {"stages": rows}


PIPELINES = {"baseline": run_baseline, "dsink": run_dsink, "ot_softmax": run_ot_softmax}


def run(config, workdir: str) -> dict:
    """Runs the pipeline of `config.family`."""
    if config.family not in PIPELINES:
        raise configs_lib.ConfigError(
            f"unknown family {config.family!r}; allowed: {', '.join(PIPELINES)}")
    return PIPELINES[config.family](config, workdir)
