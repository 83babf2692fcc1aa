"""Times the D-SINK allocation: log domain vs scaling domain ("kernel"), native vs ott-jax, and POT.

Every solver runs exactly ``--num_iters`` Sinkhorn iterations (POT with
``stopThr=0``) on the same problem: random teacher/student log-probabilities
and a long-tailed class mass (ratio 100), epsilon 2. Each JAX variant is
``sinkhorn_allocation(backend=..., mode=...)`` jitted: modes ``log``, ``kernel``
and ``auto`` (kernel behind its guard, the default), on both backends. JAX
timings are medians over ``--repeats`` calls after a jit warm-up, with
``block_until_ready``; every repeat runs all JAX variants in turn, so machine
noise hits them alike and the kernel/log ratios are measured side by side. POT
is timed after them, in its own block of ``--pot_repeats`` calls.
"Error" is the largest marginal violation, rows and columns both divided to
per-sample units (native/ott end on the row update so their error is in the
columns; POT ends on the column update so its error is in the rows); the table
shows it for the native backend's two modes and POT.
"max|dQ|" is the largest difference between a backend's kernel-mode and
log-mode allocations (the same iterations, so float32 rounding).

  python benchmarks/allocation.py                 # all sizes, 50 iterations
  python benchmarks/allocation.py --num_iters=200 --sizes=128x10,512x100

Expected: a table of 4 rows; on a CPU the kernel columns are several times
faster than the log ones at the large sizes, and the native and ott columns of
one mode are within a small factor of each other.
"""
import argparse
import functools
import statistics
import time

import jax
import numpy as np
import ot as pot

from dsink_jax.ot.sinkhorn import sinkhorn_allocation

DEFAULT_SIZES = "128x10,128x100,512x100,4096x1000"
VARIANTS = tuple((backend, mode) for backend in ("native", "ott")
                 for mode in ("log", "kernel", "auto"))


def _problem(batch_size, num_classes, seed=0):
    keys = jax.random.split(jax.random.key(seed), 2)
    noise = jax.nn.log_softmax(
        3.0 * jax.random.normal(keys[0], (batch_size, num_classes)))
    student = jax.nn.log_softmax(
        3.0 * jax.random.normal(keys[1], (batch_size, num_classes)))
    mass = 100.0 ** (-np.arange(num_classes) / max(num_classes - 1, 1))
    return noise, student, mass / mass.sum()


def _time_ms(fn):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    return 1e3 * (time.perf_counter() - start)


def _plan_error(plan, mass):
    """Max marginal violation of a [B, C] allocation (rows sum to 1)."""
    batch_size = plan.shape[0]
    rows = np.max(np.abs(plan.sum(1) - 1.0))
    columns = np.max(np.abs(plan.sum(0) - batch_size * mass)) / batch_size
    return max(rows, columns)


def run(sizes, num_iters, repeats, pot_repeats, epsilon=2.0):
    """Returns one dict per size: medians in ms per variant and POT, errors, max|dQ|."""
    results = []
    for batch_size, num_classes in sizes:
        noise, student, mass = _problem(batch_size, num_classes)
        mass64 = np.asarray(mass, np.float64)
        row = {"B": batch_size, "C": num_classes}
        solves, plans = {}, {}
        for backend, mode in VARIANTS:
            solves[backend, mode] = jax.jit(
                lambda n, s, m, backend=backend, mode=mode: sinkhorn_allocation(
                    n, s, m, epsilon=epsilon, num_iters=num_iters, backend=backend,
                    mode=mode).allocation)
            plans[backend, mode] = np.asarray(  # warm-up (compiles)
                solves[backend, mode](noise, student, mass), np.float64)
            row[f"{backend}_{mode}_err"] = _plan_error(plans[backend, mode], mass64)
        for backend in ("native", "ott"):
            row[f"{backend}_dq"] = np.max(np.abs(plans[backend, "kernel"]
                                                 - plans[backend, "log"]))
        cost = -np.asarray(noise + student, np.float32)
        a = np.full(batch_size, 1.0 / batch_size, np.float32)
        b = np.asarray(mass, np.float32)

        def pot_solve(a=a, b=b, cost=cost):
            return pot.sinkhorn(a, b, cost, reg=epsilon, numItermax=num_iters,
                                stopThr=0.0, warn=False)

        row["pot_err"] = _plan_error(batch_size * pot_solve().astype(np.float64), mass64)
        times = {key: [] for key in VARIANTS}
        for _ in range(repeats):  # interleaved: every repeat times every JAX variant
            for key in VARIANTS:
                times[key].append(_time_ms(functools.partial(solves[key], noise, student, mass)))
        for (backend, mode) in VARIANTS:
            row[f"{backend}_{mode}"] = statistics.median(times[backend, mode])
        # POT in its own block, after the JAX variants (numpy, not affected by jit warm-up).
        row["pot"] = statistics.median(_time_ms(pot_solve) for _ in range(pot_repeats))
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
    with open("/proc/loadavg") as f:
        load = f.read().split()[0]
    print(f"device: {jax.devices()[0].device_kind}; num_iters={args.num_iters}; "
          f"epsilon=2; float32 everywhere; medians in ms over {args.repeats} repeats "
          f"(POT {args.pot_repeats}); 1-min load average at start {load}")
    header = (f"{'B':>5} {'C':>5} | {'nat log':>8} {'nat ker':>8} {'nat auto':>8} {'k/l':>5} | "
              f"{'ott log':>8} {'ott ker':>8} {'ott auto':>8} {'k/l':>5} | {'POT':>8} | "
              f"{'max|dQ| n':>9} {'max|dQ| o':>9} | {'n err log':>9} {'n err ker':>9} "
              f"{'POT err':>8}")
    print(header)
    print("-" * len(header))
    for row in run(sizes, args.num_iters, args.repeats, args.pot_repeats):
        cells = [f"{row['B']:>5} {row['C']:>5} |"]
        for backend in ("native", "ott"):
            log, kernel, auto = (row[f"{backend}_{m}"] for m in ("log", "kernel", "auto"))
            cells.append(f"{log:>8.2f} {kernel:>8.2f} {auto:>8.2f} {kernel / log:>5.2f} |")
        cells.append(f"{row['pot']:>8.2f} |")
        cells.append(f"{row['native_dq']:>9.1e} {row['ott_dq']:>9.1e} |")
        cells.append(f"{row['native_log_err']:>9.1e} {row['native_kernel_err']:>9.1e} "
                     f"{row['pot_err']:>8.1e}")
        print(" ".join(cells))
    with open("/proc/loadavg") as f:
        print(f"1-min load average at end {f.read().split()[0]}")


if __name__ == "__main__":
    main()
