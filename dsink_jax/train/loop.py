"""The training loop: one importable function that trains a method and writes its results.

Loop hygiene:
  * Resume order: build the method, initialise a template state, restore the newest readable
    checkpoint over it, then continue at the next epoch. Data order depends only on
    (seed, epoch) and augmentation on (rng, step), so an interrupted run restarted with the same
    command ends with the same parameters, bit for bit on CPU.
  * Metrics stay on device during an epoch and are fetched once at its end; a non-finite loss
    or gradient then stops the run with the first bad step named, before anything is saved, so
    the last good checkpoint stays the latest.
  * Checkpoints hold the whole training state (params, BatchNorm statistics, optimizer state,
    rng, method memory), never the frozen teachers.
  * Outputs in the workdir: `metrics.jsonl` (one JSON line per epoch, rewritten from the resume
    point), TensorBoard events under `tensorboard/`, `checkpoints/`, and `results.json` at the end.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from dsink_jax.data import TrainingSet, epoch_batches
from dsink_jax.train import metrics as metrics_lib
from dsink_jax.train import parallel
from dsink_jax.train import step as step_lib
from dsink_jax.train.checkpoint import Checkpointer
from dsink_jax.train.state import TrainState


class NonFiniteLossError(FloatingPointError):
    """The loss or gradient became NaN or Inf; names the step."""


def ensure_writable_dir(path: str | os.PathLike) -> str:
    """Creates `path` if needed and checks that a file can be written there."""
    path = os.path.abspath(os.fspath(path))
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, ".write_probe")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as err:
        raise PermissionError(f"workdir {path!r} is not writable: {err.strerror or err}") from err
    return path


def _json_default(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def write_json(path: str, obj: Any) -> None:
    """Writes JSON atomically (temporary file, then rename): a reader never sees half a file.

    Only process 0 writes (multi-host runs); the others return.
    """
    if not parallel.is_writer():
        return
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, default=_json_default)
    os.replace(tmp, path)


class _NullLog:
    """What processes other than 0 log: nothing."""

    def write(self, record: dict) -> None:
        del record

    def close(self) -> None:
        pass


class _MetricsLog:
    """metrics.jsonl plus TensorBoard, rewound to the resume point."""

    def __init__(self, workdir: str, start_epoch: int):
        self.path = os.path.join(workdir, "metrics.jsonl")
        kept = []
        if os.path.exists(self.path):
            with open(self.path) as f:
                for line in f:
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:
                        continue  # a line cut by a kill
                    if record.get("epoch", 0) <= start_epoch:
                        kept.append(line if line.endswith("\n") else line + "\n")
        with open(self.path, "w") as f:
            f.writelines(kept)
        try:
            from tensorboardX import SummaryWriter
            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
        except ImportError:  # pragma: no cover - tensorboardX is a dependency
            self._tb = None

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record, default=_json_default) + "\n")
        if self._tb is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("epoch", "step"):
                    self._tb.add_scalar(key, value, record["step"])
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def check_batch_fits(batch_size: int, num_train: int) -> None:
    """Raises before any work when a batch would not fit in the training set."""
    if batch_size > num_train:
        raise ValueError(f"optim.batch_size={batch_size} is larger than the training set "
                         f"({num_train} examples); allowed: 1..{num_train}")


def summarise_predictions(test_predictions: np.ndarray, train_predictions: np.ndarray | None,
                          training_set: TrainingSet, config) -> dict:
    """Test accuracies (overall, shot groups, per class) and the noisy-label correction rate.

    Args:
      test_predictions: int [N_test] predicted classes on the clean test set.
      train_predictions: int [N_train] predicted classes on the training images, or None when
        no training label is corrupted (the correction rate is then None).
    """
    out = metrics_lib.classification_summary(
        test_predictions, training_set.y_test, training_set.class_counts,
        many_threshold=config.data.many_shot_threshold,
        few_threshold=config.data.few_shot_threshold)
    out["correction_rate"] = (None if train_predictions is None else metrics_lib.correction_rate(
        train_predictions, training_set.clean_labels, training_set.noisy_labels))
    return out


def _fetch_epoch_metrics(history: list[dict], first_step: int) -> dict[str, float]:
    """Brings an epoch's per-step metrics to host, raising on the first non-finite step."""
    stacked = jax.device_get(jax.tree.map(lambda *xs: jnp.stack(xs), *history))
    finite = np.asarray(stacked["finite"], bool)
    if not finite.all():
        bad = first_step + int(np.argmin(finite))
        raise NonFiniteLossError(
            f"non-finite loss or gradient at step {bad} (loss={float(stacked['loss'][bad - first_step])}); "
            "the last good checkpoint is kept")
    means = {k: float(np.mean(v)) for k, v in stacked.items() if k != "finite"}
    # Ratios over the epoch: X = sum(X_numerator) / sum(X_denominator).
    for key in [k for k in means if k.endswith("_numerator")]:
        stem = key[: -len("_numerator")]
        num, den = means.pop(key), means.pop(f"{stem}_denominator")
        means[stem] = num / den if den > 0 else None
    return means


def train(config, workdir: str, *, training_set: TrainingSet, method: step_lib.Method,
          teacher_variables: tuple = (), name: str = "model",
          step_fn: Callable | None = None, predict_fn: Callable | None = None,
          epoch_hook: Callable[[TrainState, int], dict] | None = None,
          refresh_extra: Callable[..., dict | None] | None = None,
          init_variables: dict | None = None,
          ) -> tuple[dict, TrainState]:
    """Trains `method` on `training_set`, resuming from `workdir/checkpoints` when possible.

    Args:
      config: the experiment config (see `dsink_jax.configs`).
      workdir: where checkpoints, metrics and `results.json` go (created if needed).
      training_set: long-tailed, noisy training data and the clean test set.
      method: the static parts of the step (model, optimizer, objective, augmentation).
      teacher_variables: frozen variables of `method.teacher_models`, passed to every step.
      name: a label for logs and the progress bar.
      step_fn: the pure step `(state, batch, teacher_variables) -> (state, metrics)`; default
        `dsink_jax.train.step.train_step` bound to `method`.
      predict_fn: `(state, uint8 images) -> logits`, jittable; default eval-mode logits.
      epoch_hook: `(state, epoch) -> dict` of extra values to log at each evaluation (host side).
      refresh_extra: `(state, epoch, predict) -> dict | None`, called before every epoch
        (host side); the entries it returns replace those of `state.extra` (e.g. D-SINK's
        dataset-level allocation). `predict(state, uint8 images) -> float [N, C]` runs the
        jitted, sharded eval forward. It must depend on the state alone, so that a resumed run
        recomputes the same values.
      init_variables: Flax variables ("params", optional "batch_stats") to start from instead
        of a fresh initialisation (a warm start; the optimizer state starts fresh). A resumed
        run takes its checkpoint instead.

    Returns:
      (results, final_state): the results dict also written to `workdir/results.json`.
    """
    wall_start = time.perf_counter()
    workdir = ensure_writable_dir(workdir)
    ts = training_set
    num_train = ts.x_train.shape[0]
    batch_size = config.optim.batch_size
    check_batch_fits(batch_size, num_train)
    epochs = config.optim.epochs

    if step_fn is None:
        step_fn = functools.partial(step_lib.train_step, method=method)
    if predict_fn is None:
        def predict_fn(state, images):
            return step_lib.predict_logits(state.variables, images, model=method.model,
                                           augment=method.augment)
    # One code path for 1 and N devices (and hosts): batch sharded, everything else replicated.
    mesh = parallel.make_mesh(config.num_devices)
    parallel.check_batch_size(batch_size, mesh)
    rep, sharded = parallel.replicated(mesh), parallel.batch_sharded(mesh)
    jit_step = jax.jit(step_fn, in_shardings=(rep, sharded, rep), out_shardings=(rep, rep),
                       donate_argnums=0)
    jit_predict = jax.jit(predict_fn, in_shardings=(rep, sharded), out_shardings=rep)
    dataset = parallel.DeviceDataset(ts.x_train, ts.noisy_labels, mesh)
    eval_batch_size = dataset.eval_batch_size(config.eval_batch_size)
    teacher_variables = parallel.replicate(teacher_variables, mesh)

    rng = jax.random.PRNGKey(config.seed)
    state = step_lib.init_state(method, rng, ts.x_train[:1])
    if init_variables is not None:
        # Host copies: the step donates the state, and the donor (e.g. a frozen teacher that
        # the step also reads) must survive.
        copy = functools.partial(jax.tree.map, np.array)
        state = state.replace(params=copy(init_variables["params"]),
                              batch_stats=copy(init_variables.get("batch_stats", {})))
    state = parallel.replicate(state, mesh)
    checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"),
                                keep=config.keep_checkpoints)
    restored = checkpointer.restore_latest(state)
    start_epoch = 0
    if restored is not None:
        state, start_epoch = restored
        logging.info("%s: resuming after epoch %d", name, start_epoch)
    log = _MetricsLog(workdir, start_epoch) if parallel.is_writer() else _NullLog()

    def predict(state, images: np.ndarray) -> np.ndarray:
        return step_lib.batched_predict(jit_predict, state, images, eval_batch_size,
                                        put=functools.partial(parallel.global_batch, mesh=mesh))

    def evaluate(state) -> dict:
        test_logits = predict(state, ts.x_test)
        train_pred = predict(state, ts.x_train).argmax(-1) if ts.is_corrupted.any() else None
        return summarise_predictions(test_logits.argmax(-1), train_pred, ts, config)

    # A live bar on a terminal; in a log file (no TTY) one line per evaluation instead.
    interactive = bool(config.progress) and sys.stderr.isatty()
    bar = tqdm.tqdm(total=epochs, initial=start_epoch, desc=name, unit="epoch",
                    disable=not interactive, dynamic_ncols=True)
    timed_images, timed_seconds = 0, 0.0
    final = None  # the evaluation after the last epoch
    try:
        for epoch in range(start_epoch, epochs):
            if refresh_extra is not None:
                new_extra = refresh_extra(state, epoch, predict)
                if new_extra:
                    state = state.replace(
                        extra={**state.extra, **parallel.replicate(new_extra, mesh)})
            order = epoch_batches(config.seed, epoch, num_train, batch_size)
            history = []
            first_step = int(state.step)
            t0 = time.perf_counter()
            for i, idx in enumerate(order):
                state, step_metrics = jit_step(state, dataset.batch(idx), teacher_variables)
                history.append(step_metrics)
                if i == 0 and epoch == start_epoch:
                    jax.block_until_ready(state)  # keep compilation out of images/sec
                    t0 = time.perf_counter()
            epoch_metrics = _fetch_epoch_metrics(history, first_step)
            seconds = time.perf_counter() - t0
            counted = len(order) - (1 if epoch == start_epoch else 0)
            timed_images += counted * batch_size
            timed_seconds += seconds
            done = epoch + 1
            record = {"epoch": done, "step": int(state.step),
                      **{f"train_{k}": v for k, v in epoch_metrics.items()},
                      "images_per_sec": counted * batch_size / max(seconds, 1e-9)}
            if done % config.eval_every_epochs == 0 or done == epochs:
                evaluation = evaluate(state)
                if done == epochs:
                    final = evaluation
                record.update({k: v for k, v in evaluation.items()
                               if isinstance(v, (int, float)) or v is None})
                if epoch_hook is not None:
                    record.update(epoch_hook(state, done))
                if config.progress and not interactive:
                    print(f"[{name}] epoch {done}/{epochs} loss {epoch_metrics['loss']:.4f} "
                          f"test accuracy {evaluation['test_accuracy']:.4f}", file=sys.stderr,
                          flush=True)
            log.write(record)
            if done % config.checkpoint_every_epochs == 0 or done == epochs:
                checkpointer.save(done, state)
            bar.set_postfix(loss=f"{epoch_metrics['loss']:.3f}",
                            acc=f"{epoch_metrics['accuracy']:.3f}")
            bar.update(1)
    finally:
        bar.close()
        log.close()

    if final is None:  # resumed from the final checkpoint: nothing was trained here
        final = evaluate(state)
    results = {
        "name": name,
        **final,
        "class_counts": ts.class_counts,
        "given_label_counts": ts.noisy_class_counts,
        "realised_noise_rate": ts.realised_noise_rate,
        "images_per_sec": timed_images / timed_seconds if timed_seconds > 0 else None,
        "steps": int(state.step),
        "epochs": epochs,
        "params_fingerprint": step_lib.params_fingerprint(state.params),
        # This process's wall time (set-up, training, evaluations); a resumed run counts only
        # the part after its restart.
        "wall_seconds": time.perf_counter() - wall_start,
        "config": config.to_dict(),
    }
    write_json(os.path.join(workdir, "results.json"), results)
    checkpointer.close()
    return results, state
