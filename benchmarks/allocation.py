"""Times the D-SINK allocation: native lax.scan vs ott-jax vs POT (numpy).

Every solver runs exactly ``--num_iters`` Sinkhorn iterations (POT with
``stopThr=0``) on the same problem: random teacher/student log-probabilities
and a long-tailed class mass (ratio 100), epsilon 2. JAX timings are medians
over ``--repeats`` calls after a jit warm-up, with ``block_until_ready``.
"Error" is the largest marginal violation, rows and columns both divided to
per-sample units (native/ott end on the row update so their error is in the
columns; POT ends on the column update so its error is in the rows).

  python benchmarks/allocation.py                 # all sizes, 50 iterations
  python benchmarks/allocation.py --num_iters=200 --sizes=128x10,512x100

Expected: a table of 4 rows; on a CPU the native and ott columns are within a
small factor of each other and POT is slower at the largest size.
"""
import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import ot as pot

from dsink_jax.ot.sinkhorn import sinkhorn_allocation

DEFAULT_SIZES = "128x10,128x100,512x100,4096x1000"


def _problem(batch_size, num_classes, seed=0):
    keys = jax.random.split(jax.random.key(seed), 2)
    noise = jax.nn.log_softmax(
        3.0 * jax.random.normal(keys[0], (batch_size, num_classes)))
    student = jax.nn.log_softmax(
        3.0 * jax.random.normal(keys[1], (batch_size, num_classes)))
    mass = 100.0 ** (-jnp.arange(num_classes) / max(num_classes - 1, 1))
    return noise, student, mass / mass.sum()


def _median_ms(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times)


def _plan_error(plan, mass):
    """Max marginal violation of a [B, C] allocation (rows sum to 1)."""
    batch_size = plan.shape[0]
    rows = np.max(np.abs(plan.sum(1) - 1.0))
    columns = np.max(np.abs(plan.sum(0) - batch_size * mass)) / batch_size
    return max(rows, columns)


def run(sizes, num_iters, repeats, pot_repeats, epsilon=2.0):
    """Returns rows (B, C, native ms, ott ms, POT ms, errors...)."""
    results = []
    for batch_size, num_classes in sizes:
        noise, student, mass = _problem(batch_size, num_classes)
        row = {"B": batch_size, "C": num_classes}
        for backend in ("native", "ott"):
            solve = jax.jit(lambda n, s, m, backend=backend: sinkhorn_allocation(
                n, s, m, epsilon=epsilon, num_iters=num_iters, backend=backend).allocation)
            plan = jax.block_until_ready(solve(noise, student, mass))  # warm-up
            row[backend] = _median_ms(lambda: solve(noise, student, mass), repeats)
            row[backend + "_err"] = _plan_error(np.asarray(plan, np.float64),
                                                np.asarray(mass, np.float64))
        cost = -np.asarray(noise + student, np.float32)
        a = np.full(batch_size, 1.0 / batch_size, np.float32)
        b = np.asarray(mass, np.float32)

        def pot_solve():
            return pot.sinkhorn(a, b, cost, reg=epsilon, numItermax=num_iters,
                                stopThr=0.0, warn=False)

        row["pot"] = _median_ms(pot_solve, pot_repeats)
        row["pot_err"] = _plan_error(batch_size * pot_solve().astype(np.float64),
                                     np.asarray(mass, np.float64))
        results.append(row)
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num_iters", type=int, default=50)
    parser.add_argument("--sizes", default=DEFAULT_SIZES,
                        help="comma-separated BxC list")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--pot_repeats", type=int, default=5,
                        help="POT is slow at 4096x1000; fewer repeats")
    args = parser.parse_args()
    sizes = [tuple(int(v) for v in size.split("x"))
             for size in args.sizes.split(",")]
    print(f"device: {jax.devices()[0].device_kind}; num_iters={args.num_iters}; "
          "epsilon=2; float32 everywhere; medians in ms")
    header = (f"{'B':>5} {'C':>5} | {'native ms':>10} {'ott ms':>10} "
              f"{'POT ms':>10} | {'native err':>10} {'ott err':>10} "
              f"{'POT err':>10}")
    print(header)
    print("-" * len(header))
    for row in run(sizes, args.num_iters, args.repeats, args.pot_repeats):
        print(f"{row['B']:>5} {row['C']:>5} | {row['native']:>10.3f} "
              f"{row['ott']:>10.3f} {row['pot']:>10.3f} | "
              f"{row['native_err']:>10.2e} {row['ott_err']:>10.2e} "
              f"{row['pot_err']:>10.2e}")


if __name__ == "__main__":
    main()
