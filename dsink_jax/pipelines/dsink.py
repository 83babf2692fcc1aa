"""Family `dsink`: CE baseline, imbalance-robust f_L, noise-robust f_N, then the D-SINK student.

docs/method.md section 1 says what the paper states and what is ours; every (ours) field of
`config.dsink` is a documented option. The student's allocation can be solved per mini-batch,
over the whole training set between epochs, or online with a carried class potential
(`dsink.allocation`).
"""

from __future__ import annotations

import itertools
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dsink_jax import configs as configs_lib
from dsink_jax import plots
from dsink_jax.data import is_streaming_spec
from dsink_jax.configs import require
from dsink_jax.losses.dsink import BASE_LOSSES, global_class_mass
from dsink_jax.ot.backends import BACKENDS
from dsink_jax.ot.sinkhorn import MIN_EPSILON, SINKHORN_MODES
from dsink_jax.pipelines.common import (augment_for, build_method, check_workdir,
                                        claim_stage_dir, data_header, predict_split,
                                        format_percent, prepare_training_set, results_table,
                                        stage_identity, stage_row, train_or_reuse_stage,
                                        write_summary)
from dsink_jax.train import loop, parallel
from dsink_jax.train import step as step_lib
from dsink_jax.train.workdir import WorkdirLock, process_pool, provenance, write_json
from dsink_jax.train.objectives import (ALLOCATION_TEACHERS, ALLOCATIONS, CLASS_MASS_MODES,
                                        CLASS_MASS_PRIORS, LOSS_HEADS, LOSS_NAMES,
                                        class_mass_shift, count_prior,
                                        dataset_allocation_refresh, logit_scale,
                                        make_dsink_objective)

INIT_FROM = ("scratch", "imbalance_teacher")
# (ours) how the student's step gets the frozen teachers' outputs: "forward" runs them on every
# step's augmented view; "cached" computes them once per stage on the unaugmented training
# images and looks them up by example index (`dsink_jax.train.step.CachedTeacher`).
TEACHER_MODES = ("forward", "cached")
# The largest teacher tables "cached" holds on each device (a full table is N x C float32 per
# teacher: iNaturalist 2018, 437,513 x 8,142, is 14.2 GB); beyond it, a top-k table is required.
MAX_TEACHER_TABLE_BYTES = 2 * 2**30
# (ours, measured) `noise_loss="auto"`: CE as f_N for schedules of at most this many epochs, GCE
# beyond. CE cleans noisy labels until it memorises them: at 30 epochs of ResNet-8 on
# CIFAR-10-LT it cleaned them better than GCE, SCE and ELR and gave the best students, while at
# 100 epochs of the MLP on digits it had memorised them and a GCE f_N gave the better student.
AUTO_CE_MAX_EPOCHS = 30
INFERENCE_MODES = ("raw", "label_prior", "class_mass")
# Where the allocation's class mass over the training set comes from: "imbalance_teacher" (the
# stated Q 1_N = sum_i f_L(x_i), with `class_mass_prior`) or "clean_labels" (a diagnostic, not a
# method: the distribution of the source's labels before the synthetic or CIFAR-N noise, known
# only where the noise was added; it measures what a better estimate of the clean class mass
# could give; a source whose own labels are noisy has no clean ones to give).
CLASS_MASS_SOURCES = ("imbalance_teacher", "clean_labels")
# The prior of the student's logit adjustment (and of `base_loss="la"`): "label_prior" (the
# given labels') or "class_mass" (the allocation's class mass over the training set, so that the
# student's adjusted logits and its targets assume one class distribution).
STUDENT_PRIORS = ("label_prior", "class_mass")

ARGS: dict[str, Any] = {
    **configs_lib.COMMON_ARGS,
    "alpha": 2.0,
    "epsilon": 2.0,
    "class_mass": "batch",
    "class_mass_prior": "label_prior",
    "imbalance_loss": "la",
    "noise_loss": "auto",
    "num_iters": 50,
    "allocation": "online",
    "student_logit_adjustment": 1.0,
    "base_loss": "ce",
    "init_from": "scratch",
    "teachers": "cached",
}


def build_config(args: dict[str, Any]) -> ml_collections.ConfigDict:
    """The `dsink` family: CE baseline, f_L, f_N, then the D-SINK student (see docs/method.md §1).

    `config.loss` is the baseline stage's loss; `config.dsink` holds the student's options. The
    paper states epsilon = 2 and the bi-level scheme; the fields marked (ours) are
    reconstructions where the paper is silent.
    """
    c = configs_lib.build_config("dsink", {k: args[k] for k in configs_lib.COMMON_ARGS})
    with c.unlocked():
        c.dsink = ml_collections.ConfigDict()
        c.dsink.baseline_loss = args["loss"]  # the reference stage (CE by default); "none" skips it
        c.dsink.imbalance_loss = args["imbalance_loss"]  # f_L (ours: logit adjustment)
        # f_N: a loss name, or "auto" (ours, measured): CE for schedules of at most
        # AUTO_CE_MAX_EPOCHS epochs, else GCE; resolved by `teacher_losses` from the final
        # config (so `--config.optim.epochs` counts). See docs/method.md §1.
        c.dsink.noise_loss = args["noise_loss"]
        c.dsink.alpha = float(args["alpha"])  # weight of the D-SINK term (ablated in the paper)
        c.dsink.alpha_warmup_epochs = 0.0  # (ours) linear ramp of alpha; 0 = off
        c.dsink.epsilon = float(args["epsilon"])  # stated: 2
        c.dsink.num_iters = int(args["num_iters"])  # (ours) fixed Sinkhorn iterations
        c.dsink.backend = "ott"  # "ott" (ott-jax Sinkhorn) or "native" (lax.scan, the oracle)
        # (ours) Sinkhorn solve mode: "auto" (scaling domain, 4-10x faster on a CPU at epsilon 2,
        # where a guard on the data allows it, else the log domain), "log" or "kernel".
        c.dsink.sinkhorn_mode = "auto"
        # (ours) granularity of Q: "batch" (Sinkhorn per mini-batch), "dataset" (Sinkhorn over
        # all N samples every refresh_every_epochs, the stated Q 1_N = sum_i f_L(x_i)) or
        # "online" (closed form with the class potential carried in the state; the default:
        # +1.8 over "dataset" at ratio 100 asym 0.2, -0.5 at sym 0.4 (seed 0); O(C) memory,
        # works in sweeps and on streaming sources).
        c.dsink.allocation = args["allocation"]
        c.dsink.refresh_every_epochs = 1  # (ours) "dataset": epochs between solves
        c.dsink.potential_learning_rate = 0.1  # (ours) "online": dual-ascent step size
        # (ours) "batch" allocation only: f_L's class mass per batch ("batch") or over the
        # training set ("global"); the dataset-level allocations always use the latter.
        c.dsink.class_mass = args["class_mass"]
        # (ours) which f_L probabilities make the class mass: "none" = its raw (balanced, test-
        # time) posteriors, whose mass over the long-tailed training set is nearly flat;
        # "label_prior" = reweighted by the given-label prior (p_bal(y|x) pi(y), normalised:
        # f_L's estimate of the training posterior, the quantity its loss fits to the labels;
        # the default: the raw mass made the allocation's argmax worse than the given labels).
        c.dsink.class_mass_prior = args["class_mass_prior"]
        # (ours, a diagnostic) "imbalance_teacher" or "clean_labels" (CLASS_MASS_SOURCES).
        c.dsink.class_mass_source = "imbalance_teacher"
        # (ours) the prior of student_logit_adjustment and base_loss="la" (STUDENT_PRIORS).
        c.dsink.student_prior = "label_prior"
        # (ours) L_base: "ce" on the given labels, "la" logit-adjusted CE (tau
        # loss_options.la_tau, the given-label prior), "none" to drop it.
        c.dsink.base_loss = args["base_loss"]
        # (ours, not in the paper) train the student on logits + tau * log prior (a balanced
        # classifier on a long-tailed training set); 0 = off. Default 1 with label_prior.
        c.dsink.student_logit_adjustment = float(args["student_logit_adjustment"])
        # (ours) "scratch" or "imbalance_teacher": start the student from f_L's weights.
        c.dsink.init_from = args["init_from"]
        # (ours) epochs of the student stage; 0 = optim.epochs, as the teachers (a
        # compute-matched control for the warm start trains the student longer).
        c.dsink.student_epochs = 0
        # (ours) "cached" (the default: the teachers' log-probabilities on the unaugmented
        # training images, computed once per stage and looked up by index: a D-SINK step at
        # 1.015-1.035x a CE step; CIFAR-10-LT r100 sym 0.4, seeds 0 and 1, student 42.3 / 42.6 %
        # against 41.7 / 43.0 % with "forward") or "forward" (the teachers run on every step's
        # augmented view).
        c.dsink.teachers = args["teachers"]
        # (ours) "cached" only: 0 keeps every class's log-probability (N x C per teacher); k
        # keeps the k largest per example, the rest of the mass spread evenly (N x (2k + 1)).
        c.dsink.teacher_cache_topk = 0
        # (ours) test-time logits: "raw", or minus the log of an estimated prior:
        # "label_prior" (given labels) or "class_mass" (f_L's mass over the training set).
        c.dsink.inference = "raw"
        c.dsink.stage_name = "student"  # the student's directory in the workdir
        # (ours) the teacher stages not yet trained are trained by this many spawned processes
        # at once before the student (CPU hosts, one process each: on 2 cores two processes
        # trained ResNet-8 at 1.4-2x the images/s of one, benchmarks/README.md); 1 = in turn.
        c.dsink.teacher_processes = 1
    return c


def uses_training_set_mass(d) -> bool:
    """Whether the allocation of `config.dsink` is held to one class mass over the training set
    (the dataset-level allocations, or `class_mass="global"`), not to a per-batch one."""
    return d.class_mass == "global" or d.allocation != "batch"


def validate(config: ml_collections.ConfigDict) -> None:
    """Checks every value the family reads (the shared sections, then `dsink`), before any work.

    Raises:
      ConfigError: naming the bad value and what is allowed.
    """
    configs_lib.validate_config(config)
    d = config.dsink
    require(d.baseline_loss in LOSS_NAMES + ("none",),
             f"dsink.baseline_loss={d.baseline_loss!r}; allowed: {', '.join(LOSS_NAMES)}, none")
    require(d.imbalance_loss in LOSS_NAMES,
             f"dsink.imbalance_loss={d.imbalance_loss!r}; allowed: {', '.join(LOSS_NAMES)}")
    require(d.noise_loss in LOSS_NAMES + ("auto",),
             f"dsink.noise_loss={d.noise_loss!r}; allowed: auto, {', '.join(LOSS_NAMES)}")
    require(d.alpha >= 0, f"dsink.alpha={d.alpha} must be >= 0")
    require(d.alpha_warmup_epochs >= 0,
             f"dsink.alpha_warmup_epochs={d.alpha_warmup_epochs} must be >= 0")
    require(d.epsilon >= MIN_EPSILON,
             f"dsink.epsilon={d.epsilon} must be >= {MIN_EPSILON} (the paper uses 2)")
    require(d.student_logit_adjustment >= 0,
             f"dsink.student_logit_adjustment={d.student_logit_adjustment} must be >= 0")
    require(d.num_iters >= 1, f"dsink.num_iters={d.num_iters} must be >= 1")
    require(d.backend in BACKENDS,
             f"dsink.backend={d.backend!r}; allowed: {', '.join(BACKENDS)}")
    require(d.sinkhorn_mode in SINKHORN_MODES,
             f"dsink.sinkhorn_mode={d.sinkhorn_mode!r}; allowed: {', '.join(SINKHORN_MODES)}")
    require(d.class_mass in CLASS_MASS_MODES,
             f"dsink.class_mass={d.class_mass!r}; allowed: {', '.join(CLASS_MASS_MODES)}")
    require(d.class_mass_prior in CLASS_MASS_PRIORS,
             f"dsink.class_mass_prior={d.class_mass_prior!r}; allowed: "
             f"{', '.join(CLASS_MASS_PRIORS)}")
    require(d.class_mass_source in CLASS_MASS_SOURCES,
             f"dsink.class_mass_source={d.class_mass_source!r}; allowed: "
             f"{', '.join(CLASS_MASS_SOURCES)}")
    require(d.class_mass_source == "imbalance_teacher" or uses_training_set_mass(d),
            f"dsink.class_mass_source={d.class_mass_source!r} is a fixed training-set mass: "
            "use dsink.allocation=online or dataset, or dsink.class_mass=global")
    require(d.student_prior in STUDENT_PRIORS,
             f"dsink.student_prior={d.student_prior!r}; allowed: {', '.join(STUDENT_PRIORS)}")
    require(d.student_prior != "class_mass" or uses_training_set_mass(d),
            "dsink.student_prior=class_mass needs the training-set class mass: "
            "dsink.allocation=online or dataset, or dsink.class_mass=global")
    require(d.base_loss in BASE_LOSSES,
             f"dsink.base_loss={d.base_loss!r}; allowed: {', '.join(BASE_LOSSES)}")
    require(d.allocation in ALLOCATIONS,
             f"dsink.allocation={d.allocation!r}; allowed: {', '.join(ALLOCATIONS)}")
    require(d.allocation != "dataset" or not is_streaming_spec(
        configs_lib.dataset_spec(config.data.dataset)),
            "dsink.allocation=dataset holds an N x C table on the device; with a streaming "
            "source use dsink.allocation=online (O(C) state) or batch")
    require(d.refresh_every_epochs >= 1,
             f"dsink.refresh_every_epochs={d.refresh_every_epochs} must be >= 1")
    require(0 < d.potential_learning_rate <= 1,
             f"dsink.potential_learning_rate={d.potential_learning_rate} must be in (0, 1]")
    require(d.init_from in INIT_FROM, f"dsink.init_from={d.init_from!r}; allowed: "
             f"{', '.join(INIT_FROM)}")
    if d.init_from == "imbalance_teacher":
        require(LOSS_HEADS[d.imbalance_loss] == "linear",
                 f"dsink.init_from=imbalance_teacher needs an f_L with the student's linear "
                 f"head; dsink.imbalance_loss={d.imbalance_loss!r} has a cosine head (allowed: "
                 f"any loss but ldam_drw)")
    require(d.student_epochs >= 0,
             f"dsink.student_epochs={d.student_epochs} must be >= 0 (0 = optim.epochs)")
    require(d.teacher_processes >= 1,
             f"dsink.teacher_processes={d.teacher_processes} must be >= 1 (1 = in turn)")
    require(d.teacher_processes == 1 or not config.distributed,
             f"dsink.teacher_processes={d.teacher_processes} is for one host: with "
             f"distributed=True use 1")
    require(d.teachers in TEACHER_MODES,
             f"dsink.teachers={d.teachers!r}; allowed: {', '.join(TEACHER_MODES)}")
    require(d.teacher_cache_topk >= 0,
             f"dsink.teacher_cache_topk={d.teacher_cache_topk} must be >= 0 (0 = every class)")
    require(d.inference in INFERENCE_MODES,
             f"dsink.inference={d.inference!r}; allowed: {', '.join(INFERENCE_MODES)}")
    require(d.inference != "class_mass" or uses_training_set_mass(d),
             "dsink.inference=class_mass needs the training-set class mass: dsink.allocation="
             "dataset or online, or dsink.class_mass=global")
    require(_is_stage_dir_name(d.stage_name),
             f"dsink.stage_name={d.stage_name!r} must be a plain directory name other than a "
             f"loss name or 'plots'")


def _is_stage_dir_name(name: str) -> bool:
    """A directory of its own in the workdir: no path, and not a teacher's or the plots'."""
    return bool(name) and name == os.path.basename(name) and name not in LOSS_NAMES + ("plots",)


def teacher_losses(config) -> dict[str, str]:
    """{role: loss} of the teacher stages, `dsink.noise_loss="auto"` resolved.

    "auto" is CE when `optim.epochs <= AUTO_CE_MAX_EPOCHS`, else GCE (ours, measured).
    `dsink.baseline_loss="none"` leaves the reference stage out.
    """
    d = config.dsink
    noise = d.noise_loss
    if noise == "auto":
        noise = "ce" if config.optim.epochs <= AUTO_CE_MAX_EPOCHS else "gce"
    losses = {"baseline": d.baseline_loss, "imbalance_teacher": d.imbalance_loss,
              "noise_teacher": noise}
    return {role: loss for role, loss in losses.items() if loss != "none"}


def train_teachers(config, workdir: str, training_set) -> dict:
    """Trains (or reuses) the CE baseline and the two auxiliaries of the `dsink` family.

    Each stage lives in `workdir/<loss>/`, named by its loss, so that trying another f_N or f_L
    in the same workdir adds a stage instead of replacing one. `dsink.baseline_loss="none"`
    skips the reference stage (it does not feed the student).

    Returns:
      {"rows": table rows, "curves": correction-rate curves, "objective": the student's bound
       D-SINK objective, "teacher_models" / "teacher_variables": the frozen modules and
       variables whose logits the student's step needs (per `dsink.allocation`; with
       `dsink.teachers="cached"`, `CachedTeacher`s and their tables),
       "refresh_extra": the loop hook of the "dataset" allocation (else None), "class_mass":
       the training-set class mass of f_L (None in the "batch" mode with `class_mass=batch`),
       "priors": the post-hoc priors (see `inference_priors`), "stage_variables": {role:
       (model, variables, logit scale)}, "fingerprints": the teachers' parameter hashes}.
    """
    d = config.dsink
    rows, curves, stages = [], {}, {}
    for role, loss in teacher_losses(config).items():
        method = build_method(config, training_set, loss=loss)
        stage_dir = os.path.join(workdir, loss)
        results, state = train_or_reuse_stage(
            config, stage_dir, training_set=training_set, method=method, name=role,
            identity=stage_identity(config, loss))
        rows.append(stage_row(role, loss, results))
        curves[role] = plots.read_metric_curve(os.path.join(stage_dir, "metrics.jsonl"),
                                               "correction_rate")
        stages[role] = (method.model, state.variables, logit_scale(loss, config.loss_options))
    return {"rows": rows, "curves": curves, "stage_variables": stages,
            "fingerprints": [next(r["params_fingerprint"] for r in rows if r["name"] == role)
                             for role in ("imbalance_teacher", "noise_teacher")],
            **assemble_student(config, training_set, stages)}


# How the run is executed, not what it trains: left out of the student's identity, so that
# changing it reuses a finished student.
EXECUTION_OPTIONS = ("teacher_processes",)
# Options added after students were trained and recorded, at the value that reproduces those
# students: left out of the identity at that value, so that a finished student stays reusable.
LATER_OPTIONS = {"class_mass_source": "imbalance_teacher", "student_prior": "label_prior"}


def identity_options(d) -> dict:
    """`config.dsink` as it identifies a student stage: every option but EXECUTION_OPTIONS, and
    LATER_OPTIONS only where they differ from the value they were added with."""
    return {k: v for k, v in d.to_dict().items() if k not in EXECUTION_OPTIONS
            and not (k in LATER_OPTIONS and v == LATER_OPTIONS[k])}


def pretrain_teachers(config, workdir: str) -> list[str]:
    """Trains the unfinished teacher stages in `dsink.teacher_processes` processes at once.

    Each spawned process loads the data and trains one stage (`workdir/<loss>/`) exactly as
    `train_teachers` would, which then finds it finished and reuses it; a stage with a
    `results.json` already is left to that reuse. CPU only: on a GPU every process would claim
    the device's memory. Returns the losses trained here ([] with 1 process or <= 1 pending).
    """
    processes = int(config.dsink.teacher_processes)
    pending = [loss for loss in dict.fromkeys(teacher_losses(config).values())
               if not os.path.exists(os.path.join(workdir, loss, "results.json"))]
    if processes == 1 or len(pending) <= 1:
        return []
    require(jax.default_backend() == "cpu",
            f"dsink.teacher_processes={processes} trains the teachers in processes of their own, "
            f"for CPU hosts; on {jax.default_backend()!r} use 1")
    with process_pool(min(processes, len(pending))) as pool:
        for future in [pool.submit(_train_teacher_stage, config, workdir, loss)
                       for loss in pending]:
            future.result()
    return pending


def _train_teacher_stage(config, workdir: str, loss: str) -> None:
    """One teacher stage in a process of its own (see `pretrain_teachers`)."""
    training_set = prepare_training_set(config)
    train_or_reuse_stage(config, os.path.join(workdir, loss), training_set=training_set,
                         method=build_method(config, training_set, loss=loss), name=loss,
                         identity=stage_identity(config, loss))


def assemble_student(config, training_set, stages: dict) -> dict:
    """What the student's step needs from its frozen teachers, per `config.dsink`.

    Args:
      config: the `dsink` config.
      training_set: the training data.
      stages: {"noise_teacher": (model, variables, logit scale), "imbalance_teacher": ...}.

    Returns:
      {"objective": the bound D-SINK objective, "teacher_models" / "teacher_variables" (see
       `train_teachers`), "refresh_extra", "class_mass", "priors"}.
    """
    d = config.dsink
    steps_per_epoch = training_set.num_train // config.optim.batch_size
    augment = augment_for(config, training_set)
    by_role = {"noise": stages["noise_teacher"], "imbalance": stages["imbalance_teacher"]}
    train_logits_of: dict[str, np.ndarray] = {}

    def train_logits(role: str) -> np.ndarray:  # eval mode, unaugmented training images, once
        if role not in train_logits_of:
            model, variables, scale = by_role[role]
            train_logits_of[role] = scale * predict_split(config, training_set, model,
                                                          variables, "train", augment=augment)
        return train_logits_of[role]

    class_mass = None
    if d.class_mass_source == "clean_labels":  # validate(): a fixed mass is used
        class_mass = count_prior(training_set.class_counts).astype(np.float32)  # clean labels
    elif uses_training_set_mass(d):
        shift = class_mass_shift(d.class_mass_prior, training_set.noisy_class_counts)
        class_mass = np.asarray(global_class_mass(train_logits("imbalance") + shift))
    priors = inference_priors(training_set, class_mass)
    student_prior = class_mass if d.student_prior == "class_mass" else None
    needed_roles = ALLOCATION_TEACHERS[d.allocation]
    if d.teachers == "cached":  # tables of log-probabilities: logit scale 1
        teacher_models = tuple(step_lib.CachedTeacher(training_set.num_classes)
                               for _ in needed_roles)
        teacher_variables = tuple(step_lib.teacher_table(train_logits(r),
                                                         topk=int(d.teacher_cache_topk))
                                  for r in needed_roles)
        teacher_scales = (1.0,) * len(needed_roles)
    else:
        teacher_models = tuple(by_role[r][0] for r in needed_roles)
        teacher_variables = tuple(by_role[r][1] for r in needed_roles)
        teacher_scales = tuple(by_role[r][2] for r in needed_roles)
    objective = make_dsink_objective(d, clean_labels=training_set.clean_labels,
                                     steps_per_epoch=steps_per_epoch, class_mass=class_mass,
                                     class_counts=training_set.noisy_class_counts,
                                     la_tau=config.loss_options.la_tau,
                                     test_prior=priors[d.inference],
                                     teacher_scales=teacher_scales,
                                     student_prior=student_prior)
    refresh = None
    if d.allocation == "dataset":
        refresh = dataset_allocation_refresh(
            d, noise_teacher_logits=train_logits("noise"), class_mass=class_mass,
            class_counts=training_set.noisy_class_counts,
            every_epochs=int(d.refresh_every_epochs), student_prior=student_prior)
    return {"objective": objective, "teacher_models": teacher_models,
            "teacher_variables": teacher_variables, "refresh_extra": refresh,
            "class_mass": class_mass, "priors": priors}


def check_teacher_cache(config, training_set) -> None:
    """Fails before any training when `dsink.teachers="cached"` cannot hold its tables.

    Raises:
      ConfigError: top-k not below the number of classes, or tables over
        MAX_TEACHER_TABLE_BYTES per device (naming the size and the options that fit).
    """
    d = config.dsink
    roles = ALLOCATION_TEACHERS[d.allocation]
    if d.teachers != "cached" or not roles:
        return
    n, c, k = training_set.num_train, training_set.num_classes, int(d.teacher_cache_topk)
    require(k < c, f"dsink.teacher_cache_topk={k} must be below the number of classes {c} "
                   f"(0 = every class)")
    size = len(roles) * step_lib.teacher_table_bytes(n, c, k)
    top64 = len(roles) * step_lib.teacher_table_bytes(n, c, min(64, c - 1))
    require(size <= MAX_TEACHER_TABLE_BYTES,
            f"dsink.teachers=cached would hold {len(roles)} table(s) of {n} x {c} "
            f"log-probabilities ({size / 2**30:.1f} GiB) on every device, over the "
            f"{MAX_TEACHER_TABLE_BYTES / 2**30:.0f} GiB limit; set dsink.teacher_cache_topk "
            f"(k = 64: {top64 / 2**20:.0f} MiB) or dsink.teachers=forward")


def student_config(config):
    """The config of the student stage: `dsink.student_epochs` (> 0) replaces optim.epochs."""
    if not config.dsink.student_epochs:
        return config
    student = config.copy_and_resolve_references()
    student.optim.epochs = int(config.dsink.student_epochs)
    return student


def inference_priors(training_set, class_mass: np.ndarray | None) -> dict:
    """The class priors a post-hoc correction may divide out: {name: [C] or None}.

    "raw": no correction; "label_prior": the given-label distribution; "class_mass": f_L's class
    mass over the training set (the allocation's class marginal in the dataset modes).
    """
    priors = {"raw": None, "label_prior": count_prior(training_set.noisy_class_counts)}
    if class_mass is not None:
        priors["class_mass"] = np.asarray(class_mass, np.float64)
    return priors


def posthoc_evaluations(config, training_set, method, state, priors: dict) -> dict:
    """Test summaries of the final model under each post-hoc correction (logits - log prior).

    One forward pass over the test set; returns {name: {"test_accuracy", "many_shot_accuracy",
    "medium_shot_accuracy", "few_shot_accuracy", "per_class_accuracy"}}.
    """
    logits = predict_split(config, training_set, method.model, state.variables, "test",
                           augment=method.augment)
    out = {}
    for name, prior in priors.items():
        adjusted = logits if prior is None else logits - np.log(np.maximum(prior, 1e-12))
        summary = loop.summarise_predictions(adjusted.argmax(-1), None, training_set, config)
        out[name] = {k: summary[k] for k in ("test_accuracy", "many_shot_accuracy",
                                             "medium_shot_accuracy", "few_shot_accuracy",
                                             "per_class_accuracy")}
    return out


def run(config, workdir: str) -> dict:
    """The `dsink` family: CE baseline, f_L, f_N, then the D-SINK student (docs/method.md §1).

    Each stage trains in its own directory of `workdir` (teachers under their loss's name, the
    student under `dsink.stage_name`) with its own checkpoints and `results.json`; a finished
    stage is reused when the command runs again. The teachers are frozen and passed to the
    student's step as arguments, never checkpointed with it. Writes `workdir/results.json`,
    `workdir/results.md` and `workdir/plots/*.png`; returns the summary.
    """
    started = time.perf_counter()
    validate(config)
    check_workdir(workdir)
    training_set = prepare_training_set(config)
    check_teacher_cache(config, training_set)
    d = config.dsink
    pretrain_teachers(config, workdir)
    teachers = train_teachers(config, workdir, training_set)
    rows, curves = teachers["rows"], teachers["curves"]
    student = student_config(config)
    method = build_method(student, training_set, objective=teachers["objective"],
                          teacher_models=teachers["teacher_models"])
    init_variables = None
    if d.init_from == "imbalance_teacher":
        init_variables = teachers["stage_variables"]["imbalance_teacher"][1]
    student_dir = os.path.join(workdir, d.stage_name)
    identity = {**stage_identity(student, "dsink"), "dsink": identity_options(d),
                "teachers": teachers["fingerprints"]}
    results, state = train_or_reuse_stage(
        student, student_dir, training_set=training_set, method=method, name=d.stage_name,
        identity=identity, teacher_variables=teachers["teacher_variables"],
        refresh_extra=teachers["refresh_extra"], init_variables=init_variables)
    student_row = stage_row("student", "dsink", results)
    student_row["posthoc"] = posthoc_evaluations(config, training_set, method, state,
                                                 teachers["priors"])
    student_row["dsink"] = d.to_dict()
    student_row["teacher_losses"] = teacher_losses(config)  # "auto" resolved
    metrics_path = os.path.join(student_dir, "metrics.jsonl")
    epochs, values = plots.read_metric_curve(metrics_path, "train_allocation_accuracy")
    student_row["allocation_accuracy"] = values[-1] if values else None
    _, corr = plots.read_metric_curve(metrics_path, "train_allocation_correction")
    student_row["allocation_correction"] = corr[-1] if corr else None
    rows.append(student_row)
    curves["student"] = plots.read_metric_curve(metrics_path, "correction_rate")
    curves["student allocation (train, running)"] = plots.read_metric_curve(
        metrics_path, "train_allocation_correction")

    plot_dir = os.path.join(workdir, "plots")
    os.makedirs(plot_dir, exist_ok=True)
    plots.per_class_accuracy_vs_size(rows, training_set.class_counts,
                                     os.path.join(plot_dir, "per_class_accuracy.png"))
    plots.correction_over_epochs(curves, os.path.join(plot_dir, "correction_rate.png"))
    markdown = write_summary(
        workdir, rows, training_set, config=config, started=started,
        extra_columns=(("allocation_accuracy", "alloc. acc."),
                       ("allocation_correction", "alloc. corrected")),
        extra={"allocation_accuracy_curve": {"epochs": epochs,
                                                                 "values": values}})
    print(markdown)
    return {"stages": rows}


# --------------------------------------------------------------------------- sweeps

SWEEPABLE = ("alpha", "epsilon", "learning_rate", "weight_decay", "seed")
# Student options the sweep's shared program handles (a dataset-level solve between epochs, a
# warm start and a post-hoc correction are single-run features).
SWEEP_SUPPORTS = {"allocation": ("batch", "online"), "init_from": ("scratch",),
                  "inference": ("raw",)}


def parse_sweep(specs: list[str]) -> dict[str, list[float]]:
    """Parses `["alpha=0.5,1,2", "epsilon=1,2"]` into `{"alpha": [...], "epsilon": [...]}`.

    Raises:
      ValueError: unknown name, empty or non-numeric values, a name given twice.
    """
    grid: dict[str, list[float]] = {}
    for spec in specs:
        if "=" not in spec:
            raise ValueError(f"--sweep {spec!r} is not of the form name=v1,v2,...")
        name, values = (x.strip() for x in spec.split("=", 1))
        if name not in SWEEPABLE:
            raise ValueError(f"cannot sweep {name!r}; allowed: {', '.join(SWEEPABLE)}")
        if name in grid:
            raise ValueError(f"--sweep {name} given twice")
        try:
            parsed = [int(v) if name == "seed" else float(v) for v in values.split(",") if v]
        except ValueError:
            raise ValueError(f"--sweep {spec!r}: values must be numbers") from None
        if not parsed:
            raise ValueError(f"--sweep {spec!r} has no values")
        grid[name] = parsed
    return grid


def members_of(grid: dict[str, list[float]], config) -> list[dict]:
    """The Cartesian product of the grid, each member with all five values filled in."""
    base = {"alpha": config.dsink.alpha, "epsilon": config.dsink.epsilon,
            "learning_rate": config.optim.learning_rate,
            "weight_decay": config.optim.weight_decay, "seed": config.seed}
    names = list(grid)
    members = []
    for values in itertools.product(*(grid[n] for n in names)):
        member = dict(base, **dict(zip(names, values)))
        member["name"] = "_".join(f"{n}{v:g}" for n, v in zip(names, values)) or "default"
        members.append(member)
    for m in members:
        if m["alpha"] < 0 or m["epsilon"] <= 0 or m["learning_rate"] <= 0 or m["weight_decay"] < 0:
            raise ValueError(f"member {m['name']}: alpha >= 0, epsilon > 0, learning_rate > 0 "
                             f"and weight_decay >= 0 are required; got {m}")
    return members


def init_members(method, members: list[dict], sample_images: np.ndarray):
    """The stacked state [M, ...]: per-member parameters, hyperparameters and memory.

    alpha and epsilon go to `extra["hparams"]` (read by the D-SINK objective), learning rate
    and weight decay to the optimizer's injected hyperparameters, the seed to the parameters'
    initialisation (the data stream follows `config.seed`).
    """
    states = []
    for m in members:
        s = step_lib.init_state(method, jax.random.PRNGKey(int(m["seed"])), sample_images)
        hyper = dict(s.opt_state.hyperparams)
        hyper["learning_rate"] = jnp.asarray(m["learning_rate"], jnp.float32)
        hyper["weight_decay"] = jnp.asarray(m["weight_decay"], jnp.float32)
        s = s.replace(opt_state=s.opt_state._replace(hyperparams=hyper),
                      extra={**s.extra, "hparams": {
                          "alpha": jnp.asarray(m["alpha"], jnp.float32),
                          "epsilon": jnp.asarray(m["epsilon"], jnp.float32)}})
        states.append(s)
    return jax.tree.map(lambda *xs: jnp.stack(xs), *states)


def check_sweep_name(name: str, config) -> None:
    """Raises ConfigError unless `name` can be a sweep's directory in the workdir."""
    require(_is_stage_dir_name(name) and name != config.dsink.stage_name,
            f"sweep name {name!r} must be a plain directory name other than a loss name, "
            f"'plots' or the student's dsink.stage_name")


def run_sweep(config, workdir: str, grid: dict[str, list[float]], *,
              members_mode: str = "vmap", name: str = "sweep") -> dict:
    """Trains the teachers (or reuses them), then every student of `grid` in one program.

    The students are a sweep of the one training loop (`dsink_jax.train.loop.train` with
    `members`): each gets the metrics, evaluations and results of a single run in
    `workdir/<name>/<member>/`, and a member with the config's own values and seed trains the
    same student as `experiments/main.py`. Writes `workdir/<name>/summary.md` and
    `summary.json` (members ranked by test accuracy, diverged members last), and returns
    `{"members": their rows, "teachers": the teachers' rows, "class_counts": [C]}`. Resumes from
    `workdir/<name>/checkpoints`; another grid or config under the same name replaces it, so
    sweeps that should stay side by side in one workdir (sharing its teachers) take their own
    names.
    """
    validate(config)
    check_sweep_name(name, config)
    check_workdir(workdir)
    for field, allowed in SWEEP_SUPPORTS.items():
        if config.dsink[field] not in allowed:
            raise configs_lib.ConfigError(
                f"the sweep does not support dsink.{field}={config.dsink[field]!r}; allowed "
                f"here: {', '.join(allowed)} (train such students with experiments/main.py)")
    if members_mode not in step_lib.MEMBER_MODES:
        raise ValueError(f"members_mode={members_mode!r}; allowed: "
                         f"{', '.join(step_lib.MEMBER_MODES)}")
    members = members_of(grid, config)
    with WorkdirLock(workdir):
        return _run_sweep(config, workdir, members, members_mode, name)


def _run_sweep(config, workdir, members, members_mode, name):
    training_set = prepare_training_set(config)
    check_teacher_cache(config, training_set)
    pretrain_teachers(config, workdir)
    teachers = train_teachers(config, workdir, training_set)
    student = student_config(config)
    method = build_method(student, training_set, objective=teachers["objective"],
                          teacher_models=teachers["teacher_models"])
    sweep_dir = os.path.join(workdir, name)
    claim_stage_dir(sweep_dir, {**stage_identity(student, "dsink"),
                                "dsink": identity_options(config.dsink),
                                "teachers": teachers["fingerprints"], "members": members,
                                "mode": members_mode}, name)
    start = time.perf_counter()
    results, _ = loop.train(
        student, sweep_dir, training_set=training_set, method=method,
        teacher_variables=teachers["teacher_variables"], name=name,
        members=loop.Members(names=tuple(m["name"] for m in members),
                             states=init_members(method, members, training_set.sample_images),
                             mode=members_mode))
    seconds = time.perf_counter() - start
    rows = [{**member, **result} for member, result in zip(members, results)]
    losses = teacher_losses(config)  # "auto" resolved
    for row in rows:  # as a single run's student row records them
        row["dsink"] = {**config.dsink.to_dict(), "alpha": row["alpha"],
                        "epsilon": row["epsilon"]}
        row["teacher_losses"] = losses
        write_json(os.path.join(sweep_dir, row["name"], "results.json"), row)
    rows.sort(key=lambda r: (r["diverged_at_step"] is None, r["test_accuracy"]), reverse=True)
    table = ["| rank | member | alpha | epsilon | lr | wd | seed | overall | many | medium | few "
             "| corrected |", "|" + "---|" * 12]
    for rank, r in enumerate(rows, 1):
        diverged = r["diverged_at_step"] is not None
        cells = [str(rank), r["name"] + (f" (diverged at step {r['diverged_at_step']})"
                                         if diverged else ""),
                 f"{r['alpha']:g}", f"{r['epsilon']:g}", f"{r['learning_rate']:g}",
                 f"{r['weight_decay']:g}", str(r["seed"])]
        cells += [format_percent(r.get(k)) for k in (
            "test_accuracy", "many_shot_accuracy", "medium_shot_accuracy", "few_shot_accuracy",
            "correction_rate")]
        table.append("| " + " | ".join(cells) + " |")
    markdown = (f"# D-SINK sweep: {len(members)} students in one program\n\n"
                f"{data_header(training_set)}\n\n"
                f"Teachers (for reference):\n\n{results_table(teachers['rows'])}\n\n"
                f"Students, ranked by test accuracy:\n\n" + "\n".join(table) + "\n\n"
                f"Trained in {seconds:.1f} s.\n")
    if parallel.is_writer():
        with open(os.path.join(sweep_dir, "summary.md"), "w") as f:
            f.write(markdown)
    write_json(os.path.join(sweep_dir, "summary.json"),
               {"members": rows, "teachers": teachers["rows"], "wall_seconds": seconds,
                "provenance": provenance(), "config": config.to_dict()})
    print(markdown)
    return {"members": rows, "teachers": teachers["rows"],
            "class_counts": [int(c) for c in training_set.class_counts]}
