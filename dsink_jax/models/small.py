"""Small models (for the `digits` default and for tests) and the classifier heads of all models.

Every model maps `x: float32 [B, H, W, C]` to `(logits, features)`:

* `features`: float32 [B, D], the penultimate representation.
* `logits`: float32 [B, num_classes] from the head named "head", or `None` when `head == "none"`.

Heads (`HEADS`):

* "linear": `features @ kernel + bias`, `params["head"]["kernel"]` is [D, C].
* "cosine": `<normalize(features), normalize(kernel[:, c])>` in [-1, 1], no scale (the loss
  scales, e.g. LDAM's s = 30); `params["head"]["kernel"]` is [D, C], no bias. This is the
  `NormedLinear` of the LDAM-DRW code and the classifier of the OT-dynamic softmax.
* "none": no head; the caller brings its own.
"""

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

HEADS = ("linear", "cosine", "none")

# BatchNorm as in PyTorch: its momentum 0.1 is flax's 0.9 (flax weights the old statistic).
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5

# PyTorch's `init.kaiming_normal_` (fan-in, gain sqrt(2), untruncated), as in the LDAM-DRW code.
KAIMING_NORMAL = nn.initializers.variance_scaling(2.0, "fan_in", "normal")


def check_head(head: str) -> None:
    """Raises ValueError unless `head` is one of `HEADS`."""
    if head not in HEADS:
        raise ValueError(f"head must be one of {HEADS}, got {head!r}.")


def scaled_width(channels: int, width: float) -> int:
    """Returns `channels * width` rounded, at least 1 (the width option of every model)."""
    return max(1, int(round(channels * width)))


def batch_norm(train: bool, dtype: Any, name: str | None = None) -> nn.BatchNorm:
    """A PyTorch-like BatchNorm (momentum 0.9 in flax's convention, eps 1e-5).

    Running statistics live in the "batch_stats" collection and are used when not training.
    Unlike PyTorch, flax's running variance is the biased batch variance (a factor n/(n-1) apart).
    """
    return nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM, epsilon=BN_EPSILON,
                        dtype=dtype, name=name)


class CosineClassifier(nn.Module):
    """Cosine-similarity classifier: logits in [-1, 1], no scale and no bias.

    Attributes:
        num_classes: C.
        kernel_init: initializer of the [D, C] class weights (their norm does not matter).
    """

    num_classes: int
    kernel_init: Any = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, features: jax.Array) -> jax.Array:
        """Args: features [B, D]. Returns: float32 [B, C] cosine similarities."""
        kernel = self.param("kernel", self.kernel_init, (features.shape[-1], self.num_classes),
                            jnp.float32)
        # Normalised in float32 whatever the compute dtype: cosines feed a loss scaled by ~30.
        feats = features.astype(jnp.float32)
        feats = feats / jnp.maximum(jnp.linalg.norm(feats, axis=-1, keepdims=True), 1e-12)
        kernel = kernel / jnp.maximum(jnp.linalg.norm(kernel, axis=0, keepdims=True), 1e-12)
        return feats @ kernel


def apply_head(
    features: jax.Array,
    *,
    head: str,
    num_classes: int,
    dtype: Any,
    kernel_init: Any = nn.initializers.lecun_normal(),
) -> jax.Array | None:
    """Applies the classifier head named "head"; call only inside a compact `__call__`.

    Args:
        features: float32 [B, D].
        head: one of `HEADS`.
        num_classes: C.
        dtype: computation dtype of the linear head.
        kernel_init: initializer of the [D, C] kernel (linear and cosine heads).

    Returns:
        float32 [B, C] logits, or None when `head == "none"`.
    """
    check_head(head)
    if head == "none":
        return None
    if head == "cosine":
        return CosineClassifier(num_classes, kernel_init=kernel_init, name="head")(features)
    logits = nn.Dense(num_classes, kernel_init=kernel_init, dtype=dtype, param_dtype=jnp.float32,
                      name="head")(features)
    return logits.astype(jnp.float32)


class MLP(nn.Module):
    """Multi-layer perceptron on the flattened input (no BatchNorm).

    Attributes:
        num_classes: C.
        hidden_sizes: widths of the ReLU hidden layers; the last one is the feature dimension D.
        head: one of `HEADS`.
        dtype: computation dtype; params stay float32.
    """

    num_classes: int
    hidden_sizes: Sequence[int] = (256, 128)
    head: str = "linear"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> tuple[jax.Array | None, jax.Array]:
        """Args: x [B, ...] (e.g. [B, H, W, C]); train is unused (kept for the common signature).

        Returns:
            (logits float32 [B, C] or None, features float32 [B, hidden_sizes[-1]]).
        """
        del train  # No BatchNorm or dropout.
        h = jnp.reshape(x, (x.shape[0], -1)).astype(self.dtype)
        for i, size in enumerate(self.hidden_sizes):
            dense = nn.Dense(size, dtype=self.dtype, param_dtype=jnp.float32, name=f"dense_{i}")
            h = nn.relu(dense(h))
        features = h.astype(jnp.float32)
        logits = apply_head(features, head=self.head, num_classes=self.num_classes,
                            dtype=self.dtype)
        return logits, features


class SmallCNN(nn.Module):
    """A small conv net for 8x8 to 32x32 inputs: conv3x3-BN-ReLU blocks, then global average pool.

    Default channels (32, 64, 64) with strides (1, 2, 2): an 8x8 input ends at 2x2, a 32x32 one at
    8x8, so it stays fast on CPU.

    Attributes:
        num_classes: C.
        channels: output channels of each block; the last one is the feature dimension D.
        strides: stride of each block.
        head: one of `HEADS`.
        dtype: computation dtype; params stay float32.
    """

    num_classes: int
    channels: Sequence[int] = (32, 64, 64)
    strides: Sequence[int] = (1, 2, 2)
    head: str = "linear"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> tuple[jax.Array | None, jax.Array]:
        """Args: x float [B, H, W, C_in]; train: BatchNorm uses batch statistics and updates them.

        Returns:
            (logits float32 [B, C] or None, features float32 [B, channels[-1]]).
        """
        if len(self.channels) != len(self.strides):
            raise ValueError("channels and strides must have equal lengths, got "
                             f"{self.channels} and {self.strides}.")
        h = x.astype(self.dtype)
        for i, (ch, stride) in enumerate(zip(self.channels, self.strides)):
            h = nn.Conv(ch, (3, 3), strides=stride, padding=1, use_bias=False,
                        kernel_init=KAIMING_NORMAL, dtype=self.dtype, param_dtype=jnp.float32,
                        name=f"conv_{i}")(h)
            h = nn.relu(batch_norm(train, self.dtype, name=f"bn_{i}")(h))
        features = jnp.mean(h.astype(jnp.float32), axis=(1, 2))
        logits = apply_head(features, head=self.head, num_classes=self.num_classes,
                            dtype=self.dtype)
        return logits, features
