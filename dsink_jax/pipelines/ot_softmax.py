"""Family `ot_softmax`: OT-dynamic softmax + SupCon, against CE, LA and Balanced Softmax.

Every field of `config.ot_softmax` is our reconstruction (docs/method.md section 2).
"""

from __future__ import annotations

import os
import time
from typing import Any

import ml_collections

from dsink_jax import configs as configs_lib
from dsink_jax import plots
from dsink_jax.configs import require
from dsink_jax.pipelines.common import (build_method, check_workdir, prepare_training_set,
                                        stage_identity, stage_row, train_or_reuse_stage,
                                        write_summary)
from dsink_jax.train.objectives import LOSS_NAMES, make_ot_softmax_objective
from dsink_jax.train.objectives import OT_INFERENCE_MODES as INFERENCE_MODES
from dsink_jax.train.objectives import OT_TRAIN_TARGETS as TRAIN_TARGETS

ARGS: dict[str, Any] = {
    **configs_lib.COMMON_ARGS,
    "noise": "none",
    "noise_rate": 0.0,
    "inference": "raw",
    "train_target": "prior",
}


def build_config(args: dict[str, Any]) -> ml_collections.ConfigDict:
    """The `ot_softmax` family: CE, LA and Balanced Softmax references, then OT-dynamic softmax.

    Every field of `config.ot_softmax` is our reconstruction (docs/method.md §2): the paper states the
    power-diagram view, the dynamic OT softmax and SupCon, not these values.
    """
    c = configs_lib.build_config("ot_softmax", {k: args[k] for k in configs_lib.COMMON_ARGS})
    with c.unlocked():
        o = c.ot_softmax = ml_collections.ConfigDict()
        o.references = ("ce", "la", "balanced_softmax")  # trained on the same data for the table
        o.scale = 16.0  # cosine-classifier logit scale s
        o.supcon_weight = 0.35  # BCL's default weight
        o.temperature = 0.1  # SupCon temperature
        o.projection_dim = 128
        o.solve_every = 1  # re-solve the heights every k steps
        o.solve_steps = 5  # warm-started dual steps per re-solve
        o.num_samples = 1024  # Monte-Carlo points on the sphere per dual step
        o.solver_learning_rate = 0.02  # Adam on the heights (a fresh Adam per re-solve: its
        # first steps move every height by about this much, so keep it small when warm-started)
        o.entropic_epsilon = 0.0  # 0 = hard cells; > 0 = soft (entropic) cells
        o.train_target = args["train_target"]  # nu during training: "prior" or "uniform"
        o.inference = args["inference"]  # "raw" (s cos) or "balanced" (s cos + h for uniform nu)
    return c


def validate(config: ml_collections.ConfigDict) -> None:
    """Checks every value the family reads (the shared sections, then `ot_softmax`)."""
    configs_lib.validate_config(config)
    o = config.ot_softmax
    for loss in o.references:
        require(loss in LOSS_NAMES,
                 f"ot_softmax.references has {loss!r}; allowed: {', '.join(LOSS_NAMES)}")
    require(o.scale > 0, f"ot_softmax.scale={o.scale} must be > 0")
    require(o.temperature > 0, f"ot_softmax.temperature={o.temperature} must be > 0")
    require(o.supcon_weight >= 0, f"ot_softmax.supcon_weight={o.supcon_weight} must be >= 0")
    require(o.projection_dim >= 1, f"ot_softmax.projection_dim={o.projection_dim} must be >= 1")
    require(o.solve_every >= 1, f"ot_softmax.solve_every={o.solve_every} must be >= 1")
    require(o.solve_steps >= 1, f"ot_softmax.solve_steps={o.solve_steps} must be >= 1")
    require(o.num_samples >= 1, f"ot_softmax.num_samples={o.num_samples} must be >= 1")
    require(o.solver_learning_rate > 0,
             f"ot_softmax.solver_learning_rate={o.solver_learning_rate} must be > 0")
    require(o.entropic_epsilon >= 0,
             f"ot_softmax.entropic_epsilon={o.entropic_epsilon} must be >= 0")
    require(o.train_target in TRAIN_TARGETS,
             f"ot_softmax.train_target={o.train_target!r}; allowed: {', '.join(TRAIN_TARGETS)}")
    require(o.inference in INFERENCE_MODES,
             f"ot_softmax.inference={o.inference!r}; allowed: {', '.join(INFERENCE_MODES)}")


def run(config, workdir: str) -> dict:
    """The `ot_softmax` family: reference losses (CE, LA, Balanced Softmax), then the
    OT-dynamic softmax model with SupCon (docs/method.md §2), all on the same data.

    Writes `workdir/results.json`, `workdir/results.md`, `workdir/plots/per_class_accuracy.png`
    and one directory per stage.
    """
    started = time.perf_counter()
    validate(config)
    check_workdir(workdir)
    training_set = prepare_training_set(config)
    o = config.ot_softmax
    rows = []
    for loss in o.references:
        method = build_method(config, training_set, loss=loss)
        results, _ = train_or_reuse_stage(
            config, os.path.join(workdir, loss), training_set=training_set, method=method,
            name=loss, identity=stage_identity(config, loss))
        rows.append(stage_row(loss, loss, results))

    objective = make_ot_softmax_objective(o, class_counts=training_set.noisy_class_counts)
    method = build_method(config, training_set, objective=objective)
    results, _ = train_or_reuse_stage(
        config, os.path.join(workdir, "ot_softmax"), training_set=training_set, method=method,
        name="ot_softmax", identity={**stage_identity(config, "ot_softmax"),
                                     "ot_softmax": o.to_dict()})
    rows.append(stage_row("ot_softmax", "ot_softmax", results))
    plot_dir = os.path.join(workdir, "plots")
    os.makedirs(plot_dir, exist_ok=True)
    plots.per_class_accuracy_vs_size(rows, training_set.class_counts,
                                     os.path.join(plot_dir, "per_class_accuracy.png"))
    markdown = write_summary(workdir, rows, training_set, config=config, started=started)
    print(markdown)
    return {"stages": rows}
