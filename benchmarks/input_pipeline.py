r"""Streaming input pipeline throughput: images/s read, decoded and augmented, against the step.

Usage (from the repository root)::

    python benchmarks/input_pipeline.py --workers=0,1,2 --repeats=3 --json=/tmp/input.json

Generates (once, in --tree) an ImageNet-shaped folder of JPEGs with OLTR-style file lists:
--images training images of random sizes between 300 and 500 pixels a side (ImageNet's mean is
about 400 x 350), smooth colour fields plus noise so that they compress like photographs
(~30-60 KB). Then, side by side in one run, each repeat times in turn (A B C ... A B C ...):

* the training feed (`dsink_jax.train.feed.StreamingFeed`: grain `DataLoader`, JPEG decode,
  random resized crop to --image-size, flip, batch of --batch-size assembled into a `jax.Array`)
  for every --workers value, over --batches batches after one warm-up batch;
* the train step of --model at --image-size (the consumer), --step-batch images a step.

Prints the median images/s over repeats (and min-max) of each, the per-worker rate, and how many
host cores would keep a GPU fed at --gpu-images-per-s (a published figure for the model on an
accelerator, not measured here unless a GPU is lent: pass what you measured there).
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time

import jax
import numpy as np
from PIL import Image

from dsink_jax import configs, data, pipelines
from dsink_jax.train import feed as feed_lib
from dsink_jax.train import parallel
from dsink_jax.train import step as step_lib


def write_tree(root: str, num_train: int, num_test: int, num_classes: int = 10,
               seed: int = 0) -> str:
    """ImageNet-shaped JPEGs (300-500 px a side) with `train.txt` / `test.txt`; kept if present."""
    if os.path.exists(os.path.join(root, "train.txt")):
        with open(os.path.join(root, "train.txt")) as f:
            if sum(1 for _ in f) == num_train:
                return root
    rng = np.random.default_rng(seed)
    for split, n in (("train", num_train), ("test", num_test)):
        lines = []
        for i in range(n):
            c = i % num_classes
            h, w = (int(v) for v in rng.integers(300, 501, 2))
            small = rng.integers(0, 256, (6, 6, 3)).astype(np.uint8)
            field = np.asarray(Image.fromarray(small).resize((w, h), Image.BICUBIC), np.float32)
            image = np.clip(field + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
            rel = f"{split}/{c}/{i:05d}.jpg"
            os.makedirs(os.path.join(root, split, str(c)), exist_ok=True)
            Image.fromarray(image).save(os.path.join(root, rel), quality=90)
            lines.append(f"{rel} {c}")
        with open(os.path.join(root, f"{split}.txt"), "w") as f:
            f.write("\n".join(lines) + "\n")
    return root


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree", default="/tmp/dsink_input_tree")
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--workers", default="0,1,2")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--batches", type=int, default=6)
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                        help="the step's compute dtype")
    parser.add_argument("--step-batch", type=int, default=8)
    parser.add_argument("--step-repeats", type=int, default=2, help="steps timed per repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--gpu-images-per-s", type=float, default=2500.0,
                        help="the accelerator's training rate to feed (ResNet-50, bf16)")
    parser.add_argument("--json", default="")
    args = parser.parse_args(argv)
    try:
        workers = [int(w) for w in args.workers.split(",")]
    except ValueError:
        parser.error(f"--workers={args.workers!r} must be comma-separated integers")
    if any(w < 0 for w in workers):
        parser.error(f"--workers={args.workers!r}: each must be >= 0")
    needed = args.batch_size * (args.batches + 1)
    if args.images < needed:
        parser.error(f"--images={args.images} < --batch-size * (--batches + 1) = {needed}")

    start = time.perf_counter()
    write_tree(args.tree, args.images, num_test=64)
    print(f"tree {args.tree}: {args.images} JPEGs ready in {time.perf_counter() - start:.0f} s",
          file=sys.stderr)
    ts = data.make_training_set(data.load_dataset(f"filelist:{args.tree}"),
                                image_size=args.image_size)
    mesh = parallel.make_mesh()

    def feed_rate(w: int, repeat: int) -> float:
        feed = feed_lib.StreamingFeed(ts, mesh, batch_size=args.batch_size, seed=repeat,
                                      image_size=args.image_size, workers=w)
        batches = feed.epoch(0)
        jax.block_until_ready(next(batches))  # workers start, first batch
        t = time.perf_counter()
        for _ in range(args.batches):
            jax.block_until_ready(next(batches))
        rate = args.batches * args.batch_size / (time.perf_counter() - t)
        del batches, feed
        return rate

    config = configs.build_config("baseline", dict(configs.COMMON_ARGS,
                                                   dataset=f"filelist:{args.tree}",
                                                   preset="paper"))
    config.model.name, config.optim.batch_size = args.model, args.step_batch
    config.model.dtype = args.dtype
    method = pipelines.build_method(config, ts)
    state = step_lib.init_state(method, jax.random.key(0), ts.sample_images)
    train_step = jax.jit(functools.partial(step_lib.train_step, method=method), donate_argnums=0)
    rng = np.random.default_rng(0)
    batch = {"images": rng.integers(0, 256, (args.step_batch, args.image_size, args.image_size, 3),
                                    dtype=np.uint8),
             "labels": rng.integers(0, ts.num_classes, args.step_batch).astype(np.int32),
             "indices": np.arange(args.step_batch, dtype=np.int32)}
    state, _ = train_step(state, batch)  # compile
    jax.block_until_ready(state)

    def step_rate() -> float:
        nonlocal state
        t = time.perf_counter()
        for _ in range(args.step_repeats):
            state, _ = train_step(state, batch)
        jax.block_until_ready(state)
        return args.step_repeats * args.step_batch / (time.perf_counter() - t)

    rates = {f"feed, {w} workers": [] for w in workers}
    rates[f"step {args.model}"] = []
    for repeat in range(args.repeats):
        for w in workers:
            rates[f"feed, {w} workers"].append(feed_rate(w, repeat))
        rates[f"step {args.model}"].append(step_rate())
        print(f"repeat {repeat + 1}/{args.repeats}: " + ", ".join(
            f"{k} {v[-1]:.0f}" for k, v in rates.items()), file=sys.stderr, flush=True)

    load = os.getloadavg()
    print(f"\n{args.images} JPEGs 300-500 px -> {args.image_size} px, batch {args.batch_size}, "
          f"{os.cpu_count()} CPUs, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}\n")
    print("| what | images/s (median) | min-max | per worker |\n|---|---|---|---|")
    table = {}
    for key, values in rates.items():
        median = statistics.median(values)
        w = int(key.split(", ")[1].split()[0]) if key.startswith("feed") else 0
        per = median / w if w else median
        table[key] = {"median": median, "min": min(values), "max": max(values),
                      "per_worker": per if key.startswith("feed") else None}
        per_cell = f"{per:.0f}" if key.startswith("feed") else "-"
        fmt = (lambda v: f"{v:.1f}") if median < 10 else (lambda v: f"{v:.0f}")
        print(f"| {key} | {fmt(median)} | {fmt(min(values))}-{fmt(max(values))} | {per_cell} |")
    best_per_process = max(v["per_worker"] for k, v in table.items() if k.startswith("feed"))
    cores = args.gpu_images_per_s / best_per_process
    print(f"\nOne decoding process gives up to {best_per_process:.0f} images/s here: a GPU training "
          f"at {args.gpu_images_per_s:.0f} images/s needs about {cores:.0f} such cores "
          f"(--config.input.workers) per GPU.")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rates": rates, "table": table, "load": load,
                       "cores_per_gpu": cores}, f, indent=2)


if __name__ == "__main__":
    main()
