r"""What a dsink workdir's two teachers know, from their finished stages (no training).

For one (setting, seed) workdir of `benchmarks/accuracy.py` (or `experiments/main.py`) with the CE
stage (`ce/`) and f_L's stage (`la/` or `--imbalance-loss`), prints and writes as JSON:

* the class masses an allocation could be held to, against the clean and the given labels of the
  training set: f_L's raw posteriors (`class_mass_prior=none`), its training posteriors
  (`label_prior`, the default) and the histogram of their argmax; with the L1 distance of each to
  the clean class distribution;
* when the CE stage is finished, test accuracy (%) of CE, of CE corrected post hoc (logits minus
  the log given-label prior), of f_L, and of the test-time ensembles
  `w (CE - log prior) + (1 - w) f_L` of the two teachers' log-probabilities: what the teachers
  know together, a bound on what distilling them can carry.

  python benchmarks/teacher_diagnostics.py --data=npz:../shared/data/cifar10.npz \
    --setting=imbalance=10,noise=sym,noise_rate=0.4 \
    --workdir=runs/acc/imbalance-10_noise-sym_noise_rate-0.4/seed0 --out=diagnostics.json
"""

import argparse
import json
import os

import jax
import numpy as np

from dsink_jax import configs, pipelines
from dsink_jax.losses import global_class_mass
from dsink_jax.pipelines.common import (augment_for, build_method, predict_split,
                                        prepare_training_set, restore_finished_stage,
                                        stage_identity)
from dsink_jax.train import objectives

ENSEMBLE_WEIGHTS = (0.25, 0.5, 0.75)


def stage_logits(config, training_set, stage_dir: str, loss: str, split: str) -> np.ndarray:
    """A finished stage's logits on a split (unaugmented), from its final checkpoint.

    Raises:
      SystemExit: the stage is not finished, or was trained under another identity (another
        setting, preset or seed than the arguments name).
    """
    identity_path = os.path.join(stage_dir, "identity.json")
    expected = json.loads(json.dumps(stage_identity(config, loss)))  # as it reads back
    found = None
    if os.path.exists(identity_path):
        with open(identity_path) as f:
            found = json.load(f)
    if found != expected:
        raise SystemExit(f"{stage_dir} was not trained with --setting/--preset/--seed as given "
                         f"(its identity.json differs or is missing)")
    method = build_method(config, training_set, loss=loss)
    finished = restore_finished_stage(config, stage_dir, training_set=training_set,
                                      method=method)
    if finished is None:
        raise SystemExit(f"{stage_dir}: no finished stage (results.json and the final "
                         f"checkpoint)")
    return np.asarray(predict_split(config, training_set, method.model, finished[1].variables,
                                    split, augment=augment_for(config, training_set)))


def diagnostics(config, training_set, workdir: str, imbalance_loss: str = "la") -> dict:
    """The class masses and the test accuracies described in the module docstring."""
    counts = training_set.noisy_class_counts
    log_prior = objectives.class_mass_shift("label_prior", counts)  # log given-label prior
    clean = training_set.class_counts / training_set.class_counts.sum()
    train_l = stage_logits(config, training_set, os.path.join(workdir, imbalance_loss),
                           imbalance_loss, "train")
    masses = {"clean": clean, "given_labels": counts / counts.sum()}
    masses["f_L_none"] = np.asarray(global_class_mass(train_l))  # as the pipeline makes them
    masses["f_L_label_prior"] = np.asarray(global_class_mass(train_l + log_prior))
    masses["f_L_label_prior_argmax"] = np.bincount(
        (train_l + log_prior).argmax(-1), minlength=training_set.num_classes) / len(train_l)
    result = {"class_mass": {k: [float(x) for x in v] for k, v in masses.items()},
              "class_mass_l1_to_clean": {k: float(np.abs(np.asarray(v) - clean).sum())
                                         for k, v in masses.items()}}
    if not os.path.exists(os.path.join(workdir, "ce", "results.json")):
        print(f"{workdir}/ce is not finished: the class masses only")
        return result
    y = np.asarray(training_set.y_test)
    test = {loss: np.asarray(jax.nn.log_softmax(stage_logits(
        config, training_set, os.path.join(workdir, loss), loss, "test")))
        for loss in ("ce", imbalance_loss)}

    def accuracy(log_probs):
        return float(100 * np.mean(log_probs.argmax(-1) == y))
    ce_balanced = test["ce"] - log_prior
    accuracies = {"ce": accuracy(test["ce"]), "ce_minus_log_prior": accuracy(ce_balanced),
                  imbalance_loss: accuracy(test[imbalance_loss])}
    for w in ENSEMBLE_WEIGHTS:
        accuracies[f"ensemble_{w:g}_ce"] = accuracy(w * ce_balanced
                                                    + (1 - w) * test[imbalance_loss])
    return {**result, "test_accuracy": accuracies}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="npz:../shared/data/cifar10.npz")
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--setting", required=True, help="the run's config arguments")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", required=True, help="the (setting, seed) workdir")
    parser.add_argument("--imbalance-loss", default="la")
    parser.add_argument("--out", default="", help="write the diagnostics here as JSON")
    args = parser.parse_args()
    config = pipelines.dsink.build_config(configs.parse_arg_string(
        f"dataset={args.data},preset={args.preset},{args.setting},seed={args.seed}",
        pipelines.dsink.ARGS))
    result = {"setting": args.setting, "seed": args.seed, "preset": args.preset,
              **diagnostics(config, prepare_training_set(config), args.workdir,
                            args.imbalance_loss)}
    for name, mass in result["class_mass"].items():
        print(f"{name:24s} L1 to clean {result['class_mass_l1_to_clean'][name]:.3f}  "
              + " ".join(f"{x:.4f}" for x in mass))
    for name, value in result.get("test_accuracy", {}).items():
        print(f"test accuracy {name:24s} {value:.2f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
