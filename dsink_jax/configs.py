"""Experiment configuration: one parameterised builder shared by every experiment family.

Configs are code (ml-collections), in the style of big_vision: a family's file under
`experiments/configs/` calls :func:`build_config` with the `:key=value` arguments of the command
line, e.g. ``--config=experiments/configs/baseline.py:dataset=digits,noise=sym,noise_rate=0.2``.
`--config.x=y` then overrides any field; the returned ConfigDict is locked, so a typo fails loudly.

Presets (the `preset` argument):

* ``paper``: the LDAM-DRW / RoLT protocol: ResNet-32, 200 epochs, batch 128, SGD lr 0.1,
  momentum 0.9, weight decay 2e-4, 5 warm-up epochs, lr x0.01 at epoch 160 and x0.0001 at 180,
  random crop (pad 4) and flip.
* ``cpu``: a reduced protocol whose every stage fits about five minutes on 2 CPU cores for
  CIFAR-10-LT at ratio 100 (see :data:`PRESETS` for the measured figure); on `digits` it is the
  README's main job (about a minute).
* ``smoke``: seconds; for tests and for checking a set-up.
"""

from __future__ import annotations

import copy
import math
import os
from typing import Any

import ml_collections

# Arguments accepted after the colon of `--config=FILE.py:`. Each family may add its own.
COMMON_ARGS: dict[str, Any] = {
    "dataset": "digits",
    "imbalance": 10.0,
    "profile": "exp",
    "noise": "sym",
    "noise_rate": 0.2,
    "loss": "ce",
    "model": "",  # empty: the preset's model for the dataset
    "preset": "cpu",
    "seed": 0,
}

PRESET_NAMES = ("paper", "cpu", "smoke")

# Dataset names accepted by `dataset=`; `npz:PATH` and `tfds:NAME` are accepted as well.
DATASET_ALIASES = {
    "digits": "digits",
    "cifar10": "tfds:cifar10",
    "cifar100": "tfds:cifar100",
    "cifar10_n": "tfds:cifar10_n",
    "cifar100_n": "tfds:cifar100_n",
}

# Per-preset training protocol. `digits` overrides apply when the data is the 8x8 digits set.
PRESETS: dict[str, dict[str, Any]] = {
    "paper": dict(
        model="resnet32", width=1.0, epochs=200, batch_size=128, learning_rate=0.1,
        momentum=0.9, weight_decay=2e-4, schedule="step", warmup_epochs=5,
        lr_drop_fractions=(0.8, 0.9), lr_drop_factors=(0.01, 0.0001), eval_every_epochs=10,
        checkpoint_every_epochs=10,
    ),
    # Sized for 2 CPU cores: resnet8 (width 1) trains at 650-800 images/s on 2 idle cores, so
    # 30 epochs of CIFAR-10-LT ratio 100 (12,406 images) take 8-10 minutes a stage and a whole
    # D-SINK pipeline (4 stages) about 40 minutes. CE on clean ratio 100 reaches 49.4 % here
    # (8 epochs gave 35.3 %; ResNet-32 at the paper preset's 200 epochs is published at ~70 %).
    "cpu": dict(
        model="resnet8", width=1.0, epochs=30, batch_size=128, learning_rate=0.1,
        momentum=0.9, weight_decay=5e-4, schedule="cosine", warmup_epochs=1,
        lr_drop_fractions=(0.8, 0.9), lr_drop_factors=(0.01, 0.0001), eval_every_epochs=10,
        checkpoint_every_epochs=5,
    ),
    "smoke": dict(
        model="cnn", width=0.25, epochs=2, batch_size=64, learning_rate=0.05,
        momentum=0.9, weight_decay=5e-4, schedule="cosine", warmup_epochs=0,
        lr_drop_fractions=(0.8, 0.9), lr_drop_factors=(0.01, 0.0001), eval_every_epochs=1,
        checkpoint_every_epochs=1,
    ),
}

# On the 8x8 digits the small models train in seconds; these replace the preset's values.
DIGITS_OVERRIDES: dict[str, dict[str, Any]] = {
    "paper": dict(model="cnn", width=1.0, batch_size=64),
    "cpu": dict(model="mlp", width=1.0, epochs=100, batch_size=64, learning_rate=0.05,
                eval_every_epochs=20, checkpoint_every_epochs=20),
    "smoke": dict(model="mlp", width=0.5, epochs=2, batch_size=64),
}

LOSS_DEFAULTS = dict(
    la_tau=1.0,  # logit adjustment temperature (Menon et al. 2021)
    gce_q=0.7,  # generalized cross-entropy exponent (Zhang & Sabuncu 2018)
    sce_alpha=0.1,  # symmetric CE: weight of CE (Wang et al. 2019)
    sce_beta=1.0,  # symmetric CE: weight of reverse CE
    elr_lambda=3.0,  # early-learning regularisation weight (Liu et al. 2020)
    elr_beta=0.7,  # ELR target momentum
    ldam_max_margin=0.5,  # LDAM largest margin (Cao et al. 2019)
    ldam_scale=30.0,  # LDAM logit scale (cosine logits)
    drw_beta=0.9999,  # DRW effective-number beta
    drw_start_fraction=0.8,  # DRW starts at this fraction of the epochs (160/200)
)


class ConfigError(ValueError):
    """A configuration value is not allowed."""


def parse_arg_string(arg: str | None, defaults: dict[str, Any]) -> dict[str, Any]:
    """Parses `key=value,key=value` into a dict typed like `defaults`.

    Args:
      arg: the text after the colon of `--config=FILE.py:...`, or None.
      defaults: allowed keys with their default values; a value is converted to the type of its
        default (bool, int, float or str).

    Returns:
      A new dict: `defaults` updated with the parsed values.

    Raises:
      ConfigError: unknown key, missing `=`, or a value that does not convert.
    """
    out = dict(defaults)
    if not arg:
        return out
    for item in arg.split(","):
        item = item.strip()
        if not item:
            continue
        if "=" not in item:
            raise ConfigError(f"config argument {item!r} is not of the form key=value")
        key, value = (s.strip() for s in item.split("=", 1))
        if key not in defaults:
            raise ConfigError(
                f"unknown config argument {key!r}; allowed: {', '.join(sorted(defaults))}")
        kind = type(defaults[key])
        try:
            if kind is bool:
                if value.lower() not in ("true", "false", "1", "0"):
                    raise ValueError(value)
                out[key] = value.lower() in ("true", "1")
            else:
                out[key] = kind(value)
        except ValueError:
            raise ConfigError(
                f"config argument {key}={value!r} is not a valid {kind.__name__}") from None
    return out


def dataset_spec(dataset: str) -> str:
    """Maps a `dataset=` value to a data source spec (`digits`, `npz:PATH`, `tfds:NAME`)."""
    if dataset in DATASET_ALIASES:
        return DATASET_ALIASES[dataset]
    if dataset.startswith(("npz:", "tfds:")):
        return dataset
    raise ConfigError(
        f"unknown dataset {dataset!r}; allowed: {', '.join(DATASET_ALIASES)}, npz:PATH, tfds:NAME")


def build_config(family: str, args: dict[str, Any]) -> ml_collections.ConfigDict:
    """Builds the locked config of one experiment family from parsed arguments.

    Args:
      family: "baseline", "dsink" or "ot_softmax" (selects the pipeline in `experiments/main.py`).
      args: the parsed `:key=value` arguments (see :data:`COMMON_ARGS`).

    Returns:
      A locked `ml_collections.ConfigDict`.
    """
    preset = args["preset"]
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; allowed: {', '.join(PRESET_NAMES)}")
    spec = dataset_spec(args["dataset"])
    protocol = copy.deepcopy(PRESETS[preset])
    is_digits = spec == "digits"
    if is_digits:
        protocol.update(DIGITS_OVERRIDES[preset])

    c = ml_collections.ConfigDict()
    c.family = family
    c.preset = preset
    c.seed = int(args["seed"])

    c.data = ml_collections.ConfigDict()
    c.data.dataset = args["dataset"]
    c.data.data_dir = ""  # tfds data_dir; empty = tfds default
    c.data.imbalance = float(args["imbalance"])
    c.data.profile = args["profile"]
    c.data.noise = args["noise"]
    c.data.noise_rate = float(args["noise_rate"])
    c.data.real_noise_key = ""  # for noise=real: the extra label array (e.g. worse_label)
    c.data.crop_padding = 1 if is_digits else 4
    c.data.flip = not is_digits  # flipping a digit changes what it is
    c.data.many_shot_threshold = 100  # many-shot: more than this many training images
    c.data.few_shot_threshold = 20  # few-shot: fewer than this many

    c.model = ml_collections.ConfigDict()
    c.model.name = args["model"] or protocol["model"]
    c.model.width = float(protocol["width"])
    c.model.dtype = "float32"

    c.loss = args["loss"]
    c.loss_options = ml_collections.ConfigDict(dict(LOSS_DEFAULTS))

    c.optim = ml_collections.ConfigDict()
    c.optim.epochs = int(protocol["epochs"])
    c.optim.batch_size = int(protocol["batch_size"])
    c.optim.learning_rate = float(protocol["learning_rate"])
    c.optim.momentum = float(protocol["momentum"])
    c.optim.weight_decay = float(protocol["weight_decay"])
    c.optim.nesterov = False
    c.optim.schedule = protocol["schedule"]
    c.optim.warmup_epochs = float(protocol["warmup_epochs"])
    c.optim.lr_drop_fractions = tuple(protocol["lr_drop_fractions"])
    c.optim.lr_drop_factors = tuple(protocol["lr_drop_factors"])

    c.eval_every_epochs = int(protocol["eval_every_epochs"])
    c.checkpoint_every_epochs = int(protocol["checkpoint_every_epochs"])
    c.keep_checkpoints = 2
    c.eval_batch_size = 512
    c.progress = True  # tqdm progress bar
    c.num_devices = 0  # data-parallel devices; 0 = all devices (of all processes)
    # Multi-host: call jax.distributed.initialize() first (Slurm / TPU pods detect their peers;
    # elsewhere set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID).
    c.distributed = False
    c.lock()  # a typo in `--config.x=y` or in code fails loudly
    return c


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _require_all_finite(tree: dict, prefix: str = "") -> None:
    """Every number in the config must be finite (NaN and inf pass one-sided range checks)."""
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            _require_all_finite(value, f"{name}.")
        elif isinstance(value, (tuple, list)):
            for item in value:
                if isinstance(item, float) and not math.isfinite(item):
                    raise ConfigError(f"{name}={value!r} must hold finite numbers")
        elif isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{name}={value!r} must be finite")


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Checks every value the training pipeline reads, before any data is loaded or work done.

    Raises:
      ConfigError: naming the bad value and what is allowed.
    """
    # Imported here: the registries live next to their implementations.
    from dsink_jax.data import NOISE_KINDS
    from dsink_jax.models import MODEL_NAMES
    from dsink_jax.train.objectives import LOSS_NAMES

    _require_all_finite(config.to_dict())
    _require(isinstance(config.seed, int) and 0 <= config.seed < 2**32,
             f"seed={config.seed!r} must be an integer in [0, 2**32)")
    dataset_spec(config.data.dataset)
    _require(config.data.imbalance >= 1.0,
             f"data.imbalance={config.data.imbalance} must be >= 1 (n_max / n_min; 1 = balanced)")
    _require(config.data.profile in ("exp", "step"),
             f"data.profile={config.data.profile!r}; allowed: exp, step")
    _require(config.data.noise in NOISE_KINDS,
             f"data.noise={config.data.noise!r}; allowed: {', '.join(NOISE_KINDS)}")
    _require(0.0 <= config.data.noise_rate < 1.0,
             f"data.noise_rate={config.data.noise_rate} must be in [0, 1)")
    _require(config.data.crop_padding >= 0,
             f"data.crop_padding={config.data.crop_padding} must be >= 0")
    _require(config.model.name in MODEL_NAMES,
             f"model.name={config.model.name!r}; allowed: {', '.join(MODEL_NAMES)}")
    _require(config.model.width > 0, f"model.width={config.model.width} must be > 0")
    _require(config.model.dtype in ("float32", "bfloat16"),
             f"model.dtype={config.model.dtype!r}; allowed: float32, bfloat16")
    _require(config.loss in LOSS_NAMES,
             f"loss={config.loss!r}; allowed: {', '.join(LOSS_NAMES)}")
    lo = config.loss_options
    _require(lo.la_tau >= 0, f"loss_options.la_tau={lo.la_tau} must be >= 0")
    _require(0 < lo.gce_q <= 1, f"loss_options.gce_q={lo.gce_q} must be in (0, 1]")
    _require(lo.sce_alpha >= 0, f"loss_options.sce_alpha={lo.sce_alpha} must be >= 0")
    _require(lo.sce_beta >= 0, f"loss_options.sce_beta={lo.sce_beta} must be >= 0")
    _require(lo.elr_lambda >= 0, f"loss_options.elr_lambda={lo.elr_lambda} must be >= 0")
    _require(0 <= lo.elr_beta < 1, f"loss_options.elr_beta={lo.elr_beta} must be in [0, 1)")
    _require(lo.ldam_max_margin > 0,
             f"loss_options.ldam_max_margin={lo.ldam_max_margin} must be > 0")
    _require(lo.ldam_scale > 0, f"loss_options.ldam_scale={lo.ldam_scale} must be > 0")
    _require(0 <= lo.drw_beta < 1, f"loss_options.drw_beta={lo.drw_beta} must be in [0, 1)")
    _require(0 <= lo.drw_start_fraction <= 1,
             f"loss_options.drw_start_fraction={lo.drw_start_fraction} must be in [0, 1]")
    o = config.optim
    _require(o.epochs >= 1, f"optim.epochs={o.epochs} must be >= 1")
    _require(o.batch_size >= 1, f"optim.batch_size={o.batch_size} must be >= 1")
    _require(o.learning_rate > 0, f"optim.learning_rate={o.learning_rate} must be > 0")
    _require(0 <= o.momentum < 1, f"optim.momentum={o.momentum} must be in [0, 1)")
    _require(o.weight_decay >= 0, f"optim.weight_decay={o.weight_decay} must be >= 0")
    _require(o.schedule in ("step", "cosine", "constant"),
             f"optim.schedule={o.schedule!r}; allowed: step, cosine, constant")
    _require(o.warmup_epochs >= 0, f"optim.warmup_epochs={o.warmup_epochs} must be >= 0")
    _require(len(o.lr_drop_fractions) == len(o.lr_drop_factors),
             "optim.lr_drop_fractions and optim.lr_drop_factors must have the same length")
    _require(config.eval_every_epochs >= 1,
             f"eval_every_epochs={config.eval_every_epochs} must be >= 1")
    _require(config.checkpoint_every_epochs >= 1,
             f"checkpoint_every_epochs={config.checkpoint_every_epochs} must be >= 1")
    _require(config.keep_checkpoints >= 1,
             f"keep_checkpoints={config.keep_checkpoints} must be >= 1")
    _require(config.eval_batch_size >= 1,
             f"eval_batch_size={config.eval_batch_size} must be >= 1")
    _require(config.num_devices >= 0,
             f"num_devices={config.num_devices} must be >= 0 (0 = all devices)")
    d = config.data
    _require(0 <= d.few_shot_threshold <= d.many_shot_threshold,
             f"data.few_shot_threshold={d.few_shot_threshold} and data.many_shot_threshold="
             f"{d.many_shot_threshold} must satisfy 0 <= few <= many")


# --------------------------------------------------------------------------- D-SINK family

INIT_FROM = ("scratch", "imbalance_teacher")
INFERENCE_MODES = ("raw", "label_prior", "class_mass")

DSINK_ARGS: dict[str, Any] = {
    **COMMON_ARGS,
    "alpha": 2.0,
    "epsilon": 2.0,
    "class_mass": "batch",
    "imbalance_loss": "la",
    "noise_loss": "gce",
    "num_iters": 50,
    "allocation": "batch",
    "base_loss": "ce",
    "init_from": "scratch",
}


def build_dsink_config(args: dict[str, Any]) -> ml_collections.ConfigDict:
    """The `dsink` family: CE baseline, f_L, f_N, then the D-SINK student (see METHOD.md §1).

    `config.loss` is the baseline stage's loss; `config.dsink` holds the student's options. The
    paper states epsilon = 2 and the bi-level scheme; the fields marked (ours) are
    reconstructions where the paper is silent.
    """
    c = build_config("dsink", {k: args[k] for k in COMMON_ARGS})
    with c.unlocked():
        c.dsink = ml_collections.ConfigDict()
        c.dsink.baseline_loss = args["loss"]  # the reference stage (CE by default); "none" skips it
        c.dsink.imbalance_loss = args["imbalance_loss"]  # f_L (ours: logit adjustment)
        c.dsink.noise_loss = args["noise_loss"]  # f_N (ours: GCE q=0.7)
        c.dsink.alpha = float(args["alpha"])  # weight of the D-SINK term (ablated in the paper)
        c.dsink.alpha_warmup_epochs = 0.0  # (ours) linear ramp of alpha; 0 = off
        c.dsink.epsilon = float(args["epsilon"])  # stated: 2
        c.dsink.num_iters = int(args["num_iters"])  # (ours) fixed Sinkhorn iterations
        c.dsink.backend = "native"  # "native" (lax.scan) or "ott" (ott-jax Sinkhorn)
        # (ours) granularity of Q: "batch" (Sinkhorn per mini-batch), "dataset" (Sinkhorn over
        # all N samples every refresh_every_epochs, the stated Q 1_N = sum_i f_L(x_i)) or
        # "online" (closed form with the class potential carried in the state).
        c.dsink.allocation = args["allocation"]
        c.dsink.refresh_every_epochs = 1  # (ours) "dataset": epochs between solves
        c.dsink.potential_learning_rate = 0.1  # (ours) "online": dual-ascent step size
        # (ours) "batch" allocation only: f_L's class mass per batch ("batch") or over the
        # training set ("global"); the dataset-level allocations always use the latter.
        c.dsink.class_mass = args["class_mass"]
        # (ours) L_base: "ce" on the given labels, "la" logit-adjusted CE (tau
        # loss_options.la_tau, the given-label prior), "none" to drop it.
        c.dsink.base_loss = args["base_loss"]
        # (ours, not in the paper) train the student on logits + tau * log prior; 0 = off.
        c.dsink.student_logit_adjustment = 0.0
        # (ours) "scratch" or "imbalance_teacher": start the student from f_L's weights.
        c.dsink.init_from = args["init_from"]
        # (ours) test-time logits: "raw", or minus the log of an estimated prior:
        # "label_prior" (given labels) or "class_mass" (f_L's mass over the training set).
        c.dsink.inference = "raw"
        c.dsink.stage_name = "student"  # the student's directory in the workdir
    return c


def validate_dsink_config(config: ml_collections.ConfigDict) -> None:
    """Checks the `dsink` section (after :func:`validate_config`)."""
    from dsink_jax.train.objectives import CLASS_MASS_MODES, LOSS_NAMES

    from dsink_jax.dsink import BASE_LOSSES
    from dsink_jax.train.objectives import ALLOCATIONS

    d = config.dsink
    _require(d.baseline_loss in LOSS_NAMES + ("none",),
             f"dsink.baseline_loss={d.baseline_loss!r}; allowed: {', '.join(LOSS_NAMES)}, none")
    for field in ("imbalance_loss", "noise_loss"):
        _require(d[field] in LOSS_NAMES,
                 f"dsink.{field}={d[field]!r}; allowed: {', '.join(LOSS_NAMES)}")
    _require(d.alpha >= 0, f"dsink.alpha={d.alpha} must be >= 0")
    _require(d.alpha_warmup_epochs >= 0,
             f"dsink.alpha_warmup_epochs={d.alpha_warmup_epochs} must be >= 0")
    from dsink_jax.ot.sinkhorn import MIN_EPSILON
    _require(d.epsilon >= MIN_EPSILON,
             f"dsink.epsilon={d.epsilon} must be >= {MIN_EPSILON} (the paper uses 2)")
    _require(d.student_logit_adjustment >= 0,
             f"dsink.student_logit_adjustment={d.student_logit_adjustment} must be >= 0")
    _require(d.num_iters >= 1, f"dsink.num_iters={d.num_iters} must be >= 1")
    _require(d.backend in ("native", "ott"), f"dsink.backend={d.backend!r}; allowed: native, ott")
    _require(d.class_mass in CLASS_MASS_MODES,
             f"dsink.class_mass={d.class_mass!r}; allowed: {', '.join(CLASS_MASS_MODES)}")
    _require(d.base_loss in BASE_LOSSES,
             f"dsink.base_loss={d.base_loss!r}; allowed: {', '.join(BASE_LOSSES)}")
    _require(d.allocation in ALLOCATIONS,
             f"dsink.allocation={d.allocation!r}; allowed: {', '.join(ALLOCATIONS)}")
    _require(d.refresh_every_epochs >= 1,
             f"dsink.refresh_every_epochs={d.refresh_every_epochs} must be >= 1")
    _require(0 < d.potential_learning_rate <= 1,
             f"dsink.potential_learning_rate={d.potential_learning_rate} must be in (0, 1]")
    _require(d.init_from in INIT_FROM, f"dsink.init_from={d.init_from!r}; allowed: "
             f"{', '.join(INIT_FROM)}")
    if d.init_from == "imbalance_teacher":
        from dsink_jax.train.objectives import LOSS_HEADS
        _require(LOSS_HEADS.get(d.imbalance_loss, "linear") == "linear",
                 f"dsink.init_from=imbalance_teacher needs an f_L with the student's linear "
                 f"head; dsink.imbalance_loss={d.imbalance_loss!r} has a cosine head (allowed: "
                 f"any loss but ldam_drw)")
    _require(d.inference in INFERENCE_MODES,
             f"dsink.inference={d.inference!r}; allowed: {', '.join(INFERENCE_MODES)}")
    _require(d.inference != "class_mass" or d.allocation != "batch" or d.class_mass == "global",
             "dsink.inference=class_mass needs the training-set class mass: dsink.allocation="
             "dataset or online, or dsink.class_mass=global")
    _require(bool(d.stage_name) and d.stage_name == os.path.basename(d.stage_name)
             and d.stage_name not in LOSS_NAMES + ("plots",),
             f"dsink.stage_name={d.stage_name!r} must be a plain directory name other than a "
             f"loss name or 'plots'")


# --------------------------------------------------------------------------- OT-softmax family

OT_SOFTMAX_ARGS: dict[str, Any] = {
    **COMMON_ARGS,
    "noise": "none",
    "noise_rate": 0.0,
    "inference": "raw",
    "train_target": "prior",
}


def build_ot_softmax_config(args: dict[str, Any]) -> ml_collections.ConfigDict:
    """The `ot_softmax` family: CE, LA and Balanced Softmax references, then OT-dynamic softmax.

    Every field of `config.ot_softmax` is our reconstruction (METHOD.md §2): the paper states the
    power-diagram view, the dynamic OT softmax and SupCon, not these values.
    """
    c = build_config("ot_softmax", {k: args[k] for k in COMMON_ARGS})
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


def validate_ot_softmax_config(config: ml_collections.ConfigDict) -> None:
    from dsink_jax.train.objectives import LOSS_NAMES

    o = config.ot_softmax
    for loss in o.references:
        _require(loss in LOSS_NAMES,
                 f"ot_softmax.references has {loss!r}; allowed: {', '.join(LOSS_NAMES)}")
    _require(o.scale > 0, f"ot_softmax.scale={o.scale} must be > 0")
    _require(o.temperature > 0, f"ot_softmax.temperature={o.temperature} must be > 0")
    _require(o.supcon_weight >= 0, f"ot_softmax.supcon_weight={o.supcon_weight} must be >= 0")
    _require(o.projection_dim >= 1, f"ot_softmax.projection_dim={o.projection_dim} must be >= 1")
    _require(o.solve_every >= 1, f"ot_softmax.solve_every={o.solve_every} must be >= 1")
    _require(o.solve_steps >= 1, f"ot_softmax.solve_steps={o.solve_steps} must be >= 1")
    _require(o.num_samples >= 1, f"ot_softmax.num_samples={o.num_samples} must be >= 1")
    _require(o.solver_learning_rate > 0,
             f"ot_softmax.solver_learning_rate={o.solver_learning_rate} must be > 0")
    _require(o.entropic_epsilon >= 0,
             f"ot_softmax.entropic_epsilon={o.entropic_epsilon} must be >= 0")
    _require(o.train_target in ("prior", "uniform"),
             f"ot_softmax.train_target={o.train_target!r}; allowed: prior, uniform")
    _require(o.inference in ("raw", "balanced"),
             f"ot_softmax.inference={o.inference!r}; allowed: raw, balanced")
