"""Cost of the semi-discrete potential re-solve inside the OT-dynamic softmax training step.

Usage (from the repository root)::

    python benchmarks/ot_softmax_cost.py --num-classes 100 --batch-size 128 --repeats 5 \\
        --steps 3 --json /tmp/ot_softmax_cost.json

The step is the library's one `dsink_jax.train.step.train_step` with the OT-softmax objective
(`dsink_jax.train.objectives.make_ot_softmax_objective`: two augmented views, cosine classifier +
OT heights, SupCon, SGD update, then the warm-started re-solve of the heights), built as the
`ot_softmax` pipeline builds it: its config, a ResNet-8 backbone with a cosine head (feature dim
d = 64 at width 1) under `models.ProjectionNet`, the config's optimizer; jitted with the state
donated, on one fixed batch
of synthetic uint8 32x32 images with C classes (long tail 10, so nu = class frequencies is not
uniform). Variants, for every (solve_steps, num_samples) of ``--solve-steps`` x ``--num-samples``:

* ``step``: the step with ``solve_every=1`` (the re-solve runs at every step);
* ``solve``: the re-solve alone, jitted: `dsink_jax.ot.update_potential` with the arguments the step
  passes it (the classifier's weights [C, d], nu, warm start, the options' solver settings);

and once ``no-solve``: the same step with ``solve_every = 2**30``. `lax.cond` runs one branch, and
the condition is ``step % solve_every == 0``: the first (compiling) call is at step 0 and does
solve; every timed call is at step >= 1 and takes the identity branch.

Reported: solve / step (the direct measure; ratio of medians, and the median of per-repeat
ratios) and (step - no-solve) / step (the same from the
difference of two noisy step timings, as a cross-check). Goal (issue): < 10 % at C = 100,
d = 64.
"""
from __future__ import annotations

import argparse
import functools
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

# Runnable without installing the package: `python benchmarks/ot_softmax_cost.py`.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from dsink_jax import pipelines  # noqa: E402
from dsink_jax.models import classifier_weights  # noqa: E402
from dsink_jax.ot import update_potential  # noqa: E402
from dsink_jax.train import step as step_lib  # noqa: E402
from dsink_jax.train.objectives import OT_INFERENCE_MODES, make_ot_softmax_objective  # noqa: E402
from step_cost import (caller, check_positive, fixed_batch, machine_line,  # noqa: E402
                       paired_ratio, spread, stepper, synthetic_training_set, time_interleaved)

BACKBONES = ("cnn", "resnet8", "resnet20", "resnet32")  # cnn: the smoke run's
NEVER = 2 ** 30  # solve_every that no timed step reaches (int32 step counter)
SOLVE_CALLS_PER_STEP = 10  # the solve alone is short: more calls per repeat for resolution


def int_list(text: str, name: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise ValueError(f"--{name} must be a comma list of ints >= 1, got {text!r}.")
    return values


def parse_args(argv=None) -> argparse.Namespace:
    """Parses and checks the command line (ValueError before any work on a bad value)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet8", help=f"backbone, one of {BACKBONES}")
    parser.add_argument("--num-classes", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--solve-steps", default="1,5", help="comma list of dual steps per solve")
    parser.add_argument("--num-samples", default="1024,4096",
                        help="comma list of Monte-Carlo points per dual step")
    parser.add_argument("--inference", default="raw", choices=OT_INFERENCE_MODES,
                        help="'balanced' re-solves a second potential per step")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats (medians over them)")
    parser.add_argument("--steps", type=int, default=3, help="steps per variant per repeat")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the rows here")
    args = parser.parse_args(argv)
    if args.model not in BACKBONES:
        raise ValueError(f"--model must be one of {BACKBONES}, got {args.model!r}.")
    if args.num_classes < 2:
        raise ValueError(f"--num-classes must be >= 2, got {args.num_classes}.")
    check_positive(args, ("batch_size", "repeats", "steps"))
    args.solve_steps_list = int_list(args.solve_steps, "solve-steps")
    args.num_samples_list = int_list(args.num_samples, "num-samples")
    return args


def build(args: argparse.Namespace):
    """Config and training set, as the `ot_softmax` pipeline assembles them."""
    config = pipelines.ot_softmax.build_config({**pipelines.ot_softmax.ARGS, "dataset": "cifar100",
                                               "model": args.model, "preset": "cpu",
                                               "inference": args.inference, "seed": args.seed})
    config.optim.batch_size = args.batch_size
    training_set = synthetic_training_set(num_classes=args.num_classes,
                                          batch_size=args.batch_size, seed=args.seed)
    return config, training_set


def build_method(config, training_set, **solver):
    """The OT-softmax method with `config.ot_softmax` updated by `solver` (e.g. solve_every)."""
    options = config.ot_softmax.copy_and_resolve_references()
    with options.unlocked():
        options.update(solver)
    objective = make_ot_softmax_objective(options, class_counts=training_set.noisy_class_counts)
    return pipelines.build_method(config, training_set, objective=objective), options


def main(argv=None) -> int:
    args = parse_args(argv)
    config, training_set = build(args)
    batch = jax.device_put(fixed_batch(training_set, args.batch_size, args.seed))
    sample = training_set.x_train[:1]
    rng = jax.random.PRNGKey(args.seed)

    def step_runner(**solver):
        method, options = build_method(config, training_set, **solver)
        fn = jax.jit(functools.partial(step_lib.train_step, method=method), donate_argnums=0)
        return stepper(fn, step_lib.init_state(method, rng, sample), batch), method, options

    counts = np.maximum(training_set.noisy_class_counts, 1)
    nu = jnp.asarray(counts / counts.sum(), jnp.float32)  # train_target "prior"
    solves_per_step = 2 if args.inference == "balanced" else 1

    runners, calls, configs_run = {}, {}, []
    runners["no-solve"], method, _ = step_runner(solve_every=NEVER)
    state0 = step_lib.init_state(method, rng, sample)
    weights = classifier_weights(state0.params)  # [C, d]
    calls["no-solve"] = args.steps
    for k, n in itertools.product(args.solve_steps_list, args.num_samples_list):
        tag = f"{k}x{n}"
        runners[f"step {tag}"], _, options = step_runner(solve_every=1, solve_steps=k,
                                                         num_samples=n)
        calls[f"step {tag}"] = args.steps
        # The re-solve the training step makes.
        solve = jax.jit(lambda w, h, key, options=options: update_potential(
            h, w, nu, scale=options.scale, rng=key, num_samples=options.num_samples,
            num_steps=options.solve_steps, learning_rate=options.solver_learning_rate,
            entropic_epsilon=options.entropic_epsilon))
        runners[f"solve {tag}"] = caller(solve, weights, state0.extra["potential"],
                                         jax.random.fold_in(rng, 7))
        calls[f"solve {tag}"] = args.steps * SOLVE_CALLS_PER_STEP
        configs_run.append((k, n, tag))
    for name, run in runners.items():
        start = time.perf_counter()
        run(1)  # compiles; the no-solve step solves once here, at step 0
        print(f"{name}: compiled in {time.perf_counter() - start:.1f} s", flush=True)

    seconds = time_interleaved(runners, calls, repeats=args.repeats)
    med = {name: statistics.median(v) for name, v in seconds.items()}
    rows = [{"variant": "no-solve", "solve_steps": 0, "num_samples": 0,
             **spread(seconds["no-solve"]), "seconds": seconds["no-solve"]}]
    for k, n, tag in configs_run:
        step_s, solve_s = med[f"step {tag}"], solves_per_step * med[f"solve {tag}"]
        rows.append({
            "variant": tag, "solve_steps": k, "num_samples": n,
            **spread(seconds[f"step {tag}"]), "seconds": seconds[f"step {tag}"],
            "solve_ms": 1e3 * solve_s, "solve_min_max_ms": [1e3 * solves_per_step * min(
                seconds[f"solve {tag}"]), 1e3 * solves_per_step * max(seconds[f"solve {tag}"])],
            "solve_fraction": solve_s / step_s,
            "solve_fraction_paired": solves_per_step * paired_ratio(seconds[f"solve {tag}"],
                                                                    seconds[f"step {tag}"]),
            "difference_fraction": (step_s - med["no-solve"]) / step_s,
            "goal_met": solve_s / step_s < 0.10})

    d = weights.shape[1]
    print(f"\nOT-softmax step, {args.model} (d = {d}), C = {args.num_classes}, batch "
          f"{args.batch_size} x 2 views, inference {args.inference} ({solves_per_step} solve(s) "
          f"per step), {args.repeats} repeats x {args.steps} steps (solve alone x"
          f"{SOLVE_CALLS_PER_STEP} calls); medians; {machine_line()}")
    print(f"{'solve k x N':<12} {'step ms':>9} {'min-max':>17} {'solve ms':>9} "
          f"{'solve/step':>11} {'per-repeat':>11} {'(step-nosolve)/step':>20} {'goal <10%':>10}")
    for r in rows:
        if r["variant"] == "no-solve":
            print(f"{'no-solve':<12} {r['median_ms']:>9.1f} "
                  f"{r['min_ms']:>8.1f}-{r['max_ms']:<8.1f}")
            continue
        print(f"{r['variant']:<12} {r['median_ms']:>9.1f} {r['min_ms']:>8.1f}-{r['max_ms']:<8.1f} "
              f"{r['solve_ms']:>9.2f} {100 * r['solve_fraction']:>10.2f}% "
              f"{100 * r['solve_fraction_paired']:>10.2f}% "
              f"{100 * r['difference_fraction']:>19.1f}% "
              f"{'met' if r['goal_met'] else 'NOT met':>10}")
    if args.json:
        record = {"script": "ot_softmax_cost", "args": vars(args), "feature_dim": d,
                  "machine": machine_line(), "rows": rows}
        Path(args.json).write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
