"""Train-step throughput: the dsink_jax step (JAX) against the same step in PyTorch.

Usage (from the repository root; PyTorch is an optional benchmark dependency,
``pip install torch==2.13.0`` gives a CPU build)::

    python benchmarks/throughput.py --model resnet32 --batch-size 128 --repeats 5 \\
        --steps-per-repeat 5 --json /tmp/throughput.json

Measures images/sec of one optimizer step (augmentation, forward, backward, SGD update) of
ResNet-32 at batch 128, for each requested JAX variant and for a PyTorch implementation of the
same model and step, side by side in one process. Each repeat times `--steps-per-repeat` steps of
every variant in turn (A B C ... A B C ...), so machine noise hits all of them alike; the table
gives the median over repeats, the spread (min-max) and each JAX variant's ratio to PyTorch.

JAX variants (`--variants`, comma separated; default all):

* ``fp32``: the step exactly as training builds it,
  ``jax.jit(functools.partial(train_step, method=method), donate_argnums=0)``, on one CPU device.
* ``dp2``: data parallel over 2 forced host devices (one per core): a 1-D mesh with a "data"
  axis, the batch sharded ``P("data")``, the state replicated; the same sharded code path as on
  several GPUs. BatchNorm statistics stay global-batch statistics (XLA inserts the all-reduce).
* ``bf16``: the model in bfloat16 (parameters, features and logits stay float32).
* ``dp2+bf16``: both.

A ``dp`` variant needs ``--xla_force_host_platform_device_count=2`` in ``XLA_FLAGS`` before jax
is imported; the script then sets it for the whole run and the single-device variants use
device 0 alone (measured: no slowdown beyond noise; see benchmarks/README.md).
``--xla-flags`` appends further XLA flags, for experiments.

``--platform gpu`` runs both sides on the first CUDA device instead of the CPU (JAX with
``JAX_PLATFORMS=cuda`` and no memory preallocation, so that PyTorch shares the device; PyTorch
with ``cuda`` tensors, synchronised before every timer reads); ``--torch-compile`` adds a row of
the PyTorch model wrapped in ``torch.compile`` (the augmentation and optimizer stay eager).

Expected on the shared 2-core CPU of the development machines (2026-11-22; benchmarks/README.md
has the table): about 10 minutes; every JAX variant at 0.3-0.45x PyTorch for ResNet-32 (bf16 the
best), because XLA:CPU's convolution weight gradients are slow (Eigen, about one core).
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

# Runnable without installing the package: `python benchmarks/throughput.py`.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MODELS = ("resnet32", "resnet8", "preact_resnet18")
JAX_VARIANTS = ("fp32", "dp2", "bf16", "dp2+bf16")
DATA_PARALLEL_DEVICES = 2
TORCH_NAME = "torch"
TORCH_COMPILE_NAME = "torch.compile"
PLATFORMS = ("cpu", "gpu")

# The LDAM-DRW / RoLT protocol the step is built with (lr 0.1, momentum 0.9, wd 2e-4).
LEARNING_RATE, MOMENTUM, WEIGHT_DECAY = 0.1, 0.9, 2e-4
NUM_CLASSES = 10
# CIFAR-10 channel statistics on the [0, 1] scale (normalisation inside the step).
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
IMAGE_SHAPE = (32, 32, 3)


def parse_args(argv=None) -> argparse.Namespace:
    """Parses and checks the command line (ValueError before any work on a bad value)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet32", help=f"one of {', '.join(MODELS)}")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per variant")
    parser.add_argument("--steps-per-repeat", type=int, default=5, help="steps timed per repeat")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps after compiling")
    parser.add_argument("--variants", default=",".join(JAX_VARIANTS),
                        help=f"comma list of JAX variants among {', '.join(JAX_VARIANTS)}; "
                             "'none' for PyTorch alone")
    parser.add_argument("--skip-torch", action="store_true", help="JAX variants only")
    parser.add_argument("--torch-channels-last", action=argparse.BooleanOptionalAction,
                        default=True, help="PyTorch in channels_last memory format (its faster "
                                           "layout on this CPU); --no-torch-channels-last: NCHW")
    parser.add_argument("--torch-threads", default="2",
                        help="torch.set_num_threads; a comma list (e.g. 2,1) times one PyTorch row "
                             "per value, the first being the reference of the ratio column")
    parser.add_argument("--torch-omp-wait-policy", default="passive",
                        choices=("passive", "active", "unset"),
                        help="OMP_WAIT_POLICY for PyTorch's OpenMP threads, set before torch is "
                             "imported (unless already in the environment); 'unset' leaves "
                             "libgomp's spin-then-sleep default")
    parser.add_argument("--xla-flags", default="", help="extra XLA flags, appended to XLA_FLAGS")
    parser.add_argument("--force-host-devices", type=int, default=0,
                        help="force this many host devices even without a dp variant (0: as the "
                             "variants need), to measure the single-device path under forcing")
    parser.add_argument("--platform", default="cpu", choices=PLATFORMS,
                        help="where both sides run: the CPU, or the first CUDA device")
    parser.add_argument("--torch-compile", action="store_true",
                        help="also time the PyTorch model under torch.compile")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the table here")
    args = parser.parse_args(argv)
    check_args(args)
    return args


def check_args(args: argparse.Namespace) -> None:
    """Raises ValueError naming the bad option and the allowed values."""
    if args.model not in MODELS:
        raise ValueError(f"--model must be one of {MODELS}, got {args.model!r}.")
    for name in ("batch_size", "repeats", "steps_per_repeat"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}.")
    for name in ("warmup", "force_host_devices"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}.")
    args.variant_list = parse_variants(args.variants)
    try:
        args.torch_thread_list = [int(t) for t in str(args.torch_threads).split(",")]
    except ValueError:
        args.torch_thread_list = []
    if not args.torch_thread_list or min(args.torch_thread_list) < 1 or (
            len(set(args.torch_thread_list)) != len(args.torch_thread_list)):
        raise ValueError(f"--torch-threads must be distinct ints >= 1, comma separated, got "
                         f"{args.torch_threads!r}.")
    if not args.variant_list and args.skip_torch:
        raise ValueError("nothing to measure: --variants none together with --skip-torch.")
    if any(uses_data_parallel(v) for v in args.variant_list) and args.batch_size % DATA_PARALLEL_DEVICES:
        raise ValueError(f"--batch-size must be a multiple of {DATA_PARALLEL_DEVICES} for the dp "
                         f"variants, got {args.batch_size}.")


def parse_variants(text: str) -> list[str]:
    """`"fp32,dp2"` -> ["fp32", "dp2"]; "none" or "" -> []; ValueError on an unknown name."""
    names = [v.strip() for v in text.split(",") if v.strip() and v.strip() != "none"]
    unknown = [v for v in names if v not in JAX_VARIANTS]
    if unknown:
        raise ValueError(f"--variants: unknown {unknown}; allowed: {', '.join(JAX_VARIANTS)}.")
    if len(set(names)) != len(names):
        raise ValueError(f"--variants lists a variant twice: {names}.")
    return names


def uses_data_parallel(variant: str) -> bool:
    return variant.startswith("dp")


def uses_bfloat16(variant: str) -> bool:
    return variant.endswith("bf16")


def configure_xla(args: argparse.Namespace) -> str:
    """Sets XLA_FLAGS (and the CPU platform) before jax is first imported; returns the flags."""
    if "jax" in sys.modules:
        raise RuntimeError("jax was imported before the XLA flags were set; run as a script.")
    devices = args.force_host_devices
    if any(uses_data_parallel(v) for v in args.variant_list):
        devices = max(devices, DATA_PARALLEL_DEVICES)
    flags = [os.environ.get("XLA_FLAGS", ""), args.xla_flags]
    if devices > 1:
        flags.append(f"--xla_force_host_platform_device_count={devices}")
    os.environ["XLA_FLAGS"] = " ".join(f for f in flags if f).strip()
    os.environ.setdefault("JAX_PLATFORMS", "cuda" if args.platform == "gpu" else "cpu")
    if args.platform == "gpu":  # PyTorch allocates on the same device
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    return os.environ["XLA_FLAGS"]


def configure_openmp(args: argparse.Namespace) -> str:
    """Sets OMP_WAIT_POLICY before torch is imported (libgomp reads it once); returns it.

    Why: on a shared, oversubscribed CPU, libgomp's default spinning at every barrier makes
    2-thread PyTorch about 5x slower than 1-thread PyTorch (measured on ResNet-8: ~55 against
    ~300 images/sec); PASSIVE (idle threads sleep) puts it back at its best, so the ratio to
    PyTorch is not flattered by a PyTorch misconfiguration.
    """
    if "torch" in sys.modules:
        raise RuntimeError("torch was imported before OMP_WAIT_POLICY was set; run as a script.")
    if args.torch_omp_wait_policy != "unset":
        os.environ.setdefault("OMP_WAIT_POLICY", args.torch_omp_wait_policy.upper())
    return os.environ.get("OMP_WAIT_POLICY", "unset")


def random_batch(seed: int, batch_size: int) -> dict[str, np.ndarray]:
    """A synthetic CIFAR-shaped batch: uint8 [B, 32, 32, 3] images, int32 [B] labels/indices."""
    rng = np.random.default_rng(seed)
    return {
        "images": rng.integers(0, 256, (batch_size,) + IMAGE_SHAPE, dtype=np.uint8),
        "labels": rng.integers(0, NUM_CLASSES, (batch_size,), dtype=np.int32),
        "indices": np.arange(batch_size, dtype=np.int32),
    }


# ----------------------------------------------------------------------------------------------
# JAX: the library's own train step.


def build_jax_variant(variant: str, args: argparse.Namespace, batch: dict[str, np.ndarray]
                      ) -> tuple[Callable[[], Any], int]:
    """Compiles one JAX variant; returns (run_steps(n) -> blocks until done, parameter count)."""
    import jax  # pylint: disable=import-outside-toplevel  (XLA_FLAGS must be set first)
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
    import ml_collections  # pylint: disable=import-outside-toplevel
    from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=import-outside-toplevel

    from dsink_jax import configs  # pylint: disable=import-outside-toplevel
    from dsink_jax.models import count_params, get_model  # pylint: disable=import-outside-toplevel
    from dsink_jax.train import objectives, optim, step as step_lib  # pylint: disable=import-outside-toplevel

    # The paper protocol on CIFAR-10-LT ratio 100 (12,406 images): 96 steps per epoch, 200 epochs.
    steps_per_epoch, epochs = 12406 // 128, 200
    model = get_model(args.model, num_classes=NUM_CLASSES, width=1.0,
                      dtype=jnp.bfloat16 if uses_bfloat16(variant) else jnp.float32)
    multiplier = optim.lr_multiplier("step", total_steps=steps_per_epoch * epochs,
                                     warmup_steps=5 * steps_per_epoch,
                                     drop_steps=(160 * steps_per_epoch, 180 * steps_per_epoch),
                                     drop_factors=(0.01, 0.0001))
    tx = optim.sgd(learning_rate=LEARNING_RATE, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY,
                   multiplier=multiplier)
    objective = objectives.make_objective(
        "ce", ml_collections.ConfigDict(configs.LOSS_DEFAULTS),
        class_counts=np.full(NUM_CLASSES, 100), num_train=12406,
        steps_per_epoch=steps_per_epoch, epochs=epochs)
    method = step_lib.Method(model=model, tx=tx, objective=objective,
                             augment=step_lib.Augment(mean=CIFAR_MEAN, std=CIFAR_STD))
    state = step_lib.init_state(method, jax.random.PRNGKey(args.seed), batch["images"])
    num_params = count_params(state.params)
    step_fn = functools.partial(step_lib.train_step, method=method)
    if uses_data_parallel(variant):
        devices = jax.devices()[:DATA_PARALLEL_DEVICES]
        if len(devices) < DATA_PARALLEL_DEVICES:
            raise RuntimeError(f"{variant} needs {DATA_PARALLEL_DEVICES} devices, found {devices}.")
        mesh = jax.sharding.Mesh(np.asarray(devices), ("data",))
        replicated = NamedSharding(mesh, P())
        batch_sharding = NamedSharding(mesh, P("data"))
        state = jax.device_put(state, replicated)
        device_batch = jax.device_put(batch, batch_sharding)
        # Metrics are scalars: replicated too, so reading them never gathers across devices.
        jitted = jax.jit(step_fn, in_shardings=(replicated, batch_sharding),
                         out_shardings=(replicated, replicated), donate_argnums=0)
    else:
        device = jax.devices()[0]
        state = jax.device_put(state, device)
        device_batch = jax.device_put(batch, device)
        # Exactly as training builds it (dsink_jax.train.loop).
        jitted = jax.jit(step_fn, donate_argnums=0)

    holder = {"state": state}

    def run_steps(n: int) -> None:
        state, metrics = holder["state"], None
        for _ in range(n):
            state, metrics = jitted(state, device_batch)
        jax.block_until_ready((state, metrics))
        holder["state"] = state

    return run_steps, num_params


# ----------------------------------------------------------------------------------------------
# PyTorch: the same model (option-A ResNet, BN, same widths), SGD, CE and augmentation.


def torch_row_name(threads: int, args: argparse.Namespace) -> str:
    """"torch" for the reference (first) thread count, "torch-1t" etc. for the others."""
    return TORCH_NAME if threads == args.torch_thread_list[0] else f"{TORCH_NAME}-{threads}t"


def build_torch(args: argparse.Namespace, batch: dict[str, np.ndarray], *, threads: int,
                compile_model: bool = False) -> tuple[Callable[[int], None], int]:
    """Builds the PyTorch step; returns (run_steps(n) with `threads` threads, parameter count).

    On `--platform gpu` everything lives on the first CUDA device and `run_steps` waits for the
    device before returning; `compile_model` wraps the model in `torch.compile`.
    """
    import torch  # pylint: disable=import-outside-toplevel  (optional dependency)
    from torch import nn  # pylint: disable=import-outside-toplevel
    import torch.nn.functional as F  # pylint: disable=import-outside-toplevel

    torch.manual_seed(args.seed)
    device = torch.device("cuda" if args.platform == "gpu" else "cpu")
    memory_format = torch.channels_last if args.torch_channels_last else torch.contiguous_format

    class BasicBlock(nn.Module):
        """LDAM-DRW's block: conv-BN-ReLU-conv-BN + option-A shortcut, ReLU."""

        def __init__(self, in_planes: int, planes: int, stride: int):
            super().__init__()
            self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(planes)
            self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(planes)
            self.stride, self.extra = stride, planes - in_planes

        def forward(self, x):
            out = F.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            shortcut = x
            if self.stride != 1 or self.extra:
                shortcut = x[:, :, ::self.stride, ::self.stride]
                half = self.extra // 2
                shortcut = F.pad(shortcut, (0, 0, 0, 0, half, self.extra - half))
            return F.relu(out + shortcut)

    class CifarResNet(nn.Module):
        def __init__(self, blocks_per_stage: int):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(16)
            layers, in_planes = [], 16
            for stage, planes in enumerate((16, 32, 64)):
                for block in range(blocks_per_stage):
                    stride = 2 if stage > 0 and block == 0 else 1
                    layers.append(BasicBlock(in_planes, planes, stride))
                    in_planes = planes
            self.layers = nn.Sequential(*layers)
            self.linear = nn.Linear(64, NUM_CLASSES)
            for m in self.modules():  # LDAM-DRW's _weights_init
                if isinstance(m, (nn.Conv2d, nn.Linear)):
                    nn.init.kaiming_normal_(m.weight)

        def forward(self, x):
            out = self.layers(F.relu(self.bn1(self.conv1(x))))
            return self.linear(out.mean(dim=(2, 3)))

    class PreActBlock(nn.Module):
        """DivideMix's block: the shortcut takes the pre-activated input."""

        def __init__(self, in_planes: int, planes: int, stride: int):
            super().__init__()
            self.bn1 = nn.BatchNorm2d(in_planes)
            self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(planes)
            self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
            self.shortcut = None
            if stride != 1 or in_planes != planes:
                self.shortcut = nn.Conv2d(in_planes, planes, 1, stride, bias=False)

        def forward(self, x):
            out = F.relu(self.bn1(x))
            shortcut = out if self.shortcut is None else self.shortcut(out)
            out = self.conv2(F.relu(self.bn2(self.conv1(out))))
            return out + shortcut

    class PreActResNet18(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(64)
            layers, in_planes = [], 64
            for stage, planes in enumerate((64, 128, 256, 512)):
                for block in range(2):
                    layers.append(PreActBlock(in_planes, planes, 2 if stage > 0 and block == 0 else 1))
                    in_planes = planes
            self.layers = nn.Sequential(*layers)
            self.linear = nn.Linear(512, NUM_CLASSES)

        def forward(self, x):
            out = self.layers(F.relu(self.bn1(self.conv1(x))))
            return self.linear(out.mean(dim=(2, 3)))

    if args.model == "preact_resnet18":
        model = PreActResNet18()
    else:
        model = CifarResNet({"resnet8": 1, "resnet32": 5}[args.model])
    model = model.to(device=device, memory_format=memory_format).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE, momentum=MOMENTUM,
                                weight_decay=WEIGHT_DECAY)
    num_params = sum(p.numel() for p in model.parameters())
    if compile_model:
        model = torch.compile(model)

    images = torch.from_numpy(batch["images"]).to(device)  # uint8 [B, H, W, C], as stored
    labels = torch.from_numpy(batch["labels"]).long().to(device)
    mean = torch.tensor(CIFAR_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR_STD, device=device).view(1, 3, 1, 1)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    size, pad = IMAGE_SHAPE[0], 4
    grid = torch.arange(size, device=device)

    def augment(images_u8):
        """Zero-pad 4, random 32x32 crop per image, random flip, normalise: torch ops only."""
        b = images_u8.shape[0]
        x = images_u8.permute(0, 3, 1, 2).float()  # NCHW view
        x = F.pad(x, (pad, pad, pad, pad))
        offsets = torch.randint(0, 2 * pad + 1, (b, 2), generator=generator, device=device)
        rows = (offsets[:, 0:1] + grid)[:, None, :, None]  # [B, 1, 32, 1]
        cols = (offsets[:, 1:2] + grid)[:, None, None, :]  # [B, 1, 1, 32]
        x = x[torch.arange(b, device=device)[:, None, None, None],
              torch.arange(3, device=device)[None, :, None, None], rows, cols]
        flips = torch.rand(b, generator=generator, device=device) < 0.5
        x = torch.where(flips[:, None, None, None], x.flip(3), x)
        x = (x / 255.0 - mean) / std
        return x.contiguous(memory_format=memory_format)

    def run_steps(n: int) -> None:
        # The thread count is process-wide; set per call, as rows with other counts interleave.
        torch.set_num_threads(threads)
        for _ in range(n):
            logits = model(augment(images))
            loss = F.cross_entropy(logits, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            # The JAX step returns these too.
            _ = (logits.detach().argmax(-1) == labels).float().mean()
        if device.type == "cuda":  # the JAX side blocks until ready too
            torch.cuda.synchronize()

    return run_steps, num_params


# ----------------------------------------------------------------------------------------------


def measure(runners: dict[str, Callable[[int], None]], args: argparse.Namespace
            ) -> dict[str, list[float]]:
    """Interleaved timing: repeat r runs every variant in turn; returns images/sec per repeat."""
    for run_steps in runners.values():
        if args.warmup:
            run_steps(args.warmup)
    rates: dict[str, list[float]] = {name: [] for name in runners}
    for repeat in range(args.repeats):
        for name, run_steps in runners.items():
            start = time.perf_counter()
            run_steps(args.steps_per_repeat)
            elapsed = time.perf_counter() - start
            rates[name].append(args.steps_per_repeat * args.batch_size / elapsed)
        print(f"repeat {repeat + 1}/{args.repeats}: "
              + ", ".join(f"{n} {r[-1]:.1f}" for n, r in rates.items()), flush=True)
    return rates


def summarise(rates: dict[str, list[float]], build_s: dict[str, float]) -> list[dict[str, Any]]:
    """One row per variant: median, min and max images/sec, and ratios of medians to PyTorch.

    "ratio_to_torch" is against the reference PyTorch row (the first --torch-threads value),
    "ratio_to_best_torch" against the fastest PyTorch row (the same when there is one).
    """
    torch_medians = {n: statistics.median(v) for n, v in rates.items() if n.startswith(TORCH_NAME)}
    reference = torch_medians.get(TORCH_NAME)
    best = max(torch_medians.values()) if torch_medians else None
    rows = []
    for name, values in rates.items():
        median = statistics.median(values)
        rows.append({
            "variant": name,
            "median_images_per_s": median,
            "min_images_per_s": min(values),
            "max_images_per_s": max(values),
            "ratio_to_torch": None if reference is None else median / reference,
            "ratio_to_best_torch": None if best is None else median / best,
            "build_s": build_s[name],
            "images_per_s": values,
        })
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """The rows as a fixed-width text table."""
    ratio = lambda r: "-" if r is None else f"{r:.2f}x"  # noqa: E731
    lines = [f"{'variant':<14} {'median img/s':>12} {'min-max img/s':>15} {'vs torch':>9} "
             f"{'vs best torch':>13} {'build s':>8}"]
    for row in rows:
        spread = f"{row['min_images_per_s']:.1f}-{row['max_images_per_s']:.1f}"
        lines.append(f"{row['variant']:<14} {row['median_images_per_s']:>12.1f} {spread:>15} "
                     f"{ratio(row['ratio_to_torch']):>9} {ratio(row['ratio_to_best_torch']):>13} "
                     f"{row['build_s']:>8.1f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    xla_flags = configure_xla(args)
    omp_wait_policy = configure_openmp(args)
    import jax  # pylint: disable=import-outside-toplevel  (after XLA_FLAGS)

    batch = random_batch(args.seed, args.batch_size)
    runners: dict[str, Callable[[int], None]] = {}
    compile_s: dict[str, float] = {}
    params: dict[str, int] = {}
    for variant in args.variant_list:
        start = time.perf_counter()
        run_steps, params[variant] = build_jax_variant(variant, args, batch)
        run_steps(1)  # compiles
        compile_s[variant] = time.perf_counter() - start
        runners[variant] = run_steps
        print(f"{variant}: built and compiled in {compile_s[variant]:.1f} s", flush=True)
    torch_version = None
    if not args.skip_torch:
        import torch  # pylint: disable=import-outside-toplevel
        torch_version = torch.__version__
        for threads in args.torch_thread_list:
            name = torch_row_name(threads, args)
            start = time.perf_counter()
            run_steps, params[name] = build_torch(args, batch, threads=threads)
            run_steps(1)
            compile_s[name] = time.perf_counter() - start
            runners[name] = run_steps
        if args.torch_compile:
            start = time.perf_counter()
            run_steps, params[TORCH_COMPILE_NAME] = build_torch(
                args, batch, threads=args.torch_thread_list[0], compile_model=True)
            run_steps(1)  # compiles
            compile_s[TORCH_COMPILE_NAME] = time.perf_counter() - start
            runners[TORCH_COMPILE_NAME] = run_steps
    # Same model on both sides: equal parameter counts (BN scale/bias = weight/bias).
    if len(set(params.values())) > 1:
        raise RuntimeError(f"parameter counts differ between implementations: {params}")

    load_before = os.getloadavg()[0]
    rates = measure(runners, args)
    load_after = os.getloadavg()[0]
    rows = summarise(rates, compile_s)
    header = (f"{args.model}, batch {args.batch_size}, {args.repeats} repeats x "
              f"{args.steps_per_repeat} steps (warm-up {args.warmup}); {next(iter(params.values()))} "
              f"params; jax {jax.__version__} devices {len(jax.devices())}, torch {torch_version} "
              f"threads {args.torch_threads} channels_last {args.torch_channels_last} "
              f"OMP_WAIT_POLICY={omp_wait_policy}; "
              f"XLA_FLAGS={xla_flags!r}; 1-min load average {load_before:.1f} -> {load_after:.1f} "
              f"on {os.cpu_count()} CPUs")
    print(header)
    print(format_table(rows))
    if args.json:
        record = {
            "model": args.model, "batch_size": args.batch_size, "repeats": args.repeats,
            "steps_per_repeat": args.steps_per_repeat, "warmup": args.warmup,
            "jax_version": jax.__version__, "jax_devices": len(jax.devices()),
            "platform": args.platform, "device_kind": jax.devices()[0].device_kind,
            "torch_version": torch_version, "torch_threads": args.torch_threads,
            "torch_channels_last": args.torch_channels_last, "xla_flags": xla_flags,
            "omp_wait_policy": omp_wait_policy,
            "num_params": next(iter(params.values())), "rows": rows,
            "cpu_count": os.cpu_count(), "load_average": [load_before, load_after],
        }
        Path(args.json).write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
