"""Models chosen by name; every one returns `(logits, features)`.

Usage::

    model = get_model("resnet32", num_classes=10)
    variables = model.init(rng, x)                          # x: float32 [B, 32, 32, 3]
    (logits, features), updates = model.apply(variables, x, train=True, mutable=["batch_stats"])

`logits` is float32 [B, C] (None with `head="none"`), `features` float32 [B, D] the penultimate
representation. BatchNorm statistics live in the "batch_stats" collection (the mlp has none).
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dsink_jax.models.projection import ProjectionNet, classifier_weights
from dsink_jax.models.resnet import (CifarResNet, ImageNetResNet, PreActResNet18,
                                     option_a_shortcut)
from dsink_jax.models.small import HEADS, MLP, CosineClassifier, SmallCNN, check_head, scaled_width

MODEL_NAMES = ("mlp", "cnn", "resnet8", "resnet20", "resnet32", "preact_resnet18", "resnet50",
               "resnext50_32x4d", "resnet50_tiny", "resnext50_tiny")
# ImageNet-scale bottleneck ResNets: (stage sizes, width multiplier, groups, width per group);
# the tiny variants (one block a stage, 1/8 width) are for tests and the smoke preset.
_IMAGENET_RESNETS = {"resnet50": ((3, 4, 6, 3), 1.0, 1, 64),
                     "resnext50_32x4d": ((3, 4, 6, 3), 1.0, 32, 4),
                     "resnet50_tiny": ((1, 1, 1, 1), 0.125, 1, 64),
                     "resnext50_tiny": ((1, 1, 1, 1), 0.125, 4, 16)}
# Compute dtypes by config name (parameters stay float32).
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

# Basic blocks per stage of the CIFAR ResNets (depth 6n + 2).
_RESNET_BLOCKS = {"resnet8": 1, "resnet20": 3, "resnet32": 5}

__all__ = [
    "CifarResNet",
    "CosineClassifier",
    "DTYPES",
    "ImageNetResNet",
    "HEADS",
    "MLP",
    "MODEL_NAMES",
    "PreActResNet18",
    "ProjectionNet",
    "SmallCNN",
    "classifier_weights",
    "count_params",
    "get_model",
    "option_a_shortcut",
]


def get_model(
    name: str,
    *,
    num_classes: int,
    width: float = 1.0,
    head: str = "linear",
    dtype: Any = jnp.float32,
) -> nn.Module:
    """Builds a model by name.

    Args:
        name: one of `MODEL_NAMES`: "mlp" (hidden layers (256, 128) x width, flattens the input),
            "cnn" (3 conv-BN-ReLU blocks, (32, 64, 64) x width channels), "resnet8" / "resnet20" /
            "resnet32" (He et al. CIFAR ResNet, option-A shortcuts, 16/32/64 x width channels),
            "preact_resnet18" (DivideMix's PreAct ResNet-18, 64..512 x width channels),
            "resnet50" / "resnext50_32x4d" (ImageNet-scale bottleneck ResNets, 7x7 stem; the
            ImageNet-LT / iNaturalist models) and their tiny test variants "resnet50_tiny" /
            "resnext50_tiny" (one block a stage at 1/8 width).
        num_classes: C >= 1 (also required with head "none", for a uniform signature).
        width: channel (hidden-size) multiplier > 0; channels are rounded, at least 1.
        head: "linear" (Dense, params["head"]["kernel"] [D, C] and "bias" [C]), "cosine"
            (cosine similarities in [-1, 1], params["head"]["kernel"] [D, C]) or "none"
            (logits is None).
        dtype: computation dtype, e.g. jnp.bfloat16 for speed; params, features and logits stay
            float32.

    Returns:
        A Linen module; `module.apply(variables, x, train=...)` with x float [B, H, W, C_in]
        returns `(logits float32 [B, C] or None, features float32 [B, D])`.

    Raises:
        ValueError: unknown name or head, num_classes < 1, width not a positive finite number,
            dtype not floating.
        TypeError: num_classes not an int.
    """
    if name not in MODEL_NAMES:
        raise ValueError(f"name must be one of {MODEL_NAMES}, got {name!r}.")
    check_head(head)
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)):
        raise TypeError(f"num_classes must be an int >= 1, got {num_classes!r}.")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}.")
    if not (isinstance(width, (int, float, np.number)) and np.isfinite(width) and width > 0):
        raise ValueError(f"width must be a finite number > 0, got {width!r}.")
    if not jnp.issubdtype(jnp.dtype(dtype), jnp.floating):
        raise ValueError(f"dtype must be a floating dtype (e.g. float32, bfloat16), got {dtype!r}.")
    num_classes = int(num_classes)
    width = float(width)
    if name == "mlp":
        hidden = tuple(scaled_width(h, width) for h in (256, 128))
        return MLP(num_classes, hidden_sizes=hidden, head=head, dtype=dtype)
    if name == "cnn":
        channels = tuple(scaled_width(c, width) for c in (32, 64, 64))
        return SmallCNN(num_classes, channels=channels, head=head, dtype=dtype)
    if name == "preact_resnet18":
        return PreActResNet18(num_classes, width=width, head=head, dtype=dtype)
    if name in _IMAGENET_RESNETS:
        stages, base_width, groups, per_group = _IMAGENET_RESNETS[name]
        return ImageNetResNet(num_classes, stage_sizes=stages, width=base_width * width,
                              groups=groups, width_per_group=per_group, head=head, dtype=dtype)
    return CifarResNet(num_classes, blocks_per_stage=_RESNET_BLOCKS[name], width=width, head=head,
                       dtype=dtype)


def count_params(params: Any) -> int:
    """Number of scalars in a pytree of arrays or of `jax.ShapeDtypeStruct` (from `jax.eval_shape`).

    Pass `variables["params"]` to count trainable parameters only (not BatchNorm statistics).
    """
    return int(sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(params)))
