"""The training loop: one importable function that trains a method, or a sweep of it.

Loop hygiene:
  * Resume order: build the method, initialise a template state, restore the newest readable
    checkpoint over it, then continue at the next epoch. Data order depends only on
    (seed, epoch) and augmentation on (rng, step), so an interrupted run restarted with the same
    command ends with the same parameters, bit for bit on CPU.
  * Metrics stay on device during an epoch and are fetched once at its end. A non-finite loss
    or gradient is then named by its step: a single run stops with `NonFiniteLossError` before
    anything is saved (the last good checkpoint stays the latest); in a sweep that member is
    marked diverged (`diverged_at_step` in its metrics and results) and the others go on.
  * Checkpoints hold the whole training state (params, BatchNorm statistics, optimizer state,
    rng, method memory; stacked over members in a sweep), never the frozen teachers.
  * Outputs in the workdir (per member `workdir/<member>/` in a sweep): `metrics.jsonl` (one
    JSON line per epoch, rewritten from the resume point), TensorBoard events under
    `tensorboard/`, and `results.json` at the end (with the run's provenance); `checkpoints/`.
  * One run per workdir (`dsink_jax.train.workdir.WorkdirLock`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import sys
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from dsink_jax.data import TrainingSet
from dsink_jax.train import feed as feed_lib
from dsink_jax.train import metrics as metrics_lib
from dsink_jax.train import parallel
from dsink_jax.train import step as step_lib
from dsink_jax.train.checkpoint import Checkpointer
from dsink_jax.train.state import TrainState
from dsink_jax.train.workdir import (WorkdirLock, ensure_writable_dir, json_default, provenance,
                                     write_json)


class NonFiniteLossError(FloatingPointError):
    """The loss or gradient became NaN or Inf; names the step."""


@dataclasses.dataclass(frozen=True)
class Members:
    """A sweep: M students trained together in one program, from a stacked state.

    Attributes:
      names: one directory name per member (its metrics and results go to `workdir/<name>/`).
      states: the initial TrainState stacked over a leading member axis [M, ...].
      mode: "vmap" or "unroll" (see `dsink_jax.train.step.members_step`).
    """

    names: tuple[str, ...]
    states: TrainState
    mode: str = "vmap"


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
            f.write(json.dumps(record, default=json_default) + "\n")
        if self._tb is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("epoch", "step"):
                    self._tb.add_scalar(key, value, record["step"])
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


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


def _fetch_epoch_metrics(history: list[dict], first_step: int, num_members: int
                         ) -> tuple[list[dict[str, float]], list[int | None]]:
    """Brings an epoch's per-step metrics to host: per member, the epoch means and the first
    non-finite step (None when every step was finite).

    Ratios over the epoch: X = sum(X_numerator) / sum(X_denominator).
    """
    stacked = jax.device_get(jax.tree.map(lambda *xs: jnp.stack(xs), *history))
    # [steps] for a single run, [steps, M] for a sweep: the same code, M = 1.
    stacked = {k: np.asarray(v).reshape(len(history), num_members) for k, v in stacked.items()}
    finite = stacked.pop("finite").astype(bool)
    means_per_member, bad_steps = [], []
    for m in range(num_members):
        bad_steps.append(None if finite[:, m].all()
                         else first_step + int(np.argmin(finite[:, m])))
        means = {k: float(np.mean(v[:, m])) for k, v in stacked.items()}
        for key in [k for k in means if k.endswith("_numerator")]:
            stem = key[: -len("_numerator")]
            num, den = means.pop(key), means.pop(f"{stem}_denominator")
            means[stem] = num / den if den > 0 else None
        means_per_member.append(means)
    return means_per_member, bad_steps


def train(config, workdir: str, *, training_set: TrainingSet, method: step_lib.Method,
          teacher_variables: tuple = (), name: str = "model",
          epoch_hook: Callable[[TrainState, int], dict] | None = None,
          refresh_extra: Callable[..., dict | None] | None = None,
          init_variables: dict | None = None,
          members: Members | None = None,
          ) -> tuple[dict | list[dict], TrainState]:
    """Trains `method` on `training_set`, resuming from `workdir/checkpoints` when possible.

    Args:
      config: the experiment config (see `dsink_jax.configs`).
      workdir: where checkpoints, metrics and `results.json` go (created if needed).
      training_set: long-tailed, noisy training data and the clean test set.
      method: the static parts of the step (model, optimizer, objective, augmentation).
      teacher_variables: frozen variables of `method.teacher_models`, passed to every step.
      name: a label for logs and the progress bar.
      epoch_hook: `(state, epoch) -> dict` of extra values to log at each evaluation (host side).
      refresh_extra: `(state, epoch, predict_train) -> dict | None`, called at the start of
        every epoch (host side); the entries it returns replace those of `state.extra` (e.g.
        D-SINK's dataset-level allocation). `predict_train(state) -> float [N, C]` gives the
        method's test-time logits on the unaugmented training set, in index order. It must
        depend on the state alone, so that a resumed run recomputes the same values. Single
        runs only.
      init_variables: Flax variables ("params", optional "batch_stats") to start from instead
        of a fresh initialisation (a warm start; the optimizer state starts fresh). A resumed
        run takes its checkpoint instead. Single runs only.
      members: train a sweep instead of one run: every member gets the metrics, evaluations
        and results of a single run, in `workdir/<member name>/`; they share the data order
        and augmentation of `config.seed` (`dsink_jax.train.step.members_step`).

    Returns:
      (results, final_state): the results dict also written to `workdir/results.json`; for a
      sweep, the list of the members' results and the stacked state.
    """
    if members is not None and (refresh_extra is not None or init_variables is not None):
        raise ValueError("refresh_extra and init_variables are for single runs, not sweeps")
    with WorkdirLock(ensure_writable_dir(workdir)):
        return _train(config, os.path.abspath(workdir), training_set=training_set,
                      method=method, teacher_variables=teacher_variables, name=name,
                      epoch_hook=epoch_hook, refresh_extra=refresh_extra,
                      init_variables=init_variables, members=members)


def _train(config, workdir, *, training_set, method, teacher_variables, name, epoch_hook,
           refresh_extra, init_variables, members):
    wall_start = time.perf_counter()
    ts = training_set
    num_train = ts.num_train
    batch_size = config.optim.batch_size
    feed_lib.check_batch_fits(batch_size, num_train)
    epochs = config.optim.epochs
    rng = jax.random.PRNGKey(config.seed)

    # One code path for 1 and N devices (and hosts): batch sharded, everything else replicated.
    mesh = parallel.make_mesh(config.num_devices)
    parallel.check_batch_size(batch_size, mesh)
    rep, sharded = parallel.replicated(mesh), parallel.batch_sharded(mesh)
    # In memory (on the devices) or streaming (grain workers on the host), by the training set.
    feed = feed_lib.make_feed(ts, mesh, batch_size=batch_size, seed=config.seed,
                              eval_batch_size=config.eval_batch_size,
                              image_size=config.input.image_size,
                              num_views=method.objective.num_views,
                              workers=feed_lib.resolve_workers(config.input.workers))
    steps_per_epoch = feed.steps_per_epoch
    if members is None:
        num_members, run_dirs = 1, [workdir]
        step_fn = functools.partial(step_lib.train_step, method=method)
        predict_fn = functools.partial(step_lib.test_logits, method=method)
        state = step_lib.init_state(method, rng, ts.sample_images)
        if init_variables is not None:
            # Host copies: the step donates the state, and the donor (e.g. a frozen teacher
            # that the step also reads) must survive.
            copy = functools.partial(jax.tree.map, np.array)
            state = state.replace(params=copy(init_variables["params"]),
                                  batch_stats=copy(init_variables.get("batch_stats", {})))
    else:
        num_members = len(members.names)
        run_dirs = [ensure_writable_dir(os.path.join(workdir, n)) for n in members.names]
        # The members share the data stream of a single run with config.seed.
        data_rng = parallel.replicate(jax.random.split(rng)[1], mesh)
        step_fn = functools.partial(step_lib.members_step, data_rng=data_rng, method=method,
                                    mode=members.mode)
        member_logits = jax.vmap(functools.partial(step_lib.test_logits, method=method),
                                 in_axes=(0, None))

        def predict_fn(states, images):  # [B, M, C]: batched_predict slices examples
            return jnp.moveaxis(member_logits(states, images), 0, 1)
        state = members.states
    jit_step = jax.jit(step_fn, in_shardings=(rep, sharded, rep), out_shardings=(rep, rep),
                       donate_argnums=0)
    jit_predict = jax.jit(predict_fn, in_shardings=(rep, sharded), out_shardings=rep)
    teacher_variables = parallel.replicate(teacher_variables, mesh)

    state = parallel.replicate(state, mesh)
    checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"),
                                keep=config.keep_checkpoints)
    # The state's own step counter says where a restored run stands (checkpoints are numbered
    # by optimizer step; those of earlier versions by epoch, which the state makes unambiguous).
    restored = checkpointer.restore_latest(state, data_iterator=feed.data_iterator)
    start_step = 0
    if restored is not None:
        state = restored[0]
        start_step = int(np.asarray(state.step).reshape(-1)[0])
        logging.info("%s: resuming at step %d", name, start_step)
    start_epoch, start_offset = divmod(start_step, steps_per_epoch)
    logs = [_MetricsLog(d, start_epoch) if parallel.is_writer() else _NullLog()
            for d in run_dirs]
    diverged: list[int | None] = [None] * num_members
    if start_step:  # a resumed sweep remembers which members had diverged
        for m, d in enumerate(run_dirs):
            diverged[m] = _diverged_step_in_log(d)

    def predict_train(state) -> np.ndarray:
        """The method's test-time logits on the (unaugmented) training set, in index order."""
        return feed.predict(jit_predict, state, "train")

    def evaluate(state) -> list[dict]:
        test_logits = feed.predict(jit_predict, state, "test").reshape(
            ts.y_test.shape[0], num_members, -1)
        train_pred = None
        if ts.is_corrupted.any():
            train_pred = predict_train(state).reshape(num_train, num_members, -1).argmax(-1)
        return [summarise_predictions(test_logits[:, m].argmax(-1),
                                      None if train_pred is None else train_pred[:, m], ts,
                                      config) for m in range(num_members)]

    # A live bar on a terminal; in a log file (no TTY) one line per evaluation instead.
    interactive = bool(config.progress) and sys.stderr.isatty()
    label = name if members is None else f"{name} x{num_members}"
    bar = tqdm.tqdm(total=epochs, initial=start_epoch, desc=label, unit="epoch",
                    disable=not interactive, dynamic_ncols=True)
    timed_images, timed_seconds = 0, 0.0
    final = None  # the evaluations after the last epoch
    try:
        for epoch in range(start_epoch, epochs):
            offset = start_offset if epoch == start_epoch else 0
            if refresh_extra is not None and offset == 0:
                # Inside an epoch, the restored state already holds this epoch's refresh.
                new_extra = refresh_extra(state, epoch, predict_train)
                if new_extra:
                    state = state.replace(
                        extra={**state.extra, **parallel.replicate(new_extra, mesh)})
            history = []
            first_step = epoch * steps_per_epoch + offset
            t0 = time.perf_counter()
            for i, batch in enumerate(feed.epoch(epoch, offset)):
                state, step_metrics = jit_step(state, batch, teacher_variables)
                history.append(step_metrics)
                if i == 0 and epoch == start_epoch:
                    jax.block_until_ready(state)  # keep compilation out of images/sec
                    t0 = time.perf_counter()
                step = first_step + i + 1
                if (config.checkpoint_every_steps and step % config.checkpoint_every_steps == 0
                        and step % steps_per_epoch):
                    if members is None:  # never save a diverged single run
                        _raise_if_diverged(_fetch_epoch_metrics(history, first_step, 1)[1][0])
                    checkpointer.save(step, state, data_iterator=feed.data_iterator)
            epoch_metrics, bad_steps = _fetch_epoch_metrics(history, first_step, num_members)
            if members is None:
                _raise_if_diverged(bad_steps[0])
            for m, bad in enumerate(bad_steps):
                if diverged[m] is None and bad is not None:
                    diverged[m] = bad
                    logging.warning("%s: member %s diverged at step %d; the others go on",
                                    name, members.names[m], bad)
            seconds = time.perf_counter() - t0
            counted = len(history) - (1 if epoch == start_epoch else 0)
            timed_images += counted * batch_size
            timed_seconds += seconds
            done = epoch + 1
            records = [{"epoch": done, "step": done * steps_per_epoch,
                        **{f"train_{k}": v for k, v in em.items()},
                        "images_per_sec": counted * batch_size / max(seconds, 1e-9),
                        "diverged_at_step": diverged[m]}
                       for m, em in enumerate(epoch_metrics)]
            evaluated = done % config.eval_every_epochs == 0 or done == epochs
            if config.progress and not interactive and not evaluated:
                # In a log file, a line per epoch (the evaluations add theirs below).
                losses = [em["loss"] for em in epoch_metrics]
                print(f"[{label}] epoch {done}/{epochs} loss "
                      f"{np.mean(losses):.4f}{' (mean of members)' if members else ''}, "
                      f"{records[0]['images_per_sec']:.0f} images/s", file=sys.stderr,
                      flush=True)
            if evaluated:
                evaluations = evaluate(state)
                if done == epochs:
                    final = evaluations
                for m, (record, evaluation) in enumerate(zip(records, evaluations)):
                    record.update({k: v for k, v in evaluation.items()
                                   if isinstance(v, (int, float)) or v is None})
                    if config.progress and not interactive:
                        who = name if members is None else f"{name}/{members.names[m]}"
                        print(f"[{who}] epoch {done}/{epochs} loss "
                              f"{epoch_metrics[m]['loss']:.4f} test accuracy "
                              f"{evaluation['test_accuracy']:.4f}", file=sys.stderr, flush=True)
                if epoch_hook is not None:
                    extra_values = epoch_hook(state, done)
                    for record in records:
                        record.update(extra_values)
            for log, record in zip(logs, records):
                log.write(record)
            if done % config.checkpoint_every_epochs == 0 or done == epochs:
                checkpointer.save(done * steps_per_epoch, state, data_iterator=feed.data_iterator)
            bar.set_postfix(loss=f"{epoch_metrics[0]['loss']:.3f}",
                            acc=f"{epoch_metrics[0]['accuracy']:.3f}")
            bar.update(1)
    finally:
        bar.close()
        for log in logs:
            log.close()

    if final is None:  # resumed from the final checkpoint: nothing was trained here
        final = evaluate(state)
    shared = {
        "class_counts": ts.class_counts,
        "given_label_counts": ts.noisy_class_counts,
        "realised_noise_rate": ts.realised_noise_rate,
        "images_per_sec": timed_images / timed_seconds if timed_seconds > 0 else None,
        "epochs": epochs,
        # This process's wall time (set-up, training, evaluations); a resumed run counts only
        # the part after its restart.
        "wall_seconds": time.perf_counter() - wall_start,
        "provenance": provenance(),
        "config": config.to_dict(),
    }
    results = []
    for m in range(num_members):
        member_state = state if members is None else jax.tree.map(lambda x, m=m: x[m], state)
        result = {"name": name if members is None else members.names[m], **final[m],
                  "steps": int(member_state.step), "diverged_at_step": diverged[m],
                  "params_fingerprint": step_lib.params_fingerprint(member_state.params),
                  **shared}
        write_json(os.path.join(run_dirs[m], "results.json"), result)
        results.append(result)
    checkpointer.close()
    return (results[0] if members is None else results), state


def _raise_if_diverged(bad_step: int | None) -> None:
    if bad_step is not None:
        raise NonFiniteLossError(f"non-finite loss or gradient at step {bad_step}; the last good "
                                 "checkpoint is kept")


def _diverged_step_in_log(run_dir: str) -> int | None:
    """The `diverged_at_step` recorded in a member's metrics.jsonl (None if it never diverged)."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return None
    step = None
    with open(path) as f:
        for line in f:
            try:
                step = json.loads(line).get("diverged_at_step") or step
            except json.JSONDecodeError:
                continue
    return step
