"""What every experiment family shares: data, method, stages that resume or are reused, tables.

A family (`baseline`, `dsink`, `ot_softmax`, one module each in this package) turns a config into
trained stages and a results table; these are its building blocks.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from typing import Any, Iterable

import jax
import numpy as np

from dsink_jax import configs as configs_lib
from dsink_jax import data as data_lib
from dsink_jax import models as models_lib
from dsink_jax.train import feed as feed_lib
from dsink_jax.train import loop, optim, parallel
from dsink_jax.train import step as step_lib
from dsink_jax.train.checkpoint import Checkpointer
from dsink_jax.train.workdir import ensure_writable_dir, provenance, write_json
from dsink_jax.train.objectives import LOSS_KIND, Objective, make_objective


def prepare_training_set(config) -> data_lib.TrainingSet:
    """Loads the configured source and applies the long tail, then the label noise."""
    data = config.data
    dataset = data_lib.load_dataset(configs_lib.dataset_spec(data.dataset),
                                    data_dir=data.data_dir or None,
                                    bad_images=config.input.bad_images)
    return data_lib.make_training_set(
        dataset, imbalance_ratio=data.imbalance, profile=data.profile, noise=data.noise,
        noise_rate=data.noise_rate, seed=config.seed, real_noise_key=data.real_noise_key or None,
        image_size=config.input.image_size)


def augment_for(config, training_set: data_lib.TrainingSet) -> step_lib.Augment:
    """Augmentation constants: per-channel statistics of the training images (of ImageNet for a
    streaming source, whose images are cropped and flipped on the host instead)."""
    if training_set.stream is not None:
        return step_lib.Augment(mean=data_lib.IMAGENET_MEAN, std=data_lib.IMAGENET_STD,
                                crop_padding=0, flip=False)
    mean, std = data_lib.channel_stats(training_set.x_train)
    return step_lib.Augment(mean=tuple(float(m) for m in mean), std=tuple(float(s) for s in std),
                            crop_padding=int(config.data.crop_padding),
                            flip=bool(config.data.flip))


def make_model(config, num_classes: int, *, head: str = "linear"):
    return models_lib.get_model(config.model.name, num_classes=num_classes,
                                width=config.model.width, head=head,
                                dtype=models_lib.DTYPES[config.model.dtype])


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
    steps_per_epoch = training_set.num_train // config.optim.batch_size
    if objective is None:
        objective = make_objective(
            loss or config.loss, config.loss_options,
            class_counts=training_set.noisy_class_counts, num_train=training_set.num_train,
            steps_per_epoch=steps_per_epoch, epochs=config.optim.epochs)
    model = make_model(config, training_set.num_classes, head=objective.head)
    if objective.projection_dim:
        model = models_lib.ProjectionNet(backbone=model, projection_dim=objective.projection_dim)
    return step_lib.Method(
        model=model,
        tx=optim.from_config(config.optim, steps_per_epoch=max(steps_per_epoch, 1)),
        objective=objective, augment=augment_for(config, training_set),
        teacher_models=tuple(teacher_models))


def predict_split(config, training_set: data_lib.TrainingSet, model, variables, split: str,
                  *, augment: step_lib.Augment) -> np.ndarray:
    """A frozen model's eval-mode logits [n, C] on "train" (kept images, in index order) or
    "test", read as the training loop reads them (in memory or streamed), data parallel."""
    mesh = parallel.make_mesh(config.num_devices)
    rep, sharded = parallel.replicated(mesh), parallel.batch_sharded(mesh)
    feed = feed_lib.make_feed(training_set, mesh, batch_size=1, seed=config.seed,
                              eval_batch_size=config.eval_batch_size,
                              image_size=config.input.image_size,
                              workers=feed_lib.resolve_workers(config.input.workers))
    predict = jax.jit(lambda v, x: step_lib.predict_logits(v, x, model=model, augment=augment),
                      in_shardings=(rep, sharded), out_shardings=rep)
    return feed.predict(predict, parallel.replicate(variables, mesh), split)


def check_workdir(workdir: str) -> None:
    """Fails fast when the workdir cannot be written (after the family's `validate`)."""
    ensure_writable_dir(workdir)


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
    return (f"{s.name} ({s.source}): {s.num_train} training images, ratio "
            f"{s.imbalance_ratio:g} ({s.profile}), noise {s.noise} {s.noise_rate:g} "
            f"(realised {s.realised_noise_rate:.3f}), {s.y_test.shape[0]} test images")


def write_summary(workdir: str, rows: list[dict], training_set: data_lib.TrainingSet,
                  *, config, started: float, extra_columns: tuple = (),
                  extra: dict | None = None) -> str:
    """Writes `results.json` and `results.md` for a pipeline and returns the Markdown.

    `results.json` says how the results were made: the full config, the provenance (package
    versions, JAX backend, devices, processes, git commit) and the wall time since `started`
    (a `time.perf_counter()` reading at the pipeline's start; reused stages take ~0).
    """
    table = results_table(rows, extra_columns=extra_columns)
    markdown = (f"# Results\n\n{data_header(training_set)}\n\n"
                "Accuracies in % on the clean test set; many > 100, few < 20 training images; "
                "corrected = mislabelled training samples predicted as their true label.\n\n"
                f"{table}\n")
    if parallel.is_writer():
        with open(os.path.join(workdir, "results.md"), "w") as f:
            f.write(markdown)
    summary = {"data": training_set.summary(), "stages": rows, **(extra or {}),
               "wall_seconds": time.perf_counter() - started, "provenance": provenance(),
               "config": config.to_dict()}
    write_json(os.path.join(workdir, "results.json"), summary)
    return markdown


def stage_row(name: str, loss: str, results: dict) -> dict:
    keep = ("test_accuracy", "many_shot_accuracy", "medium_shot_accuracy", "few_shot_accuracy",
            "correction_rate", "images_per_sec", "params_fingerprint", "per_class_accuracy",
            "wall_seconds")
    return {"name": name, "loss": loss, "robust_to": LOSS_KIND.get(loss, "-"),
            **{k: results.get(k) for k in keep}}


def stage_identity(config, loss: str) -> dict:
    """What determines a trained auxiliary stage; a finished stage is reused when it matches."""
    c = config.to_dict()
    identity = {"data": c["data"], "model": c["model"], "optim": c["optim"], "seed": c["seed"],
                "loss": loss, "loss_options": c["loss_options"]}
    if data_lib.is_streaming_spec(configs_lib.dataset_spec(config.data.dataset)):
        # How a stream is read changes the images (not the worker count).
        identity["input"] = {"image_size": c["input"]["image_size"],
                             "bad_images": c["input"]["bad_images"]}
    return identity


def train_or_reuse_stage(config, stage_dir: str, *, training_set, method, name: str,
                         identity: dict, **train_kwargs) -> tuple[dict, Any]:
    """Trains a stage, or reuses it when `stage_dir` holds a finished run of the same identity.

    `stage_dir/identity.json` records what the stage is (data, model, optimizer, seed, loss and
    its options) when it starts. A finished stage (`results.json`, final checkpoint) of the same
    identity is reused, its state restored from the checkpoint; an unfinished one resumes from
    its checkpoints. A stage of another identity (a changed config) is removed and retrained,
    so a resume never continues someone else's run.
    """
    if claim_stage_dir(stage_dir, identity, name):
        finished = restore_finished_stage(config, stage_dir, training_set=training_set,
                                          method=method)
        if finished is not None:
            print(f"[{name}] reusing the finished stage in {stage_dir}")
            return finished
    results, state = loop.train(config, stage_dir, training_set=training_set, method=method,
                                name=name, **train_kwargs)
    results["identity"] = json.loads(json.dumps(identity))
    write_json(os.path.join(stage_dir, "results.json"), results)
    return results, state


def restore_finished_stage(config, stage_dir: str, *, training_set,
                           method) -> tuple[dict, Any] | None:
    """(results, final state) of the finished stage in `stage_dir`, or None when it has no
    `results.json` or its latest checkpoint is not the schedule's last step. Does not check
    the stage's identity (see `train_or_reuse_stage`, `claim_stage_dir`)."""
    results_path = os.path.join(stage_dir, "results.json")
    if not os.path.exists(results_path):
        return None
    template = step_lib.init_state(method, jax.random.PRNGKey(config.seed),
                                   training_set.sample_images)
    restored = Checkpointer(os.path.join(stage_dir, "checkpoints"),
                            keep=config.keep_checkpoints).restore_latest(template)
    total = config.optim.epochs * (training_set.num_train // config.optim.batch_size)
    if restored is None or int(restored[0].step) != total:
        return None
    with open(results_path) as f:
        return json.load(f), restored[0]


def claim_stage_dir(stage_dir: str, identity: dict, name: str) -> bool:
    """Makes `stage_dir` a directory of the stage `identity` (recorded in `identity.json`).

    A directory that holds another identity (a changed config, another sweep grid) is removed,
    so that a resume never continues someone else's run.

    Returns:
      Whether the directory already held this identity (its checkpoints may be resumed).
    """
    identity = json.loads(json.dumps(identity))  # as it reads back from JSON
    identity_path = os.path.join(stage_dir, "identity.json")
    same = False
    if os.path.exists(stage_dir):
        previous = None
        if os.path.exists(identity_path):
            with open(identity_path) as f:
                previous = json.load(f)
        same = previous == identity
        if not same:
            print(f"[{name}] {stage_dir} holds a stage of another configuration: retraining")
            if parallel.is_writer():
                shutil.rmtree(stage_dir)
    ensure_writable_dir(stage_dir)
    write_json(identity_path, identity)
    return same


