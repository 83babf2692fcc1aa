r"""Trains a grid of D-SINK students as one vmapped, jitted program.

Usage:
  python experiments/sweep.py --config=experiments/configs/dsink.py[:args] \
      --sweep=alpha=0.5,1,2 --sweep=epsilon=1,2 [--sweep=seed=0,1] --workdir=DIR

Sweepable: alpha, epsilon, learning_rate, weight_decay, seed. The teachers are trained (or reused
from DIR, the same stages `experiments/main.py` writes) first; members share the data stream and
one teacher forward per batch (or one table lookup: dsink.teachers=cached). Results:
DIR/<name>/<member>/results.json and DIR/<name>/summary.md (--name, default "sweep"; sweeps
of other names stay side by side in DIR and share its teachers).
"""

import logging
import sys

import jax
from absl import app, flags
from ml_collections import config_flags

from dsink_jax import configs as configs_lib
from dsink_jax.pipelines import dsink
from dsink_jax.train.workdir import WorkdirBusyError

_CONFIG = config_flags.DEFINE_config_file("config", None, "A dsink-family config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for teachers, students, results.")
_SWEEP = flags.DEFINE_multi_string("sweep", [], "name=v1,v2,... (repeatable).")
_MEMBERS = flags.DEFINE_enum("members", "vmap", ["vmap", "unroll"],
                             "vmap: batched member updates (accelerators, dense models); unroll: "
                             "written out one after another in the same program (conv nets on "
                             "CPU).")
_NAME = flags.DEFINE_string("name", "sweep", "The sweep's directory in the workdir: sweeps of "
                            "other names keep their results side by side, sharing the teachers.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    logging.getLogger("absl").setLevel(logging.WARNING)
    if _CONFIG.value.distributed:
        jax.distributed.initialize()  # before any other JAX call
    config = _CONFIG.value
    try:
        if config.family != "dsink":
            raise configs_lib.ConfigError(
                f"sweeps train D-SINK students: use experiments/configs/dsink.py "
                f"(got family {config.family!r})")
        grid = dsink.parse_sweep(_SWEEP.value)
        dsink.run_sweep(config, _WORKDIR.value, grid, members_mode=_MEMBERS.value,
                        name=_NAME.value)
    except (configs_lib.ConfigError, PermissionError, ValueError, WorkdirBusyError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main)
