"""Family `baseline`: one model trained with one chosen loss."""

from __future__ import annotations

import json
import os
import time
from typing import Any

import ml_collections

from dsink_jax import configs as configs_lib
from dsink_jax.pipelines.common import (build_method, check_workdir, prepare_training_set,
                                        stage_identity, stage_row, train_or_reuse_stage,
                                        write_summary)

ARGS: dict[str, Any] = dict(configs_lib.COMMON_ARGS)


def build_config(args: dict[str, Any]) -> ml_collections.ConfigDict:
    """The locked config of the family from parsed `:key=value` arguments (see `ARGS`)."""
    return configs_lib.build_config("baseline", args)


def validate(config) -> None:
    """Checks every value the family reads, before any work."""
    configs_lib.validate_config(config)


def run(config, workdir: str) -> dict:
    """The `baseline` family: one model trained with `config.loss`.

    Writes `workdir/results.json`, `workdir/results.md` and the stage's own outputs under
    `workdir/<loss>/`. Returns the summary dict.
    """
    started = time.perf_counter()
    validate(config)
    check_workdir(workdir)
    training_set = prepare_training_set(config)
    method = build_method(config, training_set)
    stage_dir = os.path.join(workdir, config.loss)
    results, _ = train_or_reuse_stage(config, stage_dir, training_set=training_set,
                                      method=method, name=config.loss,
                                      identity=stage_identity(config, config.loss))
    rows = [stage_row(config.loss, config.loss, results)]
    markdown = write_summary(workdir, rows, training_set, config=config, started=started)
    print(markdown)
    return json.loads(json.dumps({"stages": rows}, default=str))


