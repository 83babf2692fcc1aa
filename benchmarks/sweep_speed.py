"""Speed of a vmapped D-SINK sweep against the same students trained one after another.

Usage (from the repository root)::

    python benchmarks/sweep_speed.py --model mlp --json /tmp/sweep_mlp.json
    python benchmarks/sweep_speed.py --model resnet8 --json /tmp/sweep_resnet8.json

Eight D-SINK students (one per alpha of ``--alphas``) train on the same batch:

* ``vmapped``: `dsink_jax.train.step.members_step` for S steps: the batch is augmented and the two
  frozen teachers run once per step for all members, the student update is vmapped over the
  member axis (the program `run_dsink_sweep` runs);
* ``sequential``: the single-student `train_step`, jitted once, run for S steps on each member in
  turn (8 S calls). Alpha lives in `state.extra["hparams"]` (as `init_members` stores it), so the
  eight students share one compiled program and nothing recompiles.

Both do 8 S student updates; the table gives the time per student-step (median over repeats,
the two variants interleaved per repeat) and the speed-up sequential / vmapped. The sequential
runs also repeat the teachers' forward pass for every student, which the sweep shares: that is
part of what a sweep saves, and part of the measured speed-up.

Data: ``--model mlp`` (default) trains on scikit-learn's 8x8 digits (`load_dataset("digits")`,
the `cpu` preset: batch 64), where per-call dispatch dominates; the CIFAR ResNets train on
synthetic 32x32 uint8 images (the `cpu` preset: batch 128), where the arithmetic dominates.

Goal (issue): speed-up >= 1.5x on a 2-core CPU. Expected there (benchmarks/README.md): about
1.3-1.8x for the mlp, whose speed-up is bounded by the shared teacher forward (a third of a
single step) and the saved dispatch; well below 1x for the ResNets, because vmapping a
convolution over the members' kernels lowers to a grouped convolution (``feature_group_count =
members``), which XLA:CPU runs far slower than M separate convolutions.
"""
from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from pathlib import Path

import jax

# Runnable without installing the package: `python benchmarks/sweep_speed.py`.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from dsink_jax import pipelines  # noqa: E402
from dsink_jax.train import step as step_lib  # noqa: E402
from step_cost import (build_dsink_methods, check_positive, fixed_batch,  # noqa: E402
                       machine_line, paired_ratio, spread, stepper, synthetic_training_set,
                       time_interleaved)

SWEEP_MODELS = ("mlp", "cnn", "resnet8", "resnet20", "resnet32")
DEFAULT_ALPHAS = "0.5,1,2,3,5,7,10,15"
DEFAULT_STEPS = {"mlp": 20, "cnn": 5}  # the ResNets: 1 (8 students x 1 s each per step on CPU)


def parse_args(argv=None) -> argparse.Namespace:
    """Parses and checks the command line (ValueError before any work on a bad value)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mlp", help=f"one of {', '.join(SWEEP_MODELS)}")
    parser.add_argument("--alphas", default=DEFAULT_ALPHAS,
                        help="comma list of alpha values, one student each")
    parser.add_argument("--batch-size", type=int, default=0,
                        help="0: the cpu preset's (64 on digits, 128 on 32x32)")
    parser.add_argument("--steps", type=int, default=0,
                        help="S, steps per student per repeat; 0: 20 for mlp, 5 cnn, 1 ResNets")
    parser.add_argument("--repeats", type=int, default=7, help="timed repeats (medians over them)")
    parser.add_argument("--variants", default="vmapped,unrolled,sequential",
                        help="comma list among vmapped, unrolled, sequential (sequential always "
                             "runs: it is the yardstick); the unrolled program compiles M times "
                             "the step, which an accelerator does not need")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the rows here")
    args = parser.parse_args(argv)
    if args.model not in SWEEP_MODELS:
        raise ValueError(f"--model must be one of {SWEEP_MODELS}, got {args.model!r}.")
    try:
        args.alpha_list = [float(a) for a in args.alphas.split(",") if a.strip()]
    except ValueError:
        raise ValueError(f"--alphas must be a comma list of numbers >= 0, got "
                         f"{args.alphas!r}.") from None
    if len(args.alpha_list) < 2 or min(args.alpha_list) < 0:
        raise ValueError(f"--alphas needs at least 2 values, all >= 0, got {args.alphas!r}.")
    if args.batch_size < 0 or args.steps < 0:
        raise ValueError(f"--batch-size and --steps must be >= 0 (0 = default), got "
                         f"{args.batch_size} and {args.steps}.")
    args.variant_list = [v.strip() for v in args.variants.split(",") if v.strip()]
    if not set(args.variant_list) <= {"vmapped", "unrolled", "sequential"}:
        raise ValueError(f"--variants must list vmapped, unrolled, sequential; got "
                         f"{args.variants!r}.")
    if "sequential" not in args.variant_list:
        args.variant_list.append("sequential")
    args.steps = args.steps or DEFAULT_STEPS.get(args.model, 1)
    check_positive(args, ("steps", "repeats"))
    return args


def build(args: argparse.Namespace):
    """Config, training set and the D-SINK method, as `run_dsink_sweep` assembles them."""
    digits = args.model in ("mlp", "cnn")
    config = pipelines.dsink.build_config({**pipelines.dsink.ARGS,
                                         "dataset": "digits" if digits else "cifar10",
                                         "model": args.model, "preset": "cpu",
                                         "seed": args.seed})
    if args.batch_size:
        config.optim.batch_size = args.batch_size
    if digits:
        training_set = pipelines.prepare_training_set(config)  # sklearn's digits, bundled
    else:
        training_set = synthetic_training_set(num_classes=10, batch_size=config.optim.batch_size,
                                              seed=args.seed)
    if config.optim.batch_size > training_set.x_train.shape[0]:
        raise ValueError(f"--batch-size {config.optim.batch_size} exceeds the training set "
                         f"({training_set.x_train.shape[0]} images).")
    _, method, teacher_variables = build_dsink_methods(
        config, training_set, jax.random.fold_in(jax.random.PRNGKey(args.seed), 1))
    return config, training_set, method, teacher_variables


def main(argv=None) -> int:
    args = parse_args(argv)
    config, training_set, method, teacher_variables = build(args)
    members = pipelines.dsink.members_of({"alpha": args.alpha_list}, config)
    num_members = len(members)
    sample = training_set.x_train[:1]
    batch = jax.device_put(fixed_batch(training_set, config.optim.batch_size, args.seed))
    data_rng = jax.random.split(jax.random.PRNGKey(config.seed))[1]

    # (i) the sweep's program, as the loop jits it for a sweep; (i') the same program with the
    # member updates written out one after another (`--members=unroll`).
    def sweep_runner(mode):
        fn = jax.jit(functools.partial(step_lib.members_step, data_rng=data_rng, method=method,
                                       mode=mode), donate_argnums=0)
        return stepper(fn, pipelines.dsink.init_members(method, members, sample), batch,
                       teacher_variables)

    # (ii) one single-student program (train_step, donated; the loop's jit on one device), run
    # on each member in turn.
    single_fn = jax.jit(functools.partial(step_lib.train_step, method=method), donate_argnums=0)
    stacked = pipelines.dsink.init_members(method, members, sample)
    singles = [stepper(single_fn, jax.tree.map(lambda x, i=i: x[i], stacked), batch,
                       teacher_variables) for i in range(num_members)]

    def sequential(n: int) -> None:
        for run in singles:
            run(n)

    compile_s = {}
    variants = {name: sequential if name == "sequential" else sweep_runner(
        {"vmapped": "vmap", "unrolled": "unroll"}[name]) for name in args.variant_list}
    for name, run in variants.items():
        start = time.perf_counter()
        run(1)  # compiles (sequential: once, then 7 cached calls)
        compile_s[name] = time.perf_counter() - start
        print(f"{name}: compiled and ran one step in {compile_s[name]:.1f} s", flush=True)

    seconds = time_interleaved(variants, {name: args.steps for name in variants},
                               repeats=args.repeats)
    # Per call: one step of all members; per student-step: divided by the member count.
    per_student = {k: [s / num_members for s in v] for k, v in seconds.items()}
    def speedup_of(name):  # sequential / name: the ratio of medians, and per repeat
        if name not in per_student:
            return None, None
        return (statistics.median(per_student["sequential"]) / statistics.median(
            per_student[name]), paired_ratio(per_student["sequential"], per_student[name]))
    speedup, paired = speedup_of("vmapped")
    unroll_speedup, _ = speedup_of("unrolled")
    rows = [{"model": args.model, "variant": name, "members": num_members,
             "batch_size": config.optim.batch_size,
             "image_shape": list(training_set.x_train.shape[1:]), "steps": args.steps,
             **spread(values), "first_call_s": compile_s[name], "seconds_per_student_step": values}
            for name, values in per_student.items()]

    shape = "x".join(str(s) for s in training_set.x_train.shape[1:])
    print(f"\n{args.model} on {shape} ({training_set.name}), batch {config.optim.batch_size}, "
          f"{num_members} students (alpha {args.alphas}), {args.repeats} repeats x "
          f"{args.steps} steps x {num_members} students; medians; {machine_line()}")
    print(f"{'variant':<11} {'ms / student-step':>18} {'min-max':>17} {'first call s':>13}")
    # unrolled: sweep_step(members="unroll"), the member updates written out in one program.
    for r in rows:
        print(f"{r['variant']:<11} {r['median_ms']:>18.2f} "
              f"{r['min_ms']:>8.2f}-{r['max_ms']:<8.2f} {r['first_call_s']:>13.1f}")
    if speedup is not None:
        print(f"speed-up sequential / vmapped = {speedup:.2f}x (median of per-repeat ratios "
              f"{paired:.2f}x; goal >= 1.5x: {'met' if speedup >= 1.5 else 'NOT met'})")
    if unroll_speedup is not None:
        print(f"speed-up sequential / unrolled (--members=unroll) = {unroll_speedup:.2f}x")
    if args.json:
        record = {"script": "sweep_speed", "args": vars(args), "machine": machine_line(),
                  "rows": rows, "speedup": speedup, "speedup_paired": paired,
                  "speedup_unrolled": unroll_speedup,
                  "goal_met": None if speedup is None else speedup >= 1.5}
        Path(args.json).write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
