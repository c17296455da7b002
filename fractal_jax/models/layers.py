"""Building blocks shared by the baseline CNNs (ResNet, ResNeXt, DenseNet, GoogLeNet).

Layouts follow torchvision so that parameter counts and feature-map sizes match its models.
"""
from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

# torchvision's ResNets use kaiming_normal_(mode="fan_out"); it suits every ReLU baseline here.
conv_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def conv(features: int, kernel_size: int, strides: int = 1, groups: int = 1,
         name: str | None = None, kernel_init=conv_kernel_init, dtype=None) -> nn.Conv:
    """A bias-free square conv (BatchNorm follows it) with torchvision's `kernel_size // 2` padding.

    Explicit symmetric padding rather than "SAME": on even inputs "SAME" pads strided convs more
    on the high side than the low one, which shifts the sampling grid relative to torchvision.
    """
    pad = kernel_size // 2
    return nn.Conv(features, (kernel_size, kernel_size), strides=(strides, strides),
                   padding=((pad, pad), (pad, pad)), feature_group_count=groups, use_bias=False,
                   kernel_init=kernel_init, dtype=dtype, name=name)


def batch_norm(train: bool, epsilon: float = 1e-5, name: str | None = None,
               momentum: float = 0.9, dtype=None) -> nn.BatchNorm:
    """BatchNorm with batch statistics in training and running averages (`batch_stats`) otherwise.

    Momentum 0.9 here is PyTorch's default momentum 0.1 (they weight the opposite term).
    """
    return nn.BatchNorm(use_running_average=not train, momentum=momentum, epsilon=epsilon,
                        dtype=dtype, name=name)


class ConvBN(nn.Module):
    """Conv → BatchNorm → ReLU (ReLU optional, e.g. before a residual sum)."""

    features: int
    kernel_size: int
    strides: int = 1
    groups: int = 1
    relu: bool = True
    epsilon: float = 1e-5
    bn_momentum: float = 0.9
    kernel_init: Callable = conv_kernel_init
    dtype: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        x = conv(self.features, self.kernel_size, self.strides, self.groups,
                 kernel_init=self.kernel_init, dtype=self.dtype)(x)
        x = batch_norm(train, self.epsilon, momentum=self.bn_momentum, dtype=self.dtype)(x)
        return nn.relu(x) if self.relu else x


class ImageNetStem(nn.Module):
    """7×7/2 conv-BN-ReLU then 3×3/2 max-pool: the stem of torchvision's ResNets and DenseNets,
    and of FractalNet-34 (spec §2), which sets its own initialiser, momentum and dtype."""

    features: int = 64
    bn_momentum: float = 0.9
    kernel_init: Callable = conv_kernel_init
    dtype: str | None = None

    stride = 4  # class constant, not a field: the stem always downsamples by 4

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        x = ConvBN(self.features, 7, strides=2, bn_momentum=self.bn_momentum,
                   kernel_init=self.kernel_init, dtype=self.dtype)(x, train=train)
        return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


def check_input(x: jax.Array, arch: str, min_size: int) -> None:
    """Raises ValueError unless `x` is an NHWC batch with both spatial sides ≥ `min_size`.

    `min_size` is the model's total downsampling factor: smaller inputs leave the last stage with
    a map built only from padding, or with no pixels at all after an unpadded pool.
    """
    if x.ndim != 4:
        raise ValueError(f"{arch} expects an NHWC batch of rank 4, got shape {tuple(x.shape)}.")
    height, width = x.shape[1:3]
    if min(height, width) < min_size:
        raise ValueError(f"{arch} needs inputs of at least {min_size}x{min_size} pixels (its "
                         f"total stride), got {height}x{width}.")


def min_input_size(cifar_stem: bool, num_stages: int) -> int:
    """The total stride of a baseline whose stages after the first halve the map: the smallest
    input side it accepts."""
    return (1 if cifar_stem else ImageNetStem.stride) * 2 ** (num_stages - 1)


def global_avg_pool(x: jax.Array) -> jax.Array:
    """Mean over the spatial axes: (N, H, W, C) → (N, C)."""
    return jnp.mean(x, axis=(1, 2))
