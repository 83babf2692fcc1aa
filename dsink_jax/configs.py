"""Experiment configuration: the shared builder, presets and argument parsing of every family.

Configs are code (ml-collections), in the style of big_vision: a family's file under
`experiments/configs/` calls its pipeline's `build_config` (`dsink_jax.pipelines.<family>`), which
starts from :func:`build_config` here, with the `:key=value` arguments of the command line, e.g.
``--config=experiments/configs/baseline.py:dataset=digits,noise=sym,noise_rate=0.2``.
`--config.x=y` then overrides any field; the returned ConfigDict is locked, so a typo fails loudly.

Presets (the `preset` argument):

* ``paper``: the LDAM-DRW / RoLT protocol: ResNet-32, 200 epochs, batch 128, SGD lr 0.1,
  momentum 0.9, weight decay 2e-4, 5 warm-up epochs, lr x0.01 at epoch 160 and x0.0001 at 180,
  random crop (pad 4) and flip.
* ``cpu``: a reduced protocol (ResNet-8, 30 epochs, cosine, bfloat16 compute) whose every stage
  takes 8-12 minutes on 2 CPU cores for CIFAR-10-LT at ratio 100 (see :data:`PRESETS` for the
  measured figures); on `digits` it is the README's main job (about a minute).
* ``cpu_long``: the same for 100 epochs, evaluated every 5. Meant to make CE memorise the label
  noise; measured, ResNet-8 does not (CIFAR-10-LT ratio 100, sym 0.4: CE's test accuracy still
  rises at epoch 100, its training loss 1.54).
* ``cpu_memorise``: the ``cpu`` preset without augmentation (no crop, no flip), 40 epochs,
  evaluated every 2: CE fits the noisy labels (CIFAR-10-LT ratio 100, sym 0.4: 94 % of the
  given labels at epoch 40, where ``cpu`` ends at 48 %) and its test accuracy peaks early, then
  drops, so the noise teacher has to be robust.
  In-memory datasets only (a streaming source augments on the host).
* ``smoke``: seconds; for tests and for checking a set-up.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import ml_collections

from dsink_jax.data import BAD_IMAGE_POLICIES, LONG_TAIL_PROFILES, NOISE_KINDS, is_streaming_spec
from dsink_jax.models import DTYPES, MODEL_NAMES
from dsink_jax.train.objectives import LOSS_NAMES
from dsink_jax.train.optim import SCHEDULES

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


# Dataset names accepted by `dataset=`; `npz:PATH`, `tfds:NAME` and `filelist:DIR` are accepted
# as well. The last three are read as streams (grain), the others held in memory.
DATASET_ALIASES = {
    "digits": "digits",
    "cifar10": "tfds:cifar10",
    "cifar100": "tfds:cifar100",
    "cifar10_n": "tfds:cifar10_n",
    "cifar100_n": "tfds:cifar100_n",
    "imagenet_lt": "tfds:imagenet_lt",
    "inaturalist2018": "tfds:i_naturalist2018",
    "places365": "tfds:places365_small",
}

# Per-preset training protocol. `digits` overrides apply when the data is the 8x8 digits set.
PRESETS: dict[str, dict[str, Any]] = {
    "paper": dict(
        model="resnet32", width=1.0, dtype="float32", epochs=200, batch_size=128, learning_rate=0.1,
        momentum=0.9, weight_decay=2e-4, schedule="step", warmup_epochs=5,
        lr_drop_fractions=(0.8, 0.9), lr_drop_factors=(0.01, 0.0001), eval_every_epochs=10,
        checkpoint_every_epochs=10, augment=True,
    ),
    # Sized for 2 CPU cores: resnet8 (width 1) trains at 650-800 images/s on 2 idle cores, so
    # 30 epochs of CIFAR-10-LT ratio 100 (12,406 images) take 8-10 minutes a stage and a whole
    # D-SINK pipeline (3-4 stages) about 40 minutes. CE on clean ratio 100 reaches 49.4 % here
    # (8 epochs gave 35.3 %; ResNet-32 at the paper preset's 200 epochs is published at ~70 %).
    # bfloat16 compute (float32 parameters and optimizer state): r100 sym 0.4, seeds 0 and 1,
    # CE / f_L / student 36.1 / 41.2 / 42.3 % against 35.9 / 41.0 / 42.1 % in float32
    # (benchmarks/results/); 1.06-1.09x the float32 step on the 2-core AMD EPYC.
    "cpu": dict(
        model="resnet8", width=1.0, dtype="bfloat16", epochs=30, batch_size=128, learning_rate=0.1,
        momentum=0.9, weight_decay=5e-4, schedule="cosine", warmup_epochs=1,
        lr_drop_fractions=(0.8, 0.9), lr_drop_factors=(0.01, 0.0001), eval_every_epochs=10,
        checkpoint_every_epochs=5, augment=True,
    ),
    "smoke": dict(
        model="cnn", width=0.25, dtype="float32", epochs=2, batch_size=64, learning_rate=0.05,
        momentum=0.9, weight_decay=5e-4, schedule="cosine", warmup_epochs=0,
        lr_drop_fractions=(0.8, 0.9), lr_drop_factors=(0.01, 0.0001), eval_every_epochs=1,
        checkpoint_every_epochs=1, augment=True,
    ),
}

PRESETS["cpu_long"] = dict(PRESETS["cpu"], epochs=100, eval_every_epochs=5)
# Measured (r100 sym 0.4, seed 0): CE's test accuracy peaks at 30.6 % (epoch 18) and ends at
# 24.6 %, its training loss 0.31 (94 % of the given labels fitted) and its label-correction rate
# 3.8 % (74.5 % under `cpu`): it has memorised the noise (README, "Measured").
PRESETS["cpu_memorise"] = dict(PRESETS["cpu"], epochs=40, eval_every_epochs=2, augment=False)

# On the 8x8 digits the small models train in seconds; these replace the preset's values
# (float32: bfloat16 was measured only on the CIFAR ResNets).
DIGITS_OVERRIDES: dict[str, dict[str, Any]] = {
    "paper": dict(model="cnn", width=1.0, batch_size=64),
    "cpu": dict(model="mlp", width=1.0, dtype="float32", epochs=100, batch_size=64,
                learning_rate=0.05, eval_every_epochs=20, checkpoint_every_epochs=20),
    "cpu_long": dict(model="mlp", width=1.0, dtype="float32", epochs=300, batch_size=64,
                     learning_rate=0.05, eval_every_epochs=20, checkpoint_every_epochs=20),
    "smoke": dict(model="mlp", width=0.5, epochs=2, batch_size=64),
}
DIGITS_OVERRIDES["cpu_memorise"] = dict(DIGITS_OVERRIDES["cpu"], augment=False)

# Large streaming sources (ImageNet-LT, iNaturalist 2018, Places-LT, file lists): the protocols of
# the long-tail literature. `paper`: ResNeXt-50 32x4d on ImageNet-LT and ResNet-50 on the others
# (BCL, Zhu et al. 2022; decoupling, Kang et al. 2020): SGD momentum 0.9, cosine, 5 warm-up
# epochs, 224 x 224 random resized crops + flips; ImageNet-LT and file lists batch 256, lr 0.1,
# wd 5e-4, 90 epochs; iNaturalist batch 512, lr 0.2, wd 1e-4, 100 epochs. Places-LT is usually
# fine-tuned from an ImageNet-pretrained ResNet-152, which this library does not ship: here
# ResNet-50 from scratch, 90 epochs. `smoke` (a folder of small JPEGs in about a minute on a CPU)
# and `cpu` use the tiny ResNet-50 at small image sizes.
_LARGE = dict(width=1.0, dtype="float32", momentum=0.9, schedule="cosine", warmup_epochs=5, eval_every_epochs=10,
              checkpoint_every_epochs=1, checkpoint_every_steps=1000, image_size=224, workers=-1)
STREAMING_OVERRIDES: dict[str, dict[str, dict[str, Any]]] = {
    "paper": {
        "default": dict(_LARGE, model="resnet50", epochs=90, batch_size=256, learning_rate=0.1,
                        weight_decay=5e-4),
        "imagenet_lt": dict(_LARGE, model="resnext50_32x4d", epochs=90, batch_size=256,
                            learning_rate=0.1, weight_decay=5e-4),
        "i_naturalist2018": dict(_LARGE, model="resnet50", epochs=100, batch_size=512,
                                learning_rate=0.2, weight_decay=1e-4),
    },
    "cpu": {"default": dict(_LARGE, model="resnet50_tiny", epochs=10, batch_size=64,
                            learning_rate=0.1, weight_decay=5e-4, warmup_epochs=1,
                            eval_every_epochs=5, checkpoint_every_steps=200, image_size=64)},
    "cpu_long": {"default": dict(_LARGE, model="resnet50_tiny", epochs=30, batch_size=64,
                                 learning_rate=0.1, weight_decay=5e-4, warmup_epochs=1,
                                 eval_every_epochs=5, checkpoint_every_steps=200,
                                 image_size=64)},
    "smoke": {"default": dict(_LARGE, model="resnet50_tiny", epochs=2, batch_size=16,
                              learning_rate=0.05, weight_decay=5e-4, warmup_epochs=0,
                              eval_every_epochs=1, checkpoint_every_steps=0, image_size=32,
                              workers=0)},
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
    # (ours) select_la, class-balanced small-loss selection: the fraction of each given class
    # kept, the fraction of the epochs trained on every sample first, the running loss's
    # weight on its old value
    select_keep=0.5,
    select_start_fraction=0.25,
    select_beta=0.5,
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
    """Maps a `dataset=` value to a source spec (`digits`, `npz:PATH`, `tfds:NAME`,
    `filelist:DIR`)."""
    if dataset in DATASET_ALIASES:
        return DATASET_ALIASES[dataset]
    if dataset.startswith(("npz:", "tfds:", "filelist:")) and dataset.partition(":")[2]:
        return dataset
    raise ConfigError(
        f"unknown dataset {dataset!r}; allowed: {', '.join(DATASET_ALIASES)}, npz:PATH, "
        "tfds:NAME, filelist:DIR")


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
        raise ConfigError(f"unknown preset {preset!r}; allowed: {', '.join(PRESETS)}")
    spec = dataset_spec(args["dataset"])
    protocol = copy.deepcopy(PRESETS[preset])
    protocol.update(checkpoint_every_steps=0, image_size=0, workers=0)
    is_digits = spec == "digits"
    streamed = is_streaming_spec(spec)
    if is_digits:
        protocol.update(DIGITS_OVERRIDES[preset])
    if streamed:
        if preset not in STREAMING_OVERRIDES:
            raise ConfigError(
                f"preset {preset!r} is for in-memory datasets (a streaming source augments on "
                f"the host); for {spec!r} use one of: {', '.join(STREAMING_OVERRIDES)}")
        overrides = STREAMING_OVERRIDES[preset]
        name = spec.partition(":")[2] if spec.startswith("tfds:") else "default"
        protocol.update(overrides.get(name, overrides["default"]))

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
    # In-step augmentation of in-memory images (a streaming source crops and flips on the host).
    augment = bool(protocol["augment"])
    c.data.crop_padding = 0 if streamed or not augment else 1 if is_digits else 4
    c.data.flip = augment and not (is_digits or streamed)  # flipping a digit changes what it is
    c.data.many_shot_threshold = 100  # many-shot: more than this many training images
    c.data.few_shot_threshold = 20  # few-shot: fewer than this many

    c.model = ml_collections.ConfigDict()
    c.model.name = args["model"] or protocol["model"]
    c.model.width = float(protocol["width"])
    c.model.dtype = protocol["dtype"]  # compute dtype; parameters stay float32

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

    # Streaming sources (see `dsink_jax.data.streaming`): the host-side input pipeline.
    c.input = ml_collections.ConfigDict()
    c.input.image_size = int(protocol["image_size"])  # square training and evaluation images
    c.input.workers = int(protocol["workers"])  # grain worker processes; -1 = CPUs - 1, <= 16
    c.input.bad_images = "error"  # "error": fail naming the file; "skip": check all, count

    c.eval_every_epochs = int(protocol["eval_every_epochs"])
    c.checkpoint_every_epochs = int(protocol["checkpoint_every_epochs"])
    # Also save every this many optimizer steps, inside epochs (0 = at epoch ends only); a
    # resumed run continues from that step, with the data stream where it was.
    c.checkpoint_every_steps = int(protocol["checkpoint_every_steps"])
    c.keep_checkpoints = 2
    c.eval_batch_size = 512
    c.progress = True  # tqdm progress bar
    c.num_devices = 0  # data-parallel devices; 0 = all devices (of all processes)
    # Multi-host: call jax.distributed.initialize() first (Slurm / TPU pods detect their peers;
    # elsewhere set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID).
    c.distributed = False
    c.lock()  # a typo in `--config.x=y` or in code fails loudly
    return c


def require(ok: bool, message: str) -> None:
    """Raises ConfigError(message) unless `ok` (the validators' one check)."""
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
    _require_all_finite(config.to_dict())
    require(isinstance(config.seed, int) and 0 <= config.seed < 2**32,
             f"seed={config.seed!r} must be an integer in [0, 2**32)")
    dataset_spec(config.data.dataset)
    require(config.data.imbalance >= 1.0,
             f"data.imbalance={config.data.imbalance} must be >= 1 (n_max / n_min; 1 = balanced)")
    require(config.data.profile in LONG_TAIL_PROFILES,
             f"data.profile={config.data.profile!r}; allowed: {', '.join(LONG_TAIL_PROFILES)}")
    require(config.data.noise in NOISE_KINDS,
             f"data.noise={config.data.noise!r}; allowed: {', '.join(NOISE_KINDS)}")
    require(0.0 <= config.data.noise_rate < 1.0,
             f"data.noise_rate={config.data.noise_rate} must be in [0, 1)")
    require(config.data.crop_padding >= 0,
             f"data.crop_padding={config.data.crop_padding} must be >= 0")
    require(config.model.name in MODEL_NAMES,
             f"model.name={config.model.name!r}; allowed: {', '.join(MODEL_NAMES)}")
    require(config.model.width > 0, f"model.width={config.model.width} must be > 0")
    require(config.model.dtype in DTYPES,
             f"model.dtype={config.model.dtype!r}; allowed: {', '.join(DTYPES)}")
    require(config.loss in LOSS_NAMES,
             f"loss={config.loss!r}; allowed: {', '.join(LOSS_NAMES)}")
    lo = config.loss_options
    require(lo.la_tau >= 0, f"loss_options.la_tau={lo.la_tau} must be >= 0")
    require(0 < lo.gce_q <= 1, f"loss_options.gce_q={lo.gce_q} must be in (0, 1]")
    require(lo.sce_alpha >= 0, f"loss_options.sce_alpha={lo.sce_alpha} must be >= 0")
    require(lo.sce_beta >= 0, f"loss_options.sce_beta={lo.sce_beta} must be >= 0")
    require(lo.elr_lambda >= 0, f"loss_options.elr_lambda={lo.elr_lambda} must be >= 0")
    require(0 <= lo.elr_beta < 1, f"loss_options.elr_beta={lo.elr_beta} must be in [0, 1)")
    require(lo.ldam_max_margin > 0,
             f"loss_options.ldam_max_margin={lo.ldam_max_margin} must be > 0")
    require(lo.ldam_scale > 0, f"loss_options.ldam_scale={lo.ldam_scale} must be > 0")
    require(0 < lo.select_keep <= 1,
            f"loss_options.select_keep={lo.select_keep} must be in (0, 1]")
    require(0 <= lo.select_start_fraction <= 1,
            f"loss_options.select_start_fraction={lo.select_start_fraction} must be in [0, 1]")
    require(0 <= lo.select_beta < 1,
            f"loss_options.select_beta={lo.select_beta} must be in [0, 1)")
    require(0 <= lo.drw_beta < 1, f"loss_options.drw_beta={lo.drw_beta} must be in [0, 1)")
    require(0 <= lo.drw_start_fraction <= 1,
             f"loss_options.drw_start_fraction={lo.drw_start_fraction} must be in [0, 1]")
    o = config.optim
    require(o.epochs >= 1, f"optim.epochs={o.epochs} must be >= 1")
    require(o.batch_size >= 1, f"optim.batch_size={o.batch_size} must be >= 1")
    require(o.learning_rate > 0, f"optim.learning_rate={o.learning_rate} must be > 0")
    require(0 <= o.momentum < 1, f"optim.momentum={o.momentum} must be in [0, 1)")
    require(o.weight_decay >= 0, f"optim.weight_decay={o.weight_decay} must be >= 0")
    require(o.schedule in SCHEDULES,
             f"optim.schedule={o.schedule!r}; allowed: {', '.join(SCHEDULES)}")
    require(o.warmup_epochs >= 0, f"optim.warmup_epochs={o.warmup_epochs} must be >= 0")
    require(len(o.lr_drop_fractions) == len(o.lr_drop_factors),
             "optim.lr_drop_fractions and optim.lr_drop_factors must have the same length")
    require(config.eval_every_epochs >= 1,
             f"eval_every_epochs={config.eval_every_epochs} must be >= 1")
    require(config.checkpoint_every_epochs >= 1,
             f"checkpoint_every_epochs={config.checkpoint_every_epochs} must be >= 1")
    require(config.checkpoint_every_steps >= 0,
             f"checkpoint_every_steps={config.checkpoint_every_steps} must be >= 0 (0 = off)")
    i = config.input
    if is_streaming_spec(dataset_spec(config.data.dataset)):
        require(i.image_size >= 8, f"input.image_size={i.image_size} must be >= 8")
    require(i.workers >= -1, f"input.workers={i.workers} must be >= -1 (-1 = CPUs - 1)")
    require(i.bad_images in BAD_IMAGE_POLICIES,
            f"input.bad_images={i.bad_images!r}; allowed: {', '.join(BAD_IMAGE_POLICIES)}")
    require(config.keep_checkpoints >= 1,
             f"keep_checkpoints={config.keep_checkpoints} must be >= 1")
    require(config.eval_batch_size >= 1,
             f"eval_batch_size={config.eval_batch_size} must be >= 1")
    require(config.num_devices >= 0,
             f"num_devices={config.num_devices} must be >= 0 (0 = all devices)")
    d = config.data
    require(0 <= d.few_shot_threshold <= d.many_shot_threshold,
             f"data.few_shot_threshold={d.few_shot_threshold} and data.many_shot_threshold="
             f"{d.many_shot_threshold} must satisfy 0 <= few <= many")
