r"""The GPU check: every speed question a lent accelerator can answer, in one call of minutes.

Usage, on a machine with one CUDA GPU (from the repository root; the package need not be
installed, the missing dependencies can come as wheels, see benchmarks/README.md)::

    python benchmarks/gpu_check.py --out /tmp/gpu_check          # about 6-8 minutes on an H100

    python benchmarks/gpu_check.py --tiny --out /tmp/gpu_check    # the same sections, tiny
                                                                  # sizes, on the CPU: seconds

Runs each section as its own process (a fresh JAX, no memory left held by the one before), one
after another, each under a time limit cut to what is left of ``--budget-s``, so that a section
that fails or runs long costs only itself; its error is recorded and the next one starts.

Sections (each the benchmark script of that name, whose docstring says what it times):

* ``train_step`` (throughput.py): the ResNet-32 CIFAR train step at batch 128, JAX fp32 and bf16
  against PyTorch eager and ``torch.compile`` on the same GPU.
* ``dsink_vs_ce`` (step_cost.py): the D-SINK student's step (the defaults, and the allocation
  modes with forward or cached teachers) against the CE step, ResNet-32, C = 10.
* ``sweep`` (sweep_speed.py): 8 D-SINK students in one vmapped program against the 8 trained
  one after another (the unrolled program, a CPU remedy, only in the tiny run).
* ``paper_epoch`` (experiments/main.py): one epoch of the `paper` preset (ResNet-32, batch 128)
  on a CIFAR-10-LT ratio-100 training set of synthetic images, the real training loop end to
  end; its images/s and wall time.
* ``streaming`` (input_pipeline.py): the streaming loader (grain workers decoding synthetic
  JPEGs, random resized crop to 224) against the ResNet-50 step it feeds: is the GPU kept busy?

Writes OUT/gpu_check.json (every section's own JSON record, its command, seconds and status)
and OUT/gpu_check.md (one table of the headline figures, then each section's status), nothing
else: the sections' data, JPEGs and workdirs go to --work.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("train_step", "dsink_vs_ce", "sweep", "paper_epoch", "streaming")
# Seconds each section may take at full size (its limit is cut to what the budget has left).
FULL_LIMITS = {"train_step": 150, "dsink_vs_ce": 120, "sweep": 90, "paper_epoch": 60,
               "streaming": 60}
# CIFAR-10 sizes of the synthetic set the `paper_epoch` section trains on (ratio 100 keeps
# 12,406 of the 50,000 training images: 96 steps of 128).
FULL_IMAGES, TINY_IMAGES = (50000, 10000), (1200, 100)


def has_torch() -> bool:
    try:
        import torch  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
    except ImportError:
        return False
    return True


def section_commands(name: str, *, tiny: bool, work: Path, gpu: bool) -> list[list[str]]:
    """The command lines of a section (`python SCRIPT ARGS...`), full or tiny sizes."""
    py, bench = sys.executable, str(ROOT / "benchmarks")
    record = str(work / f"{name}.json")
    if name == "train_step":
        args = ["--model", "resnet8" if tiny else "resnet32",
                "--variants", "fp32" if tiny else "fp32,bf16",
                "--platform", "gpu" if gpu else "cpu", "--json", record]
        args += (["--batch-size", "16", "--repeats", "1", "--steps-per-repeat", "1",
                  "--warmup", "0"] if tiny else
                 ["--batch-size", "128", "--repeats", "5", "--steps-per-repeat", "20",
                  "--warmup", "5", "--torch-compile"])
        if not has_torch():
            args.append("--skip-torch")
        return [[py, f"{bench}/throughput.py", *args]]
    if name == "dsink_vs_ce":
        args = (["--model", "cnn", "--batch-size", "16", "--extra-num-classes", "",
                 "--repeats", "1", "--steps", "1", "--refresh-images", "64"] if tiny else
                ["--model", "resnet32", "--batch-size", "128", "--extra-num-classes", "",
                 "--repeats", "5", "--steps", "10"])
        return [[py, f"{bench}/step_cost.py", *args, "--json", record]]
    if name == "sweep":
        args = (["--model", "mlp", "--alphas", "1,2", "--repeats", "1", "--steps", "1"] if tiny
                else ["--model", "resnet32", "--variants", "vmapped,sequential", "--repeats", "5",
                      "--steps", "3"])
        return [[py, f"{bench}/sweep_speed.py", *args, "--json", record]]
    if name == "paper_epoch":
        data = work / "synthetic_cifar10.npz"
        overrides = ["--config.optim.epochs=1", "--config.eval_every_epochs=1",
                     "--config.progress=False"]
        if tiny:
            overrides += ["--config.model.name=cnn", "--config.optim.batch_size=16"]
        config = (f"{ROOT}/experiments/configs/baseline.py:dataset=npz:{data},imbalance=100,"
                  "noise=sym,noise_rate=0.4,preset=paper")
        return [[py, str(ROOT / "experiments" / "main.py"), f"--config={config}", *overrides,
                 f"--workdir={work / 'paper_epoch'}"]]
    if name == "streaming":
        args = (["--images", "48", "--workers", "0", "--batch-size", "8", "--batches", "2",
                 "--image-size", "32", "--model", "cnn", "--step-batch", "4",
                 "--step-repeats", "1", "--repeats", "1"] if tiny else
                ["--images", "768", "--workers", "0,8,15", "--batch-size", "128",
                 "--batches", "4", "--image-size", "224", "--model", "resnet50",
                 "--dtype", "bfloat16", "--step-batch", "128", "--step-repeats", "5",
                 "--repeats", "2"])
        return [[py, f"{bench}/input_pipeline.py", "--tree", str(work / "jpegs"), *args,
                 "--json", record]]
    raise ValueError(f"unknown section {name!r}; allowed: {', '.join(SECTIONS)}")


def write_synthetic_cifar(path: Path, num_train: int, num_test: int, seed: int = 0) -> None:
    """A CIFAR-10-shaped npz of random uint8 images (balanced labels): the paper epoch's data."""
    rng = np.random.default_rng(seed)
    np.savez(path, x_train=rng.integers(0, 256, (num_train, 32, 32, 3), dtype=np.uint8),
             y_train=(np.arange(num_train) % 10).astype(np.int32),
             x_test=rng.integers(0, 256, (num_test, 32, 32, 3), dtype=np.uint8),
             y_test=(np.arange(num_test) % 10).astype(np.int32))


def read_record(name: str, work: Path) -> dict | None:
    """A section's own JSON record (the paper epoch: its stage's results.json)."""
    path = (work / "paper_epoch" / "results.json" if name == "paper_epoch"
            else work / f"{name}.json")
    if not path.exists():
        return None
    record = json.loads(path.read_text())
    if name == "paper_epoch":  # the headline and what made it, not every per-class figure
        stage = record["stages"][0]
        return {"images_per_sec": stage.get("images_per_sec"),
                "stage_wall_seconds": stage.get("wall_seconds"),
                "wall_seconds": record.get("wall_seconds"), "data": record.get("data"),
                "model": record["config"]["model"], "optim": record["config"]["optim"],
                "provenance": record.get("provenance")}
    return record


def headline_rows(name: str, record: dict) -> list[tuple[str, str]]:
    """(what, figure) rows of the markdown table for one section's record."""
    rows = []
    if name == "train_step":
        for r in record["rows"]:
            vs = r.get("ratio_to_torch")
            rows.append((f"{record['model']} train step, {r['variant']} (batch "
                         f"{record['batch_size']})", f"{r['median_images_per_s']:.0f} images/s"
                         + ("" if vs is None else f" ({vs:.2f}x PyTorch eager)")))
    elif name == "dsink_vs_ce":
        for v in record["verdicts"]:
            rows.append((f"D-SINK step (defaults) / CE step, C = {v['num_classes']}",
                         f"{v['dsink_over_ce']:.3f}x (per-repeat {v['dsink_over_ce_paired']:.3f}x)"))
        for r in record["rows"]:
            if r["variant"] in ("ce step", "dsink step", "batch forward", "online forward",
                                "online cached"):
                rows.append((f"{record['args']['model']} {r['variant']}, C = {r['num_classes']}",
                             f"{r['median_ms']:.2f} ms ({r['vs_ce_step']:.3f}x CE)"))
    elif name == "sweep":
        for r in record["rows"]:
            rows.append((f"{r['model']} sweep of {r['members']}, {r['variant']}",
                         f"{r['median_ms']:.2f} ms per student-step"))
        for key, name in (("speedup", "vmapped"), ("speedup_unrolled", "unrolled")):
            if record.get(key) is not None:
                rows.append((f"sweep speed-up, sequential / {name}", f"{record[key]:.2f}x"))
    elif name == "paper_epoch":
        rate = record.get("images_per_sec")
        rows.append((f"paper preset, one epoch of CIFAR-10-LT r100 ({record['model']['name']}, "
                     f"batch {record['optim']['batch_size']})",
                     ("-" if rate is None else f"{rate:.0f} images/s") +
                     f", stage {record['stage_wall_seconds']:.1f} s wall"))
    elif name == "streaming":
        step = next(v for k, v in record["table"].items() if k.startswith("step"))
        feeds = {k: v for k, v in record["table"].items() if k.startswith("feed")}
        for key, value in feeds.items():
            rows.append((f"streaming {key} ({record['args']['image_size']} px JPEG decode + crop)",
                         f"{value['median']:.0f} images/s"))
        best = max(v["median"] for v in feeds.values())
        rows.append((f"{record['args']['model']} step at {record['args']['image_size']} px "
                     f"(batch {record['args']['step_batch']})", f"{step['median']:.0f} images/s"))
        rows.append(("GPU kept busy (best feed >= step)?",
                     f"{'yes' if best >= step['median'] else 'no'}: feed / step = "
                     f"{best / step['median']:.2f}"))
    return rows


def device_line() -> str:
    """The accelerator as nvidia-smi names it, or the CPU."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                              "--format=csv,noheader"], capture_output=True, text=True,
                             timeout=20)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError):
        pass
    return f"CPU only ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for gpu_check.json / .md (only)")
    parser.add_argument("--work", default="/tmp/dsink_gpu_check",
                        help="scratch folder: the sections' records, data and workdirs, kept "
                             "out of --out so that only the two results travel back")
    parser.add_argument("--tiny", action="store_true",
                        help="tiny sizes on the CPU (the suite's smoke run)")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"comma list among {', '.join(SECTIONS)}")
    parser.add_argument("--budget-s", type=float, default=480.0,
                        help="all sections together stop by this many seconds")
    args = parser.parse_args(argv)
    args.section_list = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in args.section_list if s not in SECTIONS]
    if unknown or not args.section_list:
        parser.error(f"--sections={args.sections!r}: allowed {', '.join(SECTIONS)}")
    if args.budget_s <= 0:
        parser.error(f"--budget-s={args.budget_s} must be > 0")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    gpu = not args.tiny
    env = dict(os.environ, PYTHONUNBUFFERED="1", XLA_PYTHON_CLIENT_PREALLOCATE="false",
               PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH"))
                                          if p))
    if args.tiny:
        env["JAX_PLATFORMS"] = "cpu"
    started = time.perf_counter()
    device = device_line()
    print(f"gpu_check on {device}; sections {', '.join(args.section_list)}; budget "
          f"{args.budget_s:.0f} s", flush=True)
    results = {}
    for name in args.section_list:
        left = args.budget_s - (time.perf_counter() - started)
        limit = min(FULL_LIMITS[name] if gpu else 300, left)
        entry = {"status": "skipped: no time left in the budget", "seconds": 0.0}
        results[name] = entry
        if limit < 5:
            continue
        if name == "paper_epoch":
            write_synthetic_cifar(work / "synthetic_cifar10.npz",
                                  *(TINY_IMAGES if args.tiny else FULL_IMAGES))
        commands = section_commands(name, tiny=args.tiny, work=work, gpu=gpu)
        entry["commands"] = [" ".join(c) for c in commands]
        t0 = time.perf_counter()
        try:
            for command in commands:
                print(f"--- {name}: {' '.join(command)}", flush=True)
                done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True,
                                      text=True, timeout=limit)
                entry["output_tail"] = (done.stdout + done.stderr)[-3000:]
                if done.returncode:
                    raise RuntimeError(f"exit status {done.returncode}")
            entry["record"] = read_record(name, work)
            entry["status"] = "ok" if entry["record"] is not None else "failed: no record"
        except subprocess.TimeoutExpired:
            entry["status"] = f"failed: over its {limit:.0f} s limit"
        except RuntimeError as error:
            entry["status"] = f"failed: {error}"
        entry["seconds"] = time.perf_counter() - t0
        print(f"--- {name}: {entry['status']} in {entry['seconds']:.1f} s", flush=True)
        if not entry["status"].startswith("ok"):
            print(entry.get("output_tail", ""), flush=True)

    lines = [f"# GPU check: {device}", "",
             f"`python benchmarks/gpu_check.py {' '.join(argv if argv is not None else sys.argv[1:])}`"
             f", {time.perf_counter() - started:.0f} s in all, {time.strftime('%Y-%m-%d')}", "",
             "| section | what | figure |", "|---|---|---|"]
    for name, entry in results.items():
        if entry.get("record"):
            try:
                rows = headline_rows(name, entry["record"])
            except (KeyError, TypeError, ValueError, StopIteration) as error:
                rows = [("(record unreadable)", repr(error))]
            lines += [f"| {name} | {what} | {figure} |" for what, figure in rows]
    lines += ["", "| section | status | seconds |", "|---|---|---|"]
    lines += [f"| {n} | {e['status']} | {e['seconds']:.1f} |" for n, e in results.items()]
    markdown = "\n".join(lines) + "\n"
    (out / "gpu_check.md").write_text(markdown)
    (out / "gpu_check.json").write_text(json.dumps(
        {"device": device, "tiny": args.tiny, "budget_s": args.budget_s,
         "seconds": time.perf_counter() - started, "sections": results}, indent=2,
        default=str) + "\n")
    print(markdown, flush=True)
    return 0 if all(e["status"] == "ok" for e in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
