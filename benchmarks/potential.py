"""Cost of one warm-started semi-discrete potential update against a small training step.

Usage (from the repository root)::

    python benchmarks/potential.py                      # C = 100, d = 64, the default grid
    python benchmarks/potential.py --num-samples 1024,4096 --steps 1,10 --repeats 20
    python benchmarks/potential.py --num-samples 1024 --steps 5 --backends native,ott  # ott-jax

Times over ``--repeats`` calls after a compiling warm-up (``block_until_ready``), the minimum
(the cost without interference: use it on a shared machine) and the median:

* ``solve N x k``: `semidiscrete_potential` jitted, ``k`` dual steps of ``N`` Monte-Carlo points,
  warm-started from the previous potential (the "dynamic" re-solve of one training step), hard
  cells, C classes in d dimensions;
* ``dense step``: a jitted CE train step (forward, backward, SGD update) of a Dense d -> C layer on
  [B, d] features;
* ``conv step``: the same for a 3-layer conv net (16, 32, 64 channels, 3x3, strides 1, 2, 2, global
  average pool) + the Dense d -> C head on [B, 32, 32, 3] images: a stand-in for a small backbone.

The ResNet-32 training step at batch 128 is timed by `benchmarks/ot_softmax_cost.py` (the real
step); this script gives absolute times and the ratio solve / conv step, so the goal of the
issue (the solve costs < 10 % of a step at C = 100, d = 64) can be read for any backbone whose
step time is known: ratio = solve time / that step time.

Expected: a table. Measured on the shared 2-core CPU of the development machine (load ~8, so
take the minimum; 20 repeats): conv step 180 ms, dense step 0.1 ms; solve N x k = 1024 x {1, 5,
10}: 1.1, 9, 24 ms; 2048 x {1, 5, 10}: 2.2, 25, 50 ms; 4096 x {1, 5, 10}: 8, 53, 104 ms. That is
about 2.5 ms per dual step per 1024 points, two thirds of it drawing the Gaussian samples
(threefry) on a CPU. Against the conv stand-in, the training default (1024 x 5) costs ~5 %,
4096 x 10 more than 50 %; a ResNet-32 step (``benchmarks/ot_softmax_cost.py``) is costlier than
the stand-in, which lowers every ratio.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

# Runnable without installing the package: `python benchmarks/potential.py`.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dsink_jax.ot.semidiscrete import semidiscrete_potential  # noqa: E402


class ConvStandIn(nn.Module):
    """3 conv layers, global average pool, Dense head: `images [B, H, W, 3] -> logits [B, C]`."""

    num_classes: int
    width: int = 64

    @nn.compact
    def __call__(self, x):
        for features, stride in ((16, 1), (32, 2), (self.width, 2)):
            x = nn.relu(nn.Conv(features, (3, 3), strides=stride)(x))
        return nn.Dense(self.num_classes)(jnp.mean(x, axis=(1, 2)))


def time_ms(fn, *args, repeats: int) -> tuple[float, float]:
    """(min, median) wall time of `fn(*args)` in ms, after one compiling call."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return 1e3 * min(times), 1e3 * statistics.median(times)


def train_step_ms(model: nn.Module, inputs: jax.Array, labels: jax.Array,
                  repeats: int) -> tuple[float, float]:
    params = model.init(jax.random.key(0), inputs)
    tx = optax.sgd(0.1, momentum=0.9)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state):
        def loss_fn(p):
            logits = model.apply(p, inputs)
            return optax.losses.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        grads = jax.grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    return time_ms(step, params, opt_state, repeats=repeats)


def int_list(text: str) -> list[int]:
    values = [int(v) for v in text.split(",") if v]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers like 1,5,10; got {text!r}")
    return values


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-classes", type=int, default=100)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--num-samples", type=int_list, default=[1024, 2048, 4096])
    parser.add_argument("--steps", type=int_list, default=[1, 5, 10])
    parser.add_argument("--scale", type=float, default=16.0)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--backends", default="native",
                        help="comma list of solver backends to time side by side: native,ott")
    args = parser.parse_args(argv)
    args.backends = [b for b in args.backends.split(",") if b]
    if not args.backends or set(args.backends) - {"native", "ott"}:
        parser.error(f"--backends must list native and/or ott, got {args.backends}")
    if min(args.num_classes, args.dim, args.batch_size, args.repeats) < 1 or args.scale <= 0:
        parser.error("--num-classes, --dim, --batch-size, --repeats must be >= 1 and --scale > 0")

    c, d, b = args.num_classes, args.dim, args.batch_size
    key = jax.random.key(0)
    weights = jax.random.normal(jax.random.fold_in(key, 1), (c, d))
    # A long-tailed target (ratio 100), as in training with nu = class frequencies.
    nu = jnp.exp(-jnp.arange(c) / max(c - 1, 1) * jnp.log(100.0))
    nu = nu / nu.sum()
    # Start from a converged potential, as a warm start during training would.
    h_star = semidiscrete_potential(weights, nu, scale=args.scale, rng=key, num_samples=4096,
                                    num_steps=300).potential

    dense_ms = train_step_ms(nn.Dense(c), jax.random.normal(key, (b, d)),
                             jnp.arange(b) % c, args.repeats)
    conv_ms = train_step_ms(ConvStandIn(c, width=d), jax.random.normal(key, (b, 32, 32, 3)),
                            jnp.arange(b) % c, args.repeats)

    print(f"# {jax.devices()[0].platform}: {jax.devices()[0].device_kind}; C={c}, d={d}, "
          f"batch={b}, scale={args.scale}, {args.repeats} repeats")
    print(f"{'variant':<20}{'min ms':>10}{'median ms':>11}{'min / conv min':>16}")

    def row(name, times):
        print(f"{name:<20}{times[0]:>10.2f}{times[1]:>11.2f}{times[0] / conv_ms[0]:>15.1%}")

    row("dense step", dense_ms)
    row("conv step", conv_ms)
    for num_samples in args.num_samples:
        for num_steps in args.steps:
            for backend in args.backends:
                solve = jax.jit(lambda h, rng, n=num_samples, k=num_steps, b=backend:
                                semidiscrete_potential(
                                    weights, nu, scale=args.scale, rng=rng, num_samples=n,
                                    num_steps=k, learning_rate=0.03, init=h,
                                    backend=b).potential)
                name = f"solve {num_samples} x {num_steps}"
                row(name if len(args.backends) == 1 else f"{name} {backend}",
                    time_ms(solve, h_star, jax.random.key(1), repeats=args.repeats))


if __name__ == "__main__":
    main()
