"""CIFAR ResNets of the long-tailed and noisy-label literature, in Flax Linen.

* `CifarResNet`: He et al. (2016) CIFAR ResNet-(6n+2), as in the LDAM-DRW code
  (`resnet_cifar.py`): a 3x3 stem with 16 channels, 3 stages of n basic blocks with
  16/32/64 channels (x width), global average pooling. ResNet-32 (n = 5) has 464,154
  parameters with a 10-class linear head. Shortcuts are **option A** (parameter free, as in
  LDAM-DRW): identity, or stride-2 subsampling plus zero-padded channels where the shape changes.
  Convolutions use PyTorch's kaiming-normal init (fan-in), like LDAM-DRW's `_weights_init`.
* `PreActResNet18`: the PreAct ResNet-18 of DivideMix (`PreResNet.py`): a 3x3 stem conv-BN-ReLU
  with 64 channels, 4 stages of 2 pre-activation blocks with 64/128/256/512 channels (x width),
  1x1-conv shortcuts where the shape changes, global average pooling (DivideMix's
  `avg_pool2d(out, 4)` on the 4x4 map of a 32x32 input). 11,171,274 parameters with a 10-class
  linear head. As in DivideMix, the shortcut (identity or 1x1 conv) takes the *pre-activated*
  input relu(bn1(x)), and no BN-ReLU follows the last stage. Inits are PyTorch's defaults.

Both return `(logits, features)`; see `dsink_jax.models.small` for the heads.
"""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dsink_jax.models.small import KAIMING_NORMAL, apply_head, batch_norm, scaled_width

# PyTorch's default Conv2d / Linear weight init, kaiming_uniform(a=sqrt(5)): U(+-1/sqrt(fan_in)).
TORCH_DEFAULT_INIT = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def option_a_shortcut(x: jax.Array, *, out_channels: int, stride: int) -> jax.Array:
    """Parameter-free shortcut ("option A" of He et al.): subsample, zero-pad the channels.

    Args:
        x: [B, H, W, C_in].
        out_channels: C_out >= C_in; the C_out - C_in new channels are zeros, split evenly
            before and after the input channels (LDAM-DRW pads planes // 4 on each side).
        stride: spatial subsampling, keeping rows and columns 0, stride, 2 * stride, ...

    Returns:
        [B, ceil(H / stride), ceil(W / stride), C_out].
    """
    extra = out_channels - x.shape[-1]
    if extra < 0:
        raise ValueError(
            f"out_channels must be >= the input channels {x.shape[-1]}, got {out_channels}.")
    if stride > 1:
        x = x[:, ::stride, ::stride, :]
    if extra:
        x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)))
    return x


class BasicBlock(nn.Module):
    """Post-activation basic block conv3x3-BN-ReLU-conv3x3-BN, + option-A shortcut, ReLU."""

    out_channels: int
    stride: int = 1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        """Args: x [B, H, W, C_in]. Returns: [B, H / stride, W / stride, out_channels]."""
        conv = lambda name, stride: nn.Conv(  # noqa: E731 - two identical convs.
            self.out_channels, (3, 3), strides=stride, padding=1, use_bias=False,
            kernel_init=KAIMING_NORMAL, dtype=self.dtype, param_dtype=jnp.float32, name=name)
        out = nn.relu(batch_norm(train, self.dtype, name="bn1")(conv("conv1", self.stride)(x)))
        out = batch_norm(train, self.dtype, name="bn2")(conv("conv2", 1)(out))
        shortcut = x
        if self.stride != 1 or x.shape[-1] != self.out_channels:
            shortcut = option_a_shortcut(x, out_channels=self.out_channels, stride=self.stride)
        return nn.relu(out + shortcut)


class CifarResNet(nn.Module):
    """He et al. CIFAR ResNet of depth 6n + 2 with option-A shortcuts (LDAM-DRW's ResNet-32 at n=5).

    Attributes:
        num_classes: C.
        blocks_per_stage: n (1: ResNet-8, 3: ResNet-20, 5: ResNet-32).
        width: channel multiplier of 16/32/64.
        head: "linear", "cosine" or "none".
        dtype: computation dtype; params stay float32.
    """

    num_classes: int
    blocks_per_stage: int = 5
    width: float = 1.0
    head: str = "linear"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> tuple[jax.Array | None, jax.Array]:
        """Args: x float [B, H, W, C_in]; train: BatchNorm uses and updates batch statistics.

        Returns:
            (logits float32 [B, C] or None, features float32 [B, round(64 * width)]).
        """
        channels = [scaled_width(c, self.width) for c in (16, 32, 64)]
        h = nn.Conv(channels[0], (3, 3), padding=1, use_bias=False, kernel_init=KAIMING_NORMAL,
                    dtype=self.dtype, param_dtype=jnp.float32, name="conv1")(x.astype(self.dtype))
        h = nn.relu(batch_norm(train, self.dtype, name="bn1")(h))
        for stage, ch in enumerate(channels):
            for block in range(self.blocks_per_stage):
                stride = 2 if stage > 0 and block == 0 else 1
                name = f"stage{stage + 1}_block{block}"
                h = BasicBlock(ch, stride, self.dtype, name=name)(h, train)
        features = jnp.mean(h.astype(jnp.float32), axis=(1, 2))
        logits = apply_head(features, head=self.head, num_classes=self.num_classes,
                            dtype=self.dtype, kernel_init=KAIMING_NORMAL)
        return logits, features


class PreActBlock(nn.Module):
    """DivideMix's pre-activation block: BN-ReLU, then conv3x3, BN-ReLU, conv3x3, + shortcut."""

    out_channels: int
    stride: int = 1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        """Args: x [B, H, W, C_in]. Returns: [B, H / stride, W / stride, out_channels]."""
        conv = lambda name, size, stride: nn.Conv(  # noqa: E731 - three similar convs.
            self.out_channels, (size, size), strides=stride, padding=size // 2, use_bias=False,
            kernel_init=TORCH_DEFAULT_INIT, dtype=self.dtype, param_dtype=jnp.float32, name=name)
        out = nn.relu(batch_norm(train, self.dtype, name="bn1")(x))
        # DivideMix applies the shortcut to the pre-activated input, identity included.
        shortcut = out
        if self.stride != 1 or x.shape[-1] != self.out_channels:
            shortcut = conv("shortcut", 1, self.stride)(out)
        out = conv("conv1", 3, self.stride)(out)
        out = conv("conv2", 3, 1)(nn.relu(batch_norm(train, self.dtype, name="bn2")(out)))
        return out + shortcut


class PreActResNet18(nn.Module):
    """DivideMix's CIFAR PreAct ResNet-18 ([2, 2, 2, 2] blocks, 64/128/256/512 channels x width).

    Attributes:
        num_classes: C.
        width: channel multiplier.
        head: "linear", "cosine" or "none".
        dtype: computation dtype; params stay float32.
    """

    num_classes: int
    width: float = 1.0
    head: str = "linear"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> tuple[jax.Array | None, jax.Array]:
        """Args: x float [B, H, W, C_in]; train: BatchNorm uses and updates batch statistics.

        Returns:
            (logits float32 [B, C] or None, features float32 [B, round(512 * width)]).
        """
        channels = [scaled_width(c, self.width) for c in (64, 128, 256, 512)]
        h = nn.Conv(channels[0], (3, 3), padding=1, use_bias=False, kernel_init=TORCH_DEFAULT_INIT,
                    dtype=self.dtype, param_dtype=jnp.float32, name="conv1")(x.astype(self.dtype))
        h = nn.relu(batch_norm(train, self.dtype, name="bn1")(h))
        for stage, ch in enumerate(channels):
            for block in range(2):
                stride = 2 if stage > 0 and block == 0 else 1
                name = f"stage{stage + 1}_block{block}"
                h = PreActBlock(ch, stride, self.dtype, name=name)(h, train)
        features = jnp.mean(h.astype(jnp.float32), axis=(1, 2))
        logits = apply_head(features, head=self.head, num_classes=self.num_classes,
                            dtype=self.dtype, kernel_init=TORCH_DEFAULT_INIT)
        return logits, features


class BottleneckBlock(nn.Module):
    """The ResNet-50 / ResNeXt bottleneck: 1x1, 3x3 (grouped), 1x1 (x4), + projection shortcut.

    torchvision's ResNet v1.5 layout (the stride sits on the 3x3 conv); the last BN of each block
    starts at zero (`zero_init_residual`, Goyal et al.), the usual large-batch recipe.
    """

    channels: int  # the bottleneck width before grouping: out = 4 * channels
    stride: int = 1
    groups: int = 1
    width_per_group: int = 64
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        width = int(self.channels * (self.width_per_group / 64.0)) * self.groups
        out_channels = 4 * self.channels
        conv = functools.partial(nn.Conv, use_bias=False, kernel_init=KAIMING_NORMAL,
                                 dtype=self.dtype, param_dtype=jnp.float32)
        out = nn.relu(batch_norm(train, self.dtype, name="bn1")(conv(width, (1, 1),
                                                                     name="conv1")(x)))
        out = conv(width, (3, 3), strides=self.stride, padding=1, feature_group_count=self.groups,
                   name="conv2")(out)
        out = nn.relu(batch_norm(train, self.dtype, name="bn2")(out))
        out = conv(out_channels, (1, 1), name="conv3")(out)
        out = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                           dtype=self.dtype, scale_init=nn.initializers.zeros, name="bn3")(out)
        shortcut = x
        if self.stride != 1 or x.shape[-1] != out_channels:
            shortcut = conv(out_channels, (1, 1), strides=self.stride, name="proj")(x)
            shortcut = batch_norm(train, self.dtype, name="proj_bn")(shortcut)
        return nn.relu(out + shortcut)


class ImageNetResNet(nn.Module):
    """ResNet-50 / ResNeXt-50 for ImageNet-scale inputs (the ImageNet-LT and iNaturalist models).

    A 7x7 stride-2 stem with 64 channels (x width), 3x3 stride-2 max pooling, four stages of
    bottleneck blocks with 64/128/256/512 (x width) bottleneck channels, global average pooling.
    ResNet-50 ([3, 4, 6, 3], groups 1) has 25,557,032 parameters with a 1000-class linear head and
    ResNeXt-50 32x4d (groups 32, 4 channels per group) 25,028,904, as torchvision's.

    Attributes:
        num_classes: C.
        stage_sizes: bottleneck blocks per stage.
        width: channel multiplier (tiny test variants use a small one).
        groups, width_per_group: ResNeXt cardinality and group width (1, 64: plain ResNet).
        head: "linear", "cosine" or "none".
        dtype: computation dtype (bfloat16 on accelerators); params stay float32.
    """

    num_classes: int
    stage_sizes: tuple[int, ...] = (3, 4, 6, 3)
    width: float = 1.0
    groups: int = 1
    width_per_group: int = 64
    head: str = "linear"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> tuple[jax.Array | None, jax.Array]:
        """Args: x float [B, H, W, C_in]. Returns: (logits [B, C] or None, features [B, D])."""
        stem = scaled_width(64, self.width)
        h = nn.Conv(stem, (7, 7), strides=2, padding=3, use_bias=False,
                    kernel_init=KAIMING_NORMAL, dtype=self.dtype, param_dtype=jnp.float32,
                    name="conv1")(x.astype(self.dtype))
        h = nn.relu(batch_norm(train, self.dtype, name="bn1")(h))
        h = nn.max_pool(h, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        for stage, blocks in enumerate(self.stage_sizes):
            channels = scaled_width(64 * 2 ** stage, self.width)
            for block in range(blocks):
                stride = 2 if stage > 0 and block == 0 else 1
                h = BottleneckBlock(channels, stride, self.groups, self.width_per_group,
                                    self.dtype, name=f"stage{stage + 1}_block{block}")(h, train)
        features = jnp.mean(h.astype(jnp.float32), axis=(1, 2))
        logits = apply_head(features, head=self.head, num_classes=self.num_classes,
                            dtype=self.dtype, kernel_init=TORCH_DEFAULT_INIT)
        return logits, features
