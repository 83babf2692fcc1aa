r"""Trains an experiment family and prints its results table.

Usage:
  python experiments/main.py --config=experiments/configs/FAMILY.py[:key=value,...] \
      --workdir=DIR [--config.optim.epochs=5 ...]

The family's config file docstring gives its arguments, the command and the expected result.
Running the same command again resumes from DIR/checkpoints (and reuses finished stages).
"""

import logging
import sys

import jax
from absl import app, flags
from ml_collections import config_flags

from dsink_jax import configs as configs_lib
from dsink_jax import pipelines
from dsink_jax.train.workdir import WorkdirBusyError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and results.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    logging.getLogger("absl").setLevel(logging.WARNING)
    if _CONFIG.value.distributed:
        jax.distributed.initialize()  # before any other JAX call
    try:
        pipelines.run(_CONFIG.value, _WORKDIR.value)
    except (configs_lib.ConfigError, PermissionError, WorkdirBusyError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main)
