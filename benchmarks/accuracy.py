r"""Accuracy benchmark: runs a family's pipeline on several data settings and collects one table.

D-SINK, the issue's four CIFAR-10 settings with the `cpu` preset (each setting trains CE, f_L,
f_N and the student; finished stages are reused when rerun):
  python benchmarks/accuracy.py --family=dsink --root=runs/accuracy_dsink \
    --data=npz:../shared/data/cifar10.npz \
    --settings="imbalance=100,noise=sym,noise_rate=0.4;imbalance=10,noise=sym,noise_rate=0.4;imbalance=100,noise=asym,noise_rate=0.2;imbalance=10,noise=imb,noise_rate=0.4"
OT-dynamic softmax (clean labels and sym 0.2, ratios 100 and 10):
  python benchmarks/accuracy.py --family=ot_softmax --root=runs/accuracy_ots \
    --data=npz:../shared/data/cifar10.npz \
    --settings="imbalance=100,noise=none;imbalance=10,noise=none;imbalance=100,noise=sym,noise_rate=0.2;imbalance=10,noise=sym,noise_rate=0.2"

Writes ROOT/accuracy.md and ROOT/accuracy.json (every stage of every setting, with wall time).

Shot groups: the library's defaults (many > 100, few < 20 training images) leave CIFAR-10-LT
without a few-shot group (its smallest class keeps 50 images at ratio 100), so this table also
regroups the per-class accuracies with --many/--few (default 1500 / 200 for 10 classes: at ratio
100 many = {5000, 2997, 1796}, medium = {1077, 645, 387, 232}, few = {139, 83, 50}).
"""

import argparse
import json
import os
import sys
import time

from dsink_jax import configs, pipelines
from dsink_jax.train import metrics as metrics_lib

BUILDERS = {
    "baseline": (configs.COMMON_ARGS, lambda a: configs.build_config("baseline", a)),
    "dsink": (configs.DSINK_ARGS, configs.build_dsink_config),
    "ot_softmax": (configs.OT_SOFTMAX_ARGS, configs.build_ot_softmax_config),
}


def regroup(row: dict, class_counts, many: int, few: int) -> dict:
    """The row with many/medium/few recomputed from its per-class accuracies."""
    return {**row, **metrics_lib.shot_group_accuracies(
        row["per_class_accuracy"], class_counts, many_threshold=many, few_threshold=few)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", choices=sorted(BUILDERS), default="dsink")
    parser.add_argument("--data", default="npz:../shared/data/cifar10.npz")
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--settings", required=True,
                        help="';'-separated config argument strings, one per setting")
    parser.add_argument("--extra", default="", help="config arguments added to every setting")
    parser.add_argument("--root", required=True)
    parser.add_argument("--many", type=int, default=1500, help="many-shot: more images than this")
    parser.add_argument("--few", type=int, default=200, help="few-shot: fewer images than this")
    args = parser.parse_args()
    if not 0 <= args.few <= args.many:
        parser.error(f"need 0 <= --few ({args.few}) <= --many ({args.many})")

    defaults, build = BUILDERS[args.family]
    sections, records = [], []
    for setting in [s for s in args.settings.split(";") if s.strip()]:
        arg = ",".join(x for x in (f"dataset={args.data}", f"preset={args.preset}", setting,
                                   args.extra) if x)
        config = build(configs.parse_arg_string(arg, defaults))
        workdir = os.path.join(args.root, setting.replace(",", "_").replace("=", "-"))
        print(f"=== {args.family}: {setting} -> {workdir}", file=sys.stderr, flush=True)
        start = time.perf_counter()
        summary = pipelines.run(config, workdir)
        seconds = time.perf_counter() - start
        with open(os.path.join(workdir, "results.json")) as f:
            counts = json.load(f)["data"]["class_counts"]
        regrouped = [regroup(row, counts, args.many, args.few) for row in summary["stages"]]
        sections.append(
            f"## {setting}\n\nclass counts {counts}; groups: many > {args.many}, "
            f"few < {args.few}\n\n{pipelines.results_table(regrouped)}\n\n"
            f"wall time {seconds / 60:.1f} min (a reused stage takes ~0)\n")
        records.append({"setting": setting, "seconds": seconds, "class_counts": counts,
                        "stages": regrouped})
    markdown = f"# Accuracy: {args.family}, preset {args.preset}, {args.data}\n\n" + "\n".join(
        sections)
    os.makedirs(args.root, exist_ok=True)
    with open(os.path.join(args.root, "accuracy.md"), "w") as f:
        f.write(markdown)
    with open(os.path.join(args.root, "accuracy.json"), "w") as f:
        json.dump(records, f, indent=2, default=str)
    print(markdown)


if __name__ == "__main__":
    main()
