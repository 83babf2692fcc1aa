r"""Accuracy benchmark: a family's pipeline over data settings, student variants and seeds.

Every (setting, seed) trains in its own workdir, ROOT/<setting>/seed<k>/. The teachers of the
`dsink` family live there under their loss's name (`ce/`, `la/`, `gce/`, ...), so every variant
of the student trained in that workdir reuses them, and another f_N or f_L only adds a stage.
Each student variant trains in `student_<variant>/`. Finished stages are reused and an
interrupted one resumes when the same command runs again, so the script is resumable as a
whole: rerun it after an interruption, or with more variants or seeds.

D-SINK, the four CIFAR-10 settings of the README with the `cpu` preset, two seeds:
  python benchmarks/accuracy.py --family=dsink --root=runs/accuracy_dsink --seeds=0,1 \
    --data=npz:../shared/data/cifar10.npz \
    --settings="imbalance=100,noise=sym,noise_rate=0.4;imbalance=100,noise=asym,noise_rate=0.2;imbalance=10,noise=sym,noise_rate=0.4;imbalance=10,noise=imb,noise_rate=0.4"
Overrides of every stage (teachers included), e.g. the whole protocol in bfloat16, or f_L alone
trained twice as long (the baseline family trains one stage):
  python benchmarks/accuracy.py --family=baseline --root=runs/la60 --set=optim.epochs=60 \
    --settings="imbalance=100,noise=sym,noise_rate=0.4,loss=la"
Several workdirs at once (`--jobs=N` processes, each a (setting, seed) with its variants in turn;
on a 2-core CPU two processes trained at 1.4-2x the images/s of one):
  python benchmarks/accuracy.py --family=dsink --root=runs/accuracy_dsink --seeds=0,1 --jobs=2 \
    --settings="imbalance=100,noise=sym,noise_rate=0.4"
A grid of students as one program per workdir (`experiments/sweep.py`'s sweep, here with the
records of every member; `--sweep-members=unroll`, the default, suits conv nets on a CPU): a
member whose values are the defaults is the default student, one that changes epsilon alone is
summarised with a variant that does the same (`e1:dsink.epsilon=1`), under the variant's name:
  python benchmarks/accuracy.py --family=dsink --root=runs/acc --seeds=2 \
    --settings="imbalance=100,noise=asym,noise_rate=0.2" --sweep="alpha=1,2,5;epsilon=1,2,4"
An ablation: named student variants, each a list of config overrides (`;` between variants):
  python benchmarks/accuracy.py --family=dsink --root=runs/ablation \
    --settings="imbalance=100,noise=sym,noise_rate=0.4" \
    --variants="batch_ce:dsink.allocation=batch,dsink.base_loss=ce;dataset_la:dsink.allocation=dataset,dsink.base_loss=la"
OT-dynamic softmax (clean labels and sym 0.2, ratios 100 and 10):
  python benchmarks/accuracy.py --family=ot_softmax --root=runs/accuracy_ots \
    --settings="imbalance=100,noise=none;imbalance=10,noise=none;imbalance=100,noise=sym,noise_rate=0.2;imbalance=10,noise=sym,noise_rate=0.2"

Writes ROOT/accuracy.md (per setting: one row per stage, mean +- std over the seeds, the
student's post-hoc corrections and allocation diagnostics), ROOT/accuracy.json (every stage
of every run, with its wall time and the exact overrides) and, for the dsink family,
ROOT/accuracy_summary.md and ROOT/accuracy_summary.png (per setting CE, f_L, f_N and each student,
mean +- std, as a table and as bars with error bars), after every finished run.

The same summary from records already written (no training): the committed records under
benchmarks/results/, one JSON list per run, as the README's table and picture are made:
  python benchmarks/accuracy.py --summarize="benchmarks/results/cpu_*.json" \
    --out=benchmarks/results/summary

Shot groups: the library's defaults (many > 100, few < 20 training images) leave CIFAR-10-LT
without a few-shot group (its smallest class keeps 50 images at ratio 100), so this table also
regroups the per-class accuracies with --many/--few (default 1500 / 200 for 10 classes: at ratio
100 many = {5000, 2997, 1796}, medium = {1077, 645, 387, 232}, few = {139, 83, 50}).
"""

import argparse
import glob
import json
import os
import sys
import time
from typing import NamedTuple

import numpy as np

from dsink_jax import configs, pipelines, plots
from dsink_jax.train import metrics as metrics_lib
from dsink_jax.train import workdir as workdir_lib

BUILDERS = {
    "baseline": (configs.COMMON_ARGS, lambda a: configs.build_config("baseline", a)),
    "dsink": (pipelines.dsink.ARGS, pipelines.dsink.build_config),
    "ot_softmax": (pipelines.ot_softmax.ARGS, pipelines.ot_softmax.build_config),
}
SWEPT_HERE = ("alpha", "epsilon")  # a student's own options, recorded as dsink.* overrides
GROUPS = ("test_accuracy", "many_shot_accuracy", "medium_shot_accuracy", "few_shot_accuracy")
COLUMNS = GROUPS + ("correction_rate",)


def parse_variants(spec: str) -> list[tuple[str, dict[str, str]]]:
    """`"a:x.y=1,z=2;b:"` -> [("a", {"x.y": "1", "z": "2"}), ("b", {})]."""
    variants = []
    for item in [v.strip() for v in spec.split(";") if v.strip()]:
        name, _, overrides = item.partition(":")
        name = name.strip()
        if not name.replace("_", "").isalnum():
            raise SystemExit(f"--variants: name {name!r} must be letters, digits and _")
        pairs = {}
        for pair in [p.strip() for p in overrides.split(",") if p.strip()]:
            key, eq, value = pair.partition("=")
            if not eq:
                raise SystemExit(f"--variants {name}: {pair!r} is not of the form key=value")
            pairs[key.strip()] = value.strip()
        variants.append((name, pairs))
    if len({n for n, _ in variants}) != len(variants):
        raise SystemExit("--variants: names must be unique")
    return variants


def apply_overrides(config, overrides: dict[str, str]) -> None:
    """Sets dotted config fields from strings, typed like the field (as `--config.x=y` does)."""
    for key, text in overrides.items():
        *path, leaf = key.split(".")
        node = config
        for part in path:
            node = node[part]
        if leaf not in node:
            raise SystemExit(f"unknown config field {key!r}")
        current = node[leaf]
        if isinstance(current, bool):
            value = text.lower() in ("1", "true")
        elif isinstance(current, (int, float, str)):
            value = type(current)(text)
        else:
            raise SystemExit(f"config field {key!r} of type {type(current).__name__} cannot be "
                             "overridden here")
        node[leaf] = value


def regroup(row: dict, class_counts, many: int, few: int) -> dict:
    """The row with many/medium/few recomputed from its per-class accuracies."""
    out = {**row, **metrics_lib.shot_group_accuracies(
        row["per_class_accuracy"], class_counts, many_threshold=many, few_threshold=few)}
    if row.get("posthoc"):
        out["posthoc"] = {name: {**p, **metrics_lib.shot_group_accuracies(
            p["per_class_accuracy"], class_counts, many_threshold=many, few_threshold=few)}
            for name, p in row["posthoc"].items()}
    return out


def mean_std(values: list) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{100 * values[0]:.1f}"
    return f"{100 * np.mean(values):.1f} ± {100 * np.std(values, ddof=1):.1f}"


def stage_key(record: dict) -> str:
    if record["name"] == "student":
        d = record.get("dsink") or {}
        noise = (record.get("teacher_losses") or {}).get("noise_teacher", d.get("noise_loss"))
        return (f"student {record.get('variant') or ''} (f_L {d.get('imbalance_loss')}, "
                f"f_N {noise})").replace("  ", " ")
    return f"{record['name']} ({record['loss']})"


def setting_table(records: list[dict]) -> str:
    """One row per stage (teachers deduplicated by role and loss), mean ± std over seeds."""
    by_key: dict[str, list[dict]] = {}
    for r in records:
        by_key.setdefault(stage_key(r), [])
        # A teacher appears once per variant run of a seed: keep one per seed.
        if all(x["seed"] != r["seed"] for x in by_key[stage_key(r)]):
            by_key[stage_key(r)].append(r)
    header = ("| stage | seeds | overall | many | medium | few | corrected | alloc. acc. "
              "| - log label prior | - log class mass | min/stage |")
    lines = [header, "|" + "---|" * 11]
    for key, rows in by_key.items():
        cells = [key, str(len(rows))] + [mean_std([r.get(c) for r in rows]) for c in COLUMNS]
        cells.append(mean_std([r.get("allocation_accuracy") for r in rows]))
        for prior in ("label_prior", "class_mass"):
            cells.append(mean_std([(r.get("posthoc") or {}).get(prior, {}).get("test_accuracy")
                                   for r in rows]))
        minutes = [r["wall_seconds"] / 60 for r in rows if r.get("wall_seconds")]
        cells.append(f"{np.median(minutes):.1f}" if minutes else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# The rows of the summary: the teachers by role, then each student variant.
ROLES = (("baseline", "CE"), ("imbalance_teacher", "f_L"), ("noise_teacher", "f_N"))


CURVE_KEYS = ("test_accuracy", "train_loss", "train_accuracy", "correction_rate")


def stage_curve(stage_dir: str) -> list[dict]:
    """The stage's evaluations over epochs, from its metrics.jsonl: one {epoch, test_accuracy,
    train_loss, train_accuracy, correction_rate} per evaluated epoch (the early-learning peak
    and the drop of a model that memorises); [] where the stage left no metrics."""
    path = os.path.join(stage_dir, "metrics.jsonl")
    columns = {k: dict(zip(*plots.read_metric_curve(path, k))) for k in CURVE_KEYS}
    return [{"epoch": e, **{k: columns[k].get(e) for k in CURVE_KEYS}}
            for e in sorted(columns["test_accuracy"])]


def augmented(record: dict) -> bool:
    """Whether the run trained with crop or flip: its protocol says so, or (records written
    before the protocol carried it) its `--set` overrides turned both off."""
    p, given = record.get("protocol") or {}, record.get("set") or {}
    if "augment" in p:
        return bool(p["augment"])
    return not (str(given.get("data.crop_padding")) == "0"
                and str(given.get("data.flip")).lower() == "false")


def protocol_label(record: dict) -> str:
    """What the teachers were trained with: "cpu: resnet8, bfloat16, 30 epochs" (", no
    augmentation" where the run had none)."""
    p = record.get("protocol") or {}
    return f"{p.get('preset', '?')}: {p.get('model', '?')}, {p.get('dtype', '?')}, " \
           f"{p.get('epochs', '?')} epochs" + ("" if augmented(record) else ", no augmentation")


def single_model_setting(record: dict) -> str | None:
    """A baseline-family record (one model, named by its loss; its setting names the loss too,
    `...,loss=gce`): the setting without the loss, so that the model joins the D-SINK runs of
    that setting; else None."""
    parts = record["setting"].split(",")
    if record["name"] in ("student", "imbalance_teacher", "noise_teacher") or \
            f"loss={record['loss']}" not in parts:
        return None
    return ",".join(p for p in parts if p != f"loss={record['loss']}")


def effective_changes(overrides: dict | None) -> tuple | None:
    """What a student variant's overrides change in the dsink family's defaults, as sorted
    (field, value) pairs: `()` for a variant that changes nothing (e.g.
    `cached:dsink.teachers=cached` once `cached` became the default, or a sweep member with the
    default alpha and epsilon), the same pairs for `e1:dsink.epsilon=1` and for the sweep
    member `alpha2_epsilon1`. None where an override is not a student option (`optim.epochs`
    also changes the teachers): such a variant is only ever its own."""
    overrides = overrides or {}
    if not all(key.startswith("dsink.") for key in overrides):
        return None
    changed = pipelines.dsink.build_config(pipelines.dsink.ARGS)
    default = changed.dsink.to_dict()  # flat: dsink.* overrides change nothing else
    apply_overrides(changed, overrides)
    return tuple(sorted((f"dsink.{k}", v) for k, v in changed.dsink.items() if default[k] != v))


def changes_nothing(overrides: dict | None) -> bool:
    """Whether a student variant's overrides leave the dsink family's defaults as they are: its
    student is the default's and is summarised with it."""
    return effective_changes(overrides) == ()


def summary_groups(records: list[dict]) -> dict:
    """{(setting, protocol): {column: [one record per seed]}}: the teachers by role (one per
    seed), each student by what its variant changes (named after the first variant seen to
    change that, "default" for nothing), a model of the baseline family (one loss, trained
    alone) as "single model (loss)" beside them. `protocol` is the whole-run overrides (`--set`)."""
    groups: dict = {}
    named: dict = {}  # a student's effective changes -> the first variant name that made them
    for r in records:
        single = single_model_setting(r)
        key = (single or r["setting"], protocol_label(r))
        if r["name"] == "student":
            changes = effective_changes(r.get("overrides"))
            column = "student " + ("default" if changes == () else named.setdefault(
                changes if changes is not None else ("variant", r["variant"]), r["variant"]))
        elif single is not None:
            column = f"single model ({r['loss']})"
        else:
            column = dict(ROLES).get(r["name"], r["name"])
            column = f"{column} ({r['loss']})"
        seeds = groups.setdefault(key, {}).setdefault(column, {})
        seeds.setdefault(r["seed"], r)  # a teacher appears once per student run of a seed
    return {k: {c: [v[s] for s in sorted(v)] for c, v in cols.items()}
            for k, cols in groups.items()}


def summary_table(records: list[dict]) -> str:
    """Per setting: CE, f_L, f_N and every student, overall (few-shot) accuracy, mean ± std,
    and each student's margin over the best teacher (difference of the unrounded means over
    the student's seeds)."""
    lines = ["| setting | protocol | model | seeds | overall (few-shot) | student - best "
             "teacher |", "|---|---|---|---|---|---|"]
    for (setting, protocol), columns in summary_groups(records).items():
        teachers = {c: rows for c, rows in columns.items() if not c.startswith("student")}
        for column, rows in columns.items():
            cell = (f"{mean_std([r['test_accuracy'] for r in rows])} "
                    f"({mean_std([r.get('few_shot_accuracy') for r in rows])})")
            margin = "-"
            seeds = {r["seed"] for r in rows}
            # Against each teacher's mean over the student's own seeds.
            best = max((np.mean([t["test_accuracy"] for t in ts if t["seed"] in seeds])
                        for ts in teachers.values()
                        if seeds <= {t["seed"] for t in ts}), default=None)
            if column.startswith("student") and best is not None:
                margin = f"{100 * (np.mean([r['test_accuracy'] for r in rows]) - best):+.2f}"
            lines.append(f"| {setting} | {protocol} | {column} | "
                         f"{', '.join(str(r['seed']) for r in rows)} | {cell} | {margin} |")
    return "\n".join(lines)


def summary_plot(records: list[dict], path: str) -> None:
    """Bars: per setting, each teacher and student's mean test accuracy, error bars = std."""
    import matplotlib  # pylint: disable=import-outside-toplevel
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

    groups = summary_groups(records)
    columns = list(dict.fromkeys(c for cols in groups.values() for c in cols))
    colors = {c: plt.get_cmap("tab10")(i % 10) for i, c in enumerate(columns)}
    width = 0.8 / max(max(len(cols) for cols in groups.values()), 1)
    fig, ax = plt.subplots(figsize=(max(6, 2.2 * len(groups)), 4.5))
    lowest, labelled = 100.0, set()
    for g, cols in enumerate(groups.values()):  # each group's own columns, centred on it
        for j, (column, rows) in enumerate(cols.items()):
            values = [100 * r["test_accuracy"] for r in rows]
            x = g + (j - (len(cols) - 1) / 2) * width
            mean = float(np.mean(values))
            std = np.std(values, ddof=1) if len(values) > 1 else 0.0
            ax.bar(x, mean, width, yerr=std, capsize=3, color=colors[column],
                   label=None if column in labelled else column)
            labelled.add(column)
            ax.text(x, mean + std + 0.3, f"{mean:.1f}\nn={len(values)}",
                    ha="center", va="bottom", fontsize=6)
            lowest = min(lowest, mean)
    ax.set_ylim(bottom=max(0.0, 5 * np.floor(lowest / 5) - 10))  # the differences, visible
    labels = [setting.replace(",", "\n") + "\n" + protocol.replace(": ", "\n")
              for setting, protocol in groups]
    ax.set_xticks(np.arange(len(groups)), labels, fontsize=7)
    ax.set_ylabel("test accuracy (%), mean ± std over seeds")
    ax.set_title("D-SINK student against its teachers")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_summary(records: list[dict], prefix: str, header: str = "") -> str:
    """PREFIX.md (the summary table) and PREFIX.png (its picture); returns the markdown."""
    markdown = header + summary_table(records) + "\n"
    os.makedirs(os.path.dirname(prefix) or ".", exist_ok=True)
    with open(prefix + ".md", "w") as f:
        f.write(markdown)
    summary_plot(records, prefix + ".png")
    return markdown


def write_outputs(root: str, header: str, records: list[dict], settings: list[str],
                  args) -> str:
    sections = []
    for setting in settings:
        rs = [r for r in records if r["setting"] == setting]
        if not rs:
            continue
        sections.append(f"## {setting}\n\nclass counts {rs[0]['class_counts']}; groups: many > "
                        f"{args.many}, few < {args.few}; accuracies in %, mean ± std over "
                        f"seeds (std with n - 1)\n\n{setting_table(rs)}\n")
    variants = sorted({(r.get("variant"), json.dumps(r.get("overrides"))) for r in records
                       if r.get("variant")})
    legend = "\n".join(f"- `{v}`: `{o}`" for v, o in variants)
    markdown = header + "\n".join(sections) + (f"\nStudent variants:\n\n{legend}\n" if legend
                                                else "")
    os.makedirs(root, exist_ok=True)
    for name, text in (("accuracy.md", markdown),
                       ("accuracy.json", json.dumps(records, indent=2, default=str))):
        with open(os.path.join(root, name + ".tmp"), "w") as f:
            f.write(text)
        os.replace(os.path.join(root, name + ".tmp"), os.path.join(root, name))
    if args.family == "dsink":
        write_summary(records, os.path.join(root, "accuracy_summary"), header)
    return markdown


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", choices=sorted(BUILDERS), default="dsink")
    parser.add_argument("--data", default="npz:../shared/data/cifar10.npz")
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--summarize", default="",
                        help="glob of accuracy.json record files: write --out.md / --out.png "
                             "from them and train nothing")
    parser.add_argument("--out", default="", help="--summarize: the output prefix")
    parser.add_argument("--settings", default="",
                        help="';'-separated config argument strings, one per setting")
    parser.add_argument("--extra", default="", help="config arguments added to every setting")
    parser.add_argument("--set", default="", dest="overrides",
                        help="field=value,... config overrides of every stage of every run "
                             "(e.g. model.dtype=bfloat16,optim.epochs=60), before --variants")
    parser.add_argument("--variants", default="",
                        help="dsink only: ';'-separated NAME:field=value,... student variants")
    parser.add_argument("--sweep", default="",
                        help="dsink only: ';'-separated NAME=v1,v2,... of dsink.alpha and "
                             "dsink.epsilon (alpha=1,2,5;epsilon=1,2,4): every (setting, seed) "
                             "also trains that grid of students as one program "
                             "(experiments/sweep.py's), after its --variants")
    parser.add_argument("--sweep-members", default="unroll", choices=("unroll", "vmap"),
                        help="the sweep's members: unroll (conv nets on a CPU) or vmap")
    parser.add_argument("--sweep-name", default="sweep",
                        help="the sweep's directory in each workdir")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds")
    parser.add_argument("--root", default="")
    parser.add_argument("--many", type=int, default=1500, help="many-shot: more images than this")
    parser.add_argument("--few", type=int, default=200, help="few-shot: fewer images than this")
    parser.add_argument("--jobs", type=int, default=1,
                        help="workdirs (setting, seed) trained at once, each in its own process "
                             "(its variants one after another, as they share the teachers)")
    args = parser.parse_args()
    if args.summarize:
        paths = sorted(glob.glob(args.summarize))
        if not paths or not args.out:
            parser.error(f"--summarize={args.summarize!r} matches no file, or --out is missing")
        records = [r for path in paths for r in json.load(open(path))]
        print(write_summary(records, args.out, f"Records: {', '.join(paths)}\n\n"))
        return
    if not args.settings or not args.root:
        parser.error("--settings and --root are required (or --summarize)")
    if args.jobs < 1:
        parser.error(f"--jobs={args.jobs} must be >= 1")
    if not 0 <= args.few <= args.many:
        parser.error(f"need 0 <= --few ({args.few}) <= --many ({args.many})")
    try:
        grid = parse_grid(args.sweep) if args.sweep else None
    except ValueError as err:
        parser.error(f"--sweep={args.sweep!r}: {err}")
    if args.family != "dsink" and (args.variants or grid):
        parser.error("--variants and --sweep are for --family=dsink")
    # With a sweep, only the variants named (its members include the default student).
    variants = parse_variants(args.variants) if args.variants else (
        [] if grid else [(None, {})])
    overrides_all = parse_variants(f"all:{args.overrides}")[0][1] if args.overrides else {}
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        parser.error(f"--seeds={args.seeds!r} must be comma-separated integers")

    defaults, build = BUILDERS[args.family]
    settings = [s.strip() for s in args.settings.split(";") if s.strip()]
    # Every config is built and checked before the first stage trains.
    runs = []
    sweep = [(Sweep(grid, args.sweep_members, args.sweep_name), {})] if grid else []
    for setting in settings:
        for seed in seeds:
            workdir = os.path.join(args.root, setting.replace(",", "_").replace("=", "-"),
                                   f"seed{seed}")
            for variant, overrides in variants + sweep:
                arg = ",".join(x for x in (f"dataset={args.data}", f"preset={args.preset}",
                                           setting, args.extra, f"seed={seed}") if x)
                config = build(configs.parse_arg_string(arg, defaults))
                apply_overrides(config, overrides_all)
                apply_overrides(config, overrides)
                if isinstance(variant, str):
                    config.dsink.stage_name = f"student_{variant}"
                configs.validate_config(config)
                if args.family == "dsink":
                    pipelines.dsink.validate(config)
                runs.append((setting, seed, variant, overrides, config, workdir))
    if grid:
        try:  # the members' values and the sweep's name, checked before anything trains
            pipelines.dsink.members_of(grid, runs[-1][4])
            pipelines.dsink.check_sweep_name(args.sweep_name, runs[-1][4])
        except ValueError as err:
            parser.error(f"--sweep: {err}")

    header = (f"# Accuracy: {args.family}, preset {args.preset}, {args.data}\n\n"
              f"Command: `python benchmarks/accuracy.py {' '.join(sys.argv[1:])}`\n\n")
    finished = {}  # run index -> its records, each built once, when the run finishes
    for i, summary, seconds in run_all(runs, args.jobs):
        finished[i] = run_records(runs[i], summary, seconds, overrides_all, args)
        records = [r for j in sorted(finished) for r in finished[j]]
        markdown = write_outputs(args.root, header, records, settings, args)
    print(markdown)


class Sweep(NamedTuple):
    """A run's grid of students trained as one program (`pipelines.dsink.run_sweep`)."""
    grid: dict
    members: str
    name: str


def parse_grid(spec: str) -> dict[str, list[float]]:
    """`"alpha=1,2;epsilon=1,2"` -> {"alpha": [1.0, 2.0], "epsilon": [1.0, 2.0]}: the student's
    own options only (a record's overrides are `dsink.` fields; a learning rate or seed grid
    is experiments/sweep.py's)."""
    grid = pipelines.dsink.parse_sweep([s.strip() for s in spec.split(";") if s.strip()])
    other = [name for name in grid if name not in SWEPT_HERE]
    if other:
        raise ValueError(f"{', '.join(other)} cannot be swept here; allowed: "
                         f"{', '.join(SWEPT_HERE)} (learning_rate, weight_decay, seed: "
                         "experiments/sweep.py)")
    return grid


def sweep_records(sweep: Sweep, summary: dict) -> list[dict]:
    """The sweep's teachers' rows, then one student row per member: its variant is the
    member's name and its overrides the member's `dsink.` values."""
    rows = list(summary["teachers"])
    for member in summary["members"]:
        rows.append({**member, "name": "student", "loss": "dsink", "variant": member["name"],
                     "overrides": {f"dsink.{k}": f"{member[k]:g}" for k in sweep.grid},
                     "stage_dir": os.path.join(sweep.name, member["name"]),
                     "sweep": {"name": sweep.name, "members": sweep.members}})
    return rows


def run_group(group: list) -> list:
    """Trains the runs of one workdir in turn: [(index, pipeline summary, seconds)]."""
    done = []
    for i, total, (setting, seed, variant, _, config, workdir) in group:
        what = f"sweep {variant.name}" if isinstance(variant, Sweep) else f"variant {variant}"
        print(f"=== [{i + 1}/{total}] {config.family}: {setting}, seed {seed}, {what} -> "
              f"{workdir}", file=sys.stderr, flush=True)
        start = time.perf_counter()
        if isinstance(variant, Sweep):
            result = pipelines.dsink.run_sweep(config, workdir, variant.grid,
                                               members_mode=variant.members, name=variant.name)
            summary = {"stages": sweep_records(variant, result),
                       "class_counts": result["class_counts"]}
        else:
            summary = pipelines.run(config, workdir)
        done.append((i, summary, time.perf_counter() - start))
    return done


def run_all(runs: list, jobs: int):
    """Yields (index, summary, seconds) of every run as it finishes. jobs > 1: the workdirs
    (the variants of one (setting, seed) share its teachers, so they stay in one group, in
    order) are trained by that many processes at once. On a 2-core CPU two processes trained
    ResNet-8 at 1.4-2x the images/s of one (XLA:CPU keeps about one core busy per step;
    benchmarks/README.md, accuracy.py)."""
    groups: dict = {}
    for i, run in enumerate(runs):
        groups.setdefault(run[5], []).append((i, len(runs), run))
    if jobs == 1 or len(groups) == 1:
        for group in groups.values():
            yield from run_group(group)
        return
    import concurrent.futures  # pylint: disable=import-outside-toplevel
    # Spawned (each worker imports this script afresh); a worker ends itself when this process
    # is killed, and its stage resumes when the command runs again.
    with workdir_lib.process_pool(min(jobs, len(groups))) as pool:
        for future in concurrent.futures.as_completed(
                [pool.submit(run_group, g) for g in groups.values()]):
            yield from future.result()


def run_records(run: tuple, summary: dict, seconds: float, overrides_all: dict,
                args) -> list[dict]:
    """One record per stage of a finished run (its teachers and its student)."""
    setting, seed, variant, overrides, config, workdir = run
    records = []
    counts = summary.get("class_counts")  # a sweep's; a pipeline's in the workdir's results
    if counts is None:
        with open(os.path.join(workdir, "results.json")) as f:
            counts = json.load(f)["data"]["class_counts"]
    for row in summary["stages"]:
        row = dict(row)
        stage_dir = os.path.join(workdir, row.pop("stage_dir", None) or (
            config.dsink.stage_name if row["name"] == "student" else row["loss"]))
        row_variant, row_overrides = row.pop("variant", variant), row.pop("overrides", overrides)
        results_path = os.path.join(stage_dir, "results.json")
        wall = None
        if os.path.exists(results_path):
            with open(results_path) as f:
                wall = json.load(f).get("wall_seconds")
        records.append({**regroup(row, counts, args.many, args.few), "setting": setting,
                        "seed": seed,
                        "variant": row_variant if row["name"] == "student" else None,
                        "overrides": row_overrides if row["name"] == "student" else None,
                        "set": overrides_all, "protocol": {
                            "preset": args.preset, "model": config.model.name,
                            "dtype": config.model.dtype, "epochs": config.optim.epochs,
                            "augment": bool(config.data.crop_padding or config.data.flip)},
                        "class_counts": counts, "curve": stage_curve(stage_dir),
                        "wall_seconds": wall, "run_seconds": seconds})
    return records


if __name__ == "__main__":
    main()
