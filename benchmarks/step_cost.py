"""Cost of the D-SINK student step against the plain CE step, and of the allocation inside it.

Usage (from the repository root)::

    python benchmarks/step_cost.py --model resnet8 --batch-size 128 --num-classes 10 \\
        --repeats 5 --steps 5 --json /tmp/step_cost.json

Variants, all built with the library's own functions as `dsink_jax.pipelines` builds them
(`pipelines.dsink.build_config`, `build_method`, `pipelines.dsink.assemble_student`), jitted as
training jits them (`jax.jit(partial(train_step, method=method), donate_argnums=0)`) and run on
one fixed batch of synthetic uint8 images (a long-tailed, 20 %-noisy synthetic training set;
values do not change the cost):

* ``ce step``: the CE train_step (augment, forward, backward, SGD update).
* ``dsink step``: the D-SINK student's train_step with the config's defaults (allocation and
  teachers as `experiments/configs/dsink.py` trains them).
* ``batch forward``: Sinkhorn per mini-batch (``config.dsink.num_iters``, class mass from f_L
  on the batch), both frozen teachers (same architecture; forward only, eval mode) run on the
  step's augmented view.
* ``online forward``: the online allocation (closed form with the carried class potential),
  f_N run on every step.
* ``online cached``: the same with f_N's log-probabilities looked up by example index
  (`dsink.teachers=cached`: computed once per stage, no forward pass in the step).
* ``dataset step``: the table of the dataset-level allocation looked up by index, and
  ``refresh / step`` its between-epochs solve over ``--refresh-images`` images (the student's
  forward pass over them, then Sinkhorn) divided by the steps of an epoch.
* ``teachers fwd``: `prepare_batch` of ``batch forward`` alone (augmentation + both teacher
  forwards), to explain the difference between the steps.
* ``allocation``: `sinkhorn_allocation` alone, jitted, on [B, C] log-probabilities.

Each repeat runs ``--steps`` steps of every variant in turn (A B C D A B C D ...), so machine
noise hits them alike; the table gives the per-step median over repeats and the spread. With
``--extra-num-classes`` (default 100) the same variants are timed at those class counts too.

Goals (issue 22): dsink step / ce step <= 1.05x with the defaults; allocation / dsink < 2 %.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

# Runnable without installing the package: `python benchmarks/step_cost.py`.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dsink_jax import pipelines  # noqa: E402
from dsink_jax import data as data_lib  # noqa: E402
from dsink_jax.ot.sinkhorn import sinkhorn_allocation  # noqa: E402
from dsink_jax.train import step as step_lib  # noqa: E402
from dsink_jax.train.objectives import (dataset_allocation_refresh,  # noqa: E402
                                        make_dsink_objective)

STEP_MODELS = ("cnn", "resnet8", "resnet20", "resnet32")  # cnn: the smoke run's
ALLOCATION_CALLS_PER_STEP = 10
RATIO_GOAL = 1.05  # dsink step / ce step with the defaults (issue 22)  # the allocation is ~ms: more calls per repeat for resolution


# ---------------------------------------------------------------------------------------------
# Helpers shared with sweep_speed.py and ot_softmax_cost.py (imported from this file).


def synthetic_training_set(*, num_classes: int, batch_size: int, image_shape=(32, 32, 3),
                           seed: int = 0):
    """A long-tailed (ratio 10), 20 % symmetric-noise training set of random uint8 images.

    Built through `dsink_jax.data.make_training_set`, so it has every field the pipelines read
    (class counts, clean and noisy labels). Holds at least `batch_size` images.
    """

    rng = np.random.default_rng(seed)
    # ratio 10 keeps >= 39 % of a balanced set (exponential profile): 4 batches' worth per class
    # before the tail cut leaves more than one batch.
    per_class = max(20, -(-4 * batch_size // num_classes))
    labels = np.repeat(np.arange(num_classes, dtype=np.int32), per_class)
    images = rng.integers(0, 256, (labels.size,) + tuple(image_shape), dtype=np.uint8)
    dataset = data_lib.Dataset(
        x_train=images, y_train=labels, x_test=images[:num_classes],
        y_test=labels[:num_classes].copy(), num_classes=num_classes,
        class_names=tuple(str(c) for c in range(num_classes)), source="synthetic",
        name="synthetic")
    training_set = data_lib.make_training_set(dataset, imbalance_ratio=10.0, noise="sym",
                                              noise_rate=0.2, seed=seed)
    if training_set.x_train.shape[0] < batch_size:
        raise ValueError(f"synthetic set of {training_set.x_train.shape[0]} images is smaller "
                         f"than batch_size={batch_size}")
    return training_set


def fixed_batch(training_set, batch_size: int, seed: int = 0) -> dict[str, np.ndarray]:
    """One batch (images uint8, given labels, indices) drawn without replacement."""
    idx = np.sort(np.random.default_rng(seed).permutation(training_set.x_train.shape[0])
                  [:batch_size]).astype(np.int32)
    return {"images": training_set.x_train[idx],
            "labels": training_set.noisy_labels[idx].astype(np.int32), "indices": idx}


def build_dsink_methods(config, training_set, rng):
    """The CE baseline method, the D-SINK student method and the teachers' step arguments.

    The student is assembled by the pipeline's own `pipelines.dsink.assemble_student` (per
    `config.dsink`: allocation mode, forward or cached teachers, class mass), except that the
    teachers are freshly initialised instead of trained: their weights' values do not change
    the cost of a step.

    Returns:
      (ce_method, dsink_method, teacher_variables): the teachers' variables (or cached tables)
      that the student's step takes, in the order of `ALLOCATION_TEACHERS[allocation]`.
    """
    d = config.dsink
    sample = training_set.x_train[:1]
    ce_method = pipelines.build_method(config, training_set, loss=d.baseline_loss)
    losses = pipelines.dsink.teacher_losses(config)
    stages = {}
    for i, role in enumerate(("noise_teacher", "imbalance_teacher")):
        method = pipelines.build_method(config, training_set, loss=losses[role])
        stages[role] = (method.model, step_lib.init_state(
            method, jax.random.fold_in(rng, i), sample).variables, 1.0)
    student = pipelines.dsink.assemble_student(config, training_set, stages)
    dsink_method = pipelines.build_method(config, training_set, objective=student["objective"],
                                          teacher_models=student["teacher_models"])
    return ce_method, dsink_method, student["teacher_variables"]


def stepper(jitted: Callable, state: Any, *args: Any) -> Callable[[int], None]:
    """`run(n)`: n calls of a donated `jitted(state, *args) -> (state, metrics)`, then blocks."""
    holder = {"state": state}

    def run(n: int) -> None:
        state, metrics = holder["state"], None
        for _ in range(n):
            state, metrics = jitted(state, *args)
        jax.block_until_ready((state, metrics))
        holder["state"] = state
    return run


def caller(jitted: Callable, *args: Any) -> Callable[[int], None]:
    """`run(n)`: n calls of a pure `jitted(*args)`, then blocks on the last output."""

    def run(n: int) -> None:
        out = None
        for _ in range(n):
            out = jitted(*args)
        jax.block_until_ready(out)
    return run


def time_interleaved(runners: dict[str, Callable[[int], None]], calls: dict[str, int], *,
                     repeats: int, warmup: int = 1, label: str = "") -> dict[str, list[float]]:
    """Seconds per call of each runner, one value per repeat; variants interleaved per repeat.

    Args:
      runners: name -> `run(n)` (runs n calls and blocks until the results are ready).
      calls: name -> calls per repeat (the time is divided by it).
      repeats: timed repeats.
      warmup: untimed calls per runner first (after compiling, which `run(1)` did already).
      label: printed with the progress line.

    Returns:
      name -> [seconds per call] of length `repeats`.
    """
    for run in runners.values():
        if warmup:
            run(warmup)
    seconds: dict[str, list[float]] = {name: [] for name in runners}
    for repeat in range(repeats):
        for name, run in runners.items():
            start = time.perf_counter()
            run(calls[name])
            seconds[name].append((time.perf_counter() - start) / calls[name])
        print(f"{label}repeat {repeat + 1}/{repeats}: "
              + ", ".join(f"{n} {1e3 * s[-1]:.1f} ms" for n, s in seconds.items()), flush=True)
    return seconds


def spread(values: list[float]) -> dict[str, float]:
    """Median, min and max of a list of seconds, in milliseconds."""
    return {"median_ms": 1e3 * statistics.median(values), "min_ms": 1e3 * min(values),
            "max_ms": 1e3 * max(values)}


def paired_ratio(numerator: list[float], denominator: list[float]) -> float:
    """Median over repeats of numerator_r / denominator_r.

    The two variants ran back to back in each repeat, so a load change between repeats (other
    processes on a shared machine) cancels in the per-repeat ratio; a complement to the ratio of
    the medians.
    """
    return statistics.median(a / b for a, b in zip(numerator, denominator))


def machine_line() -> str:
    """The software and machine the numbers were taken on, with the load at the end."""
    load = os.getloadavg()
    return (f"jax {jax.__version__} on {jax.default_backend()} ({jax.devices()[0].device_kind}), "
            f"{os.cpu_count()} CPUs, 1/5-min load average {load[0]:.1f}/{load[1]:.1f}")


def check_positive(args: argparse.Namespace, names: tuple[str, ...]) -> None:
    """Raises ValueError naming the first option of `names` that is below 1."""
    for name in names:
        value = getattr(args, name)
        if value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be an integer >= 1, got {value}.")


# ---------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    """Parses and checks the command line (ValueError before any work on a bad value)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet8", help=f"one of {', '.join(STEP_MODELS)}")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--extra-num-classes", default="100",
                        help="comma list of further class counts timed the same way; '' = none")
    parser.add_argument("--num-iters", type=int, default=50, help="Sinkhorn iterations")
    parser.add_argument("--refresh-images", type=int, default=12406,
                        help="training images of the dataset-level solve (CIFAR-10-LT r100)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats (medians over them)")
    parser.add_argument("--steps", type=int, default=5, help="steps per variant per repeat")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the rows here")
    args = parser.parse_args(argv)
    if args.model not in STEP_MODELS:
        raise ValueError(f"--model must be one of {STEP_MODELS}, got {args.model!r}.")
    check_positive(args, ("batch_size", "num_iters", "repeats", "steps"))
    try:
        extra = [int(c) for c in args.extra_num_classes.split(",") if c.strip()]
    except ValueError:
        raise ValueError(f"--extra-num-classes must be a comma list of ints >= 2, got "
                         f"{args.extra_num_classes!r}.") from None
    args.class_counts = [args.num_classes] + [c for c in extra if c != args.num_classes]
    if min(args.class_counts) < 2:
        raise ValueError(f"class counts must be >= 2, got {args.class_counts}.")
    return args


# (allocation, teachers) of the student variants timed beside the defaults' step.
STUDENT_VARIANTS = {"batch forward": ("batch", "forward"), "online forward": ("online", "forward"),
                    "online cached": ("online", "cached"), "dataset step": ("dataset", "forward")}


def build_runners(args: argparse.Namespace, num_classes: int
                  ) -> tuple[dict[str, Callable[[int], None]], dict[str, int]]:
    """The variants at one class count, compiled (one untimed call each), and the divisor
    that turns a call of each amortised variant into a per-step cost."""
    config = pipelines.dsink.build_config({**pipelines.dsink.ARGS, "dataset": "cifar10",
                                         "model": args.model, "preset": "cpu",
                                         "num_iters": args.num_iters, "seed": args.seed})
    config.optim.batch_size = args.batch_size
    training_set = synthetic_training_set(num_classes=num_classes, batch_size=args.batch_size,
                                          seed=args.seed)
    batch = jax.device_put(fixed_batch(training_set, args.batch_size, args.seed))
    sample = training_set.x_train[:1]
    rng = jax.random.PRNGKey(args.seed)
    teacher_rng = jax.random.fold_in(rng, 1)
    d = config.dsink

    def student_runner(allocation=None, teachers=None):
        student = config.copy_and_resolve_references()
        student.dsink.allocation = allocation or d.allocation
        student.dsink.teachers = teachers or d.teachers
        _, method, variables = build_dsink_methods(student, training_set, teacher_rng)
        jitted = jax.jit(functools.partial(step_lib.train_step, method=method),
                         donate_argnums=0)
        return method, stepper(jitted, step_lib.init_state(method, rng, sample), batch, variables)

    ce_method = pipelines.build_method(config, training_set, loss=d.baseline_loss)
    ce_step = jax.jit(functools.partial(step_lib.train_step, method=ce_method), donate_argnums=0)
    runners = {"ce step": stepper(ce_step, step_lib.init_state(ce_method, rng, sample), batch),
               "dsink step": student_runner()[1]}
    methods = {}
    for name, (allocation, teachers) in STUDENT_VARIANTS.items():
        methods[name], runners[name] = student_runner(allocation, teachers)

    # What the forward teachers cost: augmentation + both teacher forwards of the batch mode.
    batch_config = config.copy_and_resolve_references()
    batch_config.dsink.allocation, batch_config.dsink.teachers = "batch", "forward"
    _, _, batch_variables = build_dsink_methods(batch_config, training_set, teacher_rng)
    teachers_fwd = jax.jit(functools.partial(step_lib.prepare_batch,
                                             method=methods["batch forward"]))
    runners["teachers fwd"] = caller(teachers_fwd, rng, jnp.asarray(1, jnp.int32), batch,
                                     batch_variables)
    keys = jax.random.split(jax.random.fold_in(rng, 99), 3)
    noise_lp = jax.nn.log_softmax(3.0 * jax.random.normal(keys[0], (args.batch_size, num_classes)))
    student_lp = jax.nn.log_softmax(3.0 * jax.random.normal(keys[1],
                                                            (args.batch_size, num_classes)))
    batch_mass = jnp.mean(jax.nn.softmax(jax.random.normal(keys[2], (args.batch_size,
                                                                    num_classes))), 0)
    allocation = jax.jit(lambda n, s, m: sinkhorn_allocation(
        n, s, m, epsilon=d.epsilon, num_iters=d.num_iters, backend=d.backend,
        mode=d.sinkhorn_mode).allocation)
    runners["allocation"] = caller(allocation, noise_lp, student_lp, batch_mass)

    # The "dataset" mode's between-epochs solve over a training set of --refresh-images.
    mass = np.full(num_classes, 1.0 / num_classes, np.float32)
    refresh = dataset_allocation_refresh(
        d, noise_teacher_logits=np.zeros((args.refresh_images, num_classes), np.float32),
        class_mass=mass, class_counts=training_set.noisy_class_counts, every_epochs=1)
    refresh_images = np.random.default_rng(args.seed).integers(
        0, 256, (args.refresh_images,) + training_set.x_train.shape[1:], dtype=np.uint8)
    dataset_method = methods["dataset step"]
    predict = jax.jit(functools.partial(step_lib.test_logits, method=dataset_method))
    dataset_state = step_lib.init_state(dataset_method, rng, sample)

    def run_refresh(n: int) -> None:
        for _ in range(n):
            refresh(dataset_state, 0,
                    lambda s: step_lib.batched_predict(predict, s, refresh_images, 512))
    runners["refresh / step"] = run_refresh
    steps_per_epoch = max(args.refresh_images // args.batch_size, 1)
    for name, run in runners.items():
        start = time.perf_counter()
        run(1)  # compiles
        print(f"C={num_classes} {name}: compiled in {time.perf_counter() - start:.1f} s",
              flush=True)
    # One refresh serves an epoch: its time per call is divided by the epoch's steps.
    return runners, {"refresh / step": steps_per_epoch}


def summarise(seconds: dict[str, list[float]], num_classes: int) -> list[dict[str, Any]]:
    ce = statistics.median(seconds["ce step"])
    dsink = statistics.median(seconds["dsink step"])
    rows = []
    for name, values in seconds.items():
        row = {"num_classes": num_classes, "variant": name, **spread(values),
               "vs_ce_step": statistics.median(values) / ce,
               "vs_dsink_step": statistics.median(values) / dsink, "seconds": values}
        rows.append(row)
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'C':>4} {'variant':<15} {'median ms':>10} {'min-max ms':>15} {'/ ce step':>10} "
             f"{'/ dsink step':>13}"]
    for r in rows:
        lines.append(f"{r['num_classes']:>4} {r['variant']:<15} {r['median_ms']:>10.2f} "
                     f"{r['min_ms']:>7.2f}-{r['max_ms']:<7.2f} {r['vs_ce_step']:>9.3f}x "
                     f"{100 * r['vs_dsink_step']:>12.2f}%")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    runners: dict[str, Callable[[int], None]] = {}
    calls: dict[str, int] = {}
    divisors: dict[str, int] = {}
    for c in args.class_counts:
        built, per_step = build_runners(args, c)
        for name, run in built.items():
            key = f"C={c} {name}"
            runners[key] = run
            calls[key] = args.steps * (ALLOCATION_CALLS_PER_STEP if name == "allocation" else 1)
            if name in per_step:
                calls[key], divisors[key] = 1, per_step[name]
    seconds = time_interleaved(runners, calls, repeats=args.repeats)
    seconds = {k: [v / divisors.get(k, 1) for v in values] for k, values in seconds.items()}
    rows, verdicts = [], []
    for c in args.class_counts:
        prefix = f"C={c} "
        sub = {k[len(prefix):]: v for k, v in seconds.items() if k.startswith(prefix)}
        part = summarise(sub, c)
        rows += part
        by = {r["variant"]: r for r in part}
        ratio = by["dsink step"]["vs_ce_step"]
        alloc = by["allocation"]["vs_dsink_step"]
        verdicts.append({"num_classes": c, "dsink_over_ce": ratio, "allocation_over_dsink": alloc,
                         "dsink_over_ce_paired": paired_ratio(sub["dsink step"], sub["ce step"]),
                         "allocation_over_dsink_paired": paired_ratio(sub["allocation"],
                                                                      sub["dsink step"]),
                         "ratio_goal_met": ratio <= RATIO_GOAL, "allocation_goal_met": alloc < 0.02})
    print(f"\n{args.model}, batch {args.batch_size}, {args.num_iters} Sinkhorn iterations, "
          f"{args.repeats} repeats x {args.steps} steps (allocation x{ALLOCATION_CALLS_PER_STEP} "
          f"calls); medians; {machine_line()}")
    print(format_table(rows))
    for v in verdicts:
        print(f"C={v['num_classes']}: dsink/ce = {v['dsink_over_ce']:.3f}x (median of per-repeat "
              f"ratios {v['dsink_over_ce_paired']:.3f}x; goal <= {RATIO_GOAL}x: "
              f"{'met' if v['ratio_goal_met'] else 'NOT met'}); allocation/dsink = "
              f"{100 * v['allocation_over_dsink']:.2f} % (per-repeat "
              f"{100 * v['allocation_over_dsink_paired']:.2f} %; goal < 2 %: "
              f"{'met' if v['allocation_goal_met'] else 'NOT met'})")
    if args.json:
        record = {"script": "step_cost", "args": {k: v for k, v in vars(args).items()},
                  "machine": machine_line(), "rows": rows, "verdicts": verdicts}
        Path(args.json).write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
