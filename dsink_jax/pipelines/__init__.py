"""Experiment pipelines: a config in, trained stages and a results table out.

One module per experiment family, each with its `ARGS` (the `:key=value` arguments), its
`build_config`, `validate` and `run(config, workdir)`:

* :mod:`~dsink_jax.pipelines.baseline`: one model, one loss;
* :mod:`~dsink_jax.pipelines.dsink`: CE, f_L, f_N and the D-SINK student (and its sweeps);
* :mod:`~dsink_jax.pipelines.ot_softmax`: OT-dynamic softmax + SupCon against its references.

They are importable, so a notebook or a test runs exactly what `experiments/main.py` runs.
"""

from dsink_jax import configs as configs_lib
from dsink_jax.train.workdir import WorkdirLock, ensure_writable_dir
from dsink_jax.pipelines import baseline, dsink, ot_softmax
from dsink_jax.pipelines.common import (build_method, prepare_training_set, results_table,
                                        train_or_reuse_stage)

FAMILIES = {"baseline": baseline, "dsink": dsink, "ot_softmax": ot_softmax}

__all__ = ["FAMILIES", "baseline", "build_method", "dsink", "get_config", "ot_softmax",
           "prepare_training_set", "results_table", "run", "train_or_reuse_stage"]


def get_config(family: str, arg: str | None = None):
    """The config of `family` from a `key=value,...` argument string (as after the colon)."""
    if family not in FAMILIES:
        raise configs_lib.ConfigError(
            f"unknown family {family!r}; allowed: {', '.join(FAMILIES)}")
    module = FAMILIES[family]
    return module.build_config(configs_lib.parse_arg_string(arg, module.ARGS))


def run(config, workdir: str) -> dict:
    """Runs the pipeline of `config.family`, holding the workdir (one run per workdir).

    The config is validated first, so a bad value fails before anything is written.
    """
    if config.family not in FAMILIES:
        raise configs_lib.ConfigError(
            f"unknown family {config.family!r}; allowed: {', '.join(FAMILIES)}")
    family = FAMILIES[config.family]
    family.validate(config)
    with WorkdirLock(ensure_writable_dir(workdir)):
        return family.run(config, workdir)
