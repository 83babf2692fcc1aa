"""Hyperparameter sweeps of the D-SINK student as one vmapped, jitted program.

All members share the data stream (order and augmentation), so the batch is augmented once and
the frozen teachers run forward once per step; only the student update is vmapped over the
member axis. Per-member values live in the stacked state:

* alpha, epsilon: `state.extra["hparams"]`, read by the D-SINK objective;
* learning_rate, weight_decay: the optimizer's injected hyperparameters
  (`optax.inject_hyperparams`, see `dsink_jax.train.optim`);
* seed: the member's parameter initialisation (the data stream follows `config.seed`).

A member whose seed equals `config.seed` and whose values equal the config's trains the same
student as `experiments/main.py` (up to float reassociation under vmap).
"""

from __future__ import annotations

import functools
import itertools
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from dsink_jax import configs as configs_lib
from dsink_jax import pipelines
from dsink_jax.data import epoch_batches
from dsink_jax.train import loop
from dsink_jax.train import parallel
from dsink_jax.train import step as step_lib
from dsink_jax.train.checkpoint import Checkpointer

SWEEPABLE = ("alpha", "epsilon", "learning_rate", "weight_decay", "seed")
# Student options the sweep's shared program handles (a dataset-level solve between epochs, a
# warm start and a post-hoc correction are single-run features of the loop and pipeline).
SWEEP_SUPPORTS = {"allocation": ("batch", "online"), "init_from": ("scratch",),
                  "inference": ("raw",)}


def parse_sweep(specs: list[str]) -> dict[str, list[float]]:
    """Parses `["alpha=0.5,1,2", "epsilon=1,2"]` into `{"alpha": [...], "epsilon": [...]}`.

    Raises:
      ValueError: unknown name, empty or non-numeric values, a name given twice.
    """
    grid: dict[str, list[float]] = {}
    for spec in specs:
        if "=" not in spec:
            raise ValueError(f"--sweep {spec!r} is not of the form name=v1,v2,...")
        name, values = (s.strip() for s in spec.split("=", 1))
        if name not in SWEEPABLE:
            raise ValueError(f"cannot sweep {name!r}; allowed: {', '.join(SWEEPABLE)}")
        if name in grid:
            raise ValueError(f"--sweep {name} given twice")
        try:
            parsed = [int(v) if name == "seed" else float(v) for v in values.split(",") if v]
        except ValueError:
            raise ValueError(f"--sweep {spec!r}: values must be numbers") from None
        if not parsed:
            raise ValueError(f"--sweep {spec!r} has no values")
        grid[name] = parsed
    return grid


def members_of(grid: dict[str, list[float]], config) -> list[dict]:
    """The Cartesian product of the grid, each member with all five values filled in."""
    base = {"alpha": config.dsink.alpha, "epsilon": config.dsink.epsilon,
            "learning_rate": config.optim.learning_rate,
            "weight_decay": config.optim.weight_decay, "seed": config.seed}
    names = list(grid)
    members = []
    for values in itertools.product(*(grid[n] for n in names)):
        member = dict(base, **dict(zip(names, values)))
        member["name"] = "_".join(f"{n}{v:g}" for n, v in zip(names, values)) or "default"
        members.append(member)
    for m in members:
        if m["alpha"] < 0 or m["epsilon"] <= 0 or m["learning_rate"] <= 0 or m["weight_decay"] < 0:
            raise ValueError(f"member {m['name']}: alpha >= 0, epsilon > 0, learning_rate > 0 "
                             f"and weight_decay >= 0 are required; got {m}")
    return members


def init_members(method: step_lib.Method, members: list[dict], sample_images: np.ndarray):
    """The stacked state [M, ...]: per-member parameters, hyperparameters and memory."""
    states = []
    for m in members:
        s = step_lib.init_state(method, jax.random.PRNGKey(int(m["seed"])), sample_images)
        hyper = dict(s.opt_state.hyperparams)
        hyper["learning_rate"] = jnp.asarray(m["learning_rate"], jnp.float32)
        hyper["weight_decay"] = jnp.asarray(m["weight_decay"], jnp.float32)
        s = s.replace(opt_state=s.opt_state._replace(hyperparams=hyper),
                      extra={**s.extra, "hparams": {
                          "alpha": jnp.asarray(m["alpha"], jnp.float32),
                          "epsilon": jnp.asarray(m["epsilon"], jnp.float32)}})
        states.append(s)
    return jax.tree.map(lambda *xs: jnp.stack(xs), *states)


MEMBER_MODES = ("vmap", "unroll")


def sweep_step(states, batch, teacher_variables, data_rng, *, method: step_lib.Method,
               members: str = "vmap"):
    """One step of every member: shared augmentation and teacher forward, then the updates.

    Args:
      states: stacked TrainState [M, ...] (all members at the same step).
      batch: the shared batch (see `dsink_jax.train.step.train_step`).
      teacher_variables: the frozen teachers' variables (shared).
      data_rng: the shared augmentation key (`fold_in(data_rng, step)` per step).
      method: static parts.
      members: "vmap" batches the member updates (one program with [M, ...] operands: best on
        accelerators and for dense models); "unroll" writes the M updates out one after
        another in the same jitted program, which avoids the grouped convolutions that vmap
        makes of conv nets (slow on XLA:CPU) at the price of M times the compile time. Both
        share the augmentation and the teacher forward.

    Returns:
      (states, metrics) with every metric of shape [M].
    """
    if members not in MEMBER_MODES:
        raise ValueError(f"members={members!r}; allowed: {', '.join(MEMBER_MODES)}")
    images, teacher_logits = step_lib.prepare_batch(data_rng, states.step[0], batch,
                                                    teacher_variables, method=method)
    if members == "unroll":
        outputs = [step_lib.apply_update(jax.tree.map(lambda x, i=i: x[i], states), images, batch,
                                         teacher_logits, method=method)
                   for i in range(states.step.shape[0])]
        return jax.tree.map(lambda *xs: jnp.stack(xs), *outputs)
    update = functools.partial(step_lib.apply_update, method=method)
    return jax.vmap(update, in_axes=(0, None, None, None))(states, images, batch, teacher_logits)


def run_dsink_sweep(config, workdir: str, grid: dict[str, list[float]], *,
                    members_mode: str = "vmap") -> dict:
    """Trains the teachers (or reuses them), then all students of `grid` in one program.

    `members_mode`: "vmap" or "unroll", see :func:`sweep_step`.

    Writes `workdir/sweep/<member>/results.json`, `workdir/sweep/summary.md` and
    `workdir/sweep/summary.json` (members ranked by test accuracy). Resumes from
    `workdir/sweep/checkpoints`.
    """
    pipelines.dsink.validate(config)
    pipelines.common.check_workdir(workdir)
    if members_mode not in MEMBER_MODES:
        raise ValueError(f"members_mode={members_mode!r}; allowed: {', '.join(MEMBER_MODES)}")
    for field, allowed in SWEEP_SUPPORTS.items():
        value = config.dsink[field]
        if value not in allowed:
            raise configs_lib.ConfigError(
                f"the sweep does not support dsink.{field}={value!r}; allowed here: "
                f"{', '.join(allowed)} (train such students with experiments/main.py)")
    members = members_of(grid, config)
    training_set = pipelines.prepare_training_set(config)
    teachers = pipelines.dsink.train_teachers(config, workdir, training_set)
    method = pipelines.build_method(config, training_set, objective=teachers["objective"],
                                    teacher_models=teachers["teacher_models"])
    teacher_variables = teachers["teacher_variables"]
    sweep_dir = loop.ensure_writable_dir(os.path.join(workdir, "sweep"))

    ts = training_set
    num_train, batch_size = ts.x_train.shape[0], config.optim.batch_size
    loop.check_batch_fits(batch_size, num_train)
    epochs = config.optim.epochs
    # The same data-parallel layout as a single run (dsink_jax.train.parallel).
    mesh = parallel.make_mesh(config.num_devices)
    parallel.check_batch_size(batch_size, mesh)
    rep, sharded = parallel.replicated(mesh), parallel.batch_sharded(mesh)
    dataset = parallel.DeviceDataset(ts.x_train, ts.noisy_labels, mesh)
    teacher_variables = parallel.replicate(teacher_variables, mesh)
    # The shared data key: the one a single run with config.seed uses for its steps.
    data_rng = parallel.replicate(jax.random.split(jax.random.PRNGKey(config.seed))[1], mesh)
    step = jax.jit(functools.partial(sweep_step, method=method, members=members_mode),
                   in_shardings=(rep, sharded, rep, rep), out_shardings=(rep, rep),
                   donate_argnums=0)
    predict = jax.jit(jax.vmap(lambda s, x: step_lib.predict_logits(
        s.variables, x, model=method.model, augment=method.augment), in_axes=(0, None)),
        in_shardings=(rep, sharded), out_shardings=rep)
    eval_batch_size = dataset.eval_batch_size(config.eval_batch_size)
    put = functools.partial(parallel.global_batch, mesh=mesh)

    states = parallel.replicate(init_members(method, members, ts.x_train[:1]), mesh)
    checkpointer = Checkpointer(os.path.join(sweep_dir, "checkpoints"),
                                keep=config.keep_checkpoints)
    restored = checkpointer.restore_latest(states)
    start_epoch = 0
    if restored is not None:
        states, start_epoch = restored
    diverged = np.zeros(len(members), bool)
    interactive = bool(config.progress) and sys.stderr.isatty()
    bar = tqdm.tqdm(total=epochs, initial=start_epoch, desc=f"sweep x{len(members)}",
                    unit="epoch", disable=not interactive)
    t0, timed_steps = time.perf_counter(), 0
    for epoch in range(start_epoch, epochs):
        history = []
        for idx in epoch_batches(config.seed, epoch, num_train, batch_size):
            states, metrics = step(states, dataset.batch(idx), teacher_variables, data_rng)
            history.append(metrics["finite"])
            timed_steps += 1
        finite = np.asarray(jax.device_get(jnp.stack(history))).all(axis=0)
        diverged |= ~finite  # a diverged member is reported, the others go on
        if (epoch + 1) % config.checkpoint_every_epochs == 0 or epoch + 1 == epochs:
            checkpointer.save(epoch + 1, states)
        if not interactive and config.progress:
            print(f"[sweep x{len(members)}] epoch {epoch + 1}/{epochs}", file=sys.stderr,
                  flush=True)
        bar.update(1)
    bar.close()
    seconds = time.perf_counter() - t0

    def members_first(s, x):  # [B, M, C], so batched_predict slices and stacks examples
        return jnp.moveaxis(predict(s, x), 0, 1)
    test_logits = step_lib.batched_predict(members_first, states, ts.x_test, eval_batch_size,
                                           put=put)
    train_logits = step_lib.batched_predict(members_first, states, ts.x_train,
                                            eval_batch_size, put=put)
    rows = []
    for i, member in enumerate(members):
        summary = loop.summarise_predictions(test_logits[:, i].argmax(-1),
                                             train_logits[:, i].argmax(-1), ts, config)
        params_i = jax.tree.map(lambda x: x[i], states.params)
        result = {**member, **summary, "diverged": bool(diverged[i]),
                  "params_fingerprint": step_lib.params_fingerprint(params_i)}
        member_dir = loop.ensure_writable_dir(os.path.join(sweep_dir, member["name"]))
        loop.write_json(os.path.join(member_dir, "results.json"), result)
        rows.append(result)
    rows.sort(key=lambda r: (not r["diverged"], r["test_accuracy"]), reverse=True)
    table = ["| rank | member | alpha | epsilon | lr | wd | seed | overall | many | medium | few "
             "| corrected |", "|" + "---|" * 12]
    for rank, r in enumerate(rows, 1):
        cells = [str(rank), r["name"] + (" (diverged)" if r["diverged"] else ""),
                 f"{r['alpha']:g}", f"{r['epsilon']:g}", f"{r['learning_rate']:g}",
                 f"{r['weight_decay']:g}", str(r["seed"])]
        cells += [pipelines.common.format_percent(r.get(k)) for k in (
            "test_accuracy", "many_shot_accuracy", "medium_shot_accuracy", "few_shot_accuracy",
            "correction_rate")]
        table.append("| " + " | ".join(cells) + " |")
    markdown = (f"# D-SINK sweep: {len(members)} students in one program\n\n"
                f"{pipelines.common.data_header(ts)}\n\n"
                f"Teachers (for reference):\n\n{pipelines.results_table(teachers['rows'])}\n\n"
                f"Students, ranked by test accuracy:\n\n" + "\n".join(table) + "\n\n"
                f"{timed_steps} vmapped steps in {seconds:.1f} s.\n")
    if parallel.is_writer():
        with open(os.path.join(sweep_dir, "summary.md"), "w") as f:
            f.write(markdown)
    loop.write_json(os.path.join(sweep_dir, "summary.json"),
                    {"members": rows, "teachers": teachers["rows"], "seconds": seconds,
                     "steps": timed_steps})
    checkpointer.close()
    print(markdown)
    return {"members": rows}
