"""DenseNets (Huang et al. 2017) with bottleneck layers and compression (DenseNet-BC).

One `DenseNet` module covers torchvision's ImageNet DenseNet-121 and the CIFAR DenseNet-BC.
Layers are pre-activation (BN-ReLU-conv), so each block's output is still un-normalised.
"""
from __future__ import annotations

from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from fractal_jax.models.layers import (ImageNetStem, batch_norm, check_input, conv,
                                      global_avg_pool, min_input_size)


class PreActConv(nn.Module):
    """BatchNorm → ReLU → bias-free conv."""

    features: int
    kernel_size: int

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        return conv(self.features, self.kernel_size)(nn.relu(batch_norm(train)(x)))


class DenseLayer(nn.Module):
    """1×1 bottleneck to `bn_size`·k channels then a 3×3 conv to k = `growth_rate` channels.

    Returns the input with the k new channels appended, so every later layer sees all earlier ones.
    """

    growth_rate: int
    bn_size: int = 4

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        y = PreActConv(self.bn_size * self.growth_rate, 1)(x, train=train)
        y = PreActConv(self.growth_rate, 3)(y, train=train)
        return jnp.concatenate([x, y], axis=-1)


class Transition(nn.Module):
    """BN-ReLU-1×1 conv to `features` channels, then a 2×2 average pool halving the map."""

    features: int

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        x = PreActConv(self.features, 1)(x, train=train)
        return nn.avg_pool(x, (2, 2), strides=(2, 2))


class DenseNet(nn.Module):
    """A DenseNet-BC: stem, dense blocks joined by compressing transitions, BN-ReLU, GAP, FC.

    ImageNet layout (default, DenseNet-121): 7×7/2 conv-BN-ReLU + max-pool stem.
    CIFAR layout (`cifar_stem=True`): a single 3×3 conv at full resolution, as in the paper.

    `__call__` returns logits (N, num_classes), or with `features=True` one NHWC map per dense
    block, taken before its transition (so at strides 4, 8, 16, 32 for DenseNet-121 with
    256, 512, 1024, 1024 channels; at strides 1, 2, 4 with 216, 300, 342 channels for
    DenseNet-BC-100-12). The last map is after the final BN-ReLU, the others are raw block outputs.
    """

    num_classes: int
    block_sizes: Sequence[int] = (6, 12, 24, 16)
    growth_rate: int = 32
    num_init_features: int = 64
    bn_size: int = 4
    compression: float = 0.5
    cifar_stem: bool = False
    arch: str = "densenet"

    @property
    def min_input_size(self) -> int:
        return min_input_size(self.cifar_stem, len(self.block_sizes))

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False,
                 features: bool = False) -> jax.Array | tuple[jax.Array, ...]:
        check_input(x, self.arch, self.min_input_size)
        if self.cifar_stem:
            x = conv(self.num_init_features, 3, name="stem")(x)
        else:
            x = ImageNetStem(self.num_init_features, name="stem")(x, train=train)
        block_maps = []
        for block, num_layers in enumerate(self.block_sizes):
            for layer in range(num_layers):
                x = DenseLayer(self.growth_rate, self.bn_size,
                               name=f"block{block + 1}_layer{layer + 1}")(x, train=train)
            if block < len(self.block_sizes) - 1:
                block_maps.append(x)
                x = Transition(int(x.shape[-1] * self.compression),
                               name=f"transition{block + 1}")(x, train=train)
        x = nn.relu(batch_norm(train, name="final_norm")(x))
        block_maps.append(x)
        if features:
            return tuple(block_maps)
        return nn.Dense(self.num_classes, name="classifier")(global_avg_pool(x))


def densenet121(num_classes: int = 1000, **kwargs) -> DenseNet:
    """DenseNet-121 (torchvision layout, k = 32): 7,978,856 parameters at 1000 classes."""
    return DenseNet(num_classes=num_classes, block_sizes=(6, 12, 24, 16), growth_rate=32,
                    num_init_features=64, arch="densenet121", **kwargs)


def cifar_densenet_bc(depth: int, growth_rate: int, num_classes: int = 10,
                      **kwargs) -> DenseNet:
    """The CIFAR DenseNet-BC of `depth` layers: three blocks of (depth - 4) / 6 dense layers.

    Each dense layer holds two convs; the other four layers are the stem conv, two transitions and
    the classifier. The stem has 2k channels and transitions halve the channel count.
    """
    if depth < 10 or (depth - 4) % 6:
        raise ValueError(f"DenseNet-BC depth must be 6n + 4 with n ≥ 1, got {depth}.")
    n = (depth - 4) // 6
    return DenseNet(num_classes=num_classes, block_sizes=(n, n, n), growth_rate=growth_rate,
                    num_init_features=2 * growth_rate, cifar_stem=True,
                    arch=f"densenet_bc_{depth}_{growth_rate}", **kwargs)


def densenet_bc_100_12(num_classes: int = 10, **kwargs) -> DenseNet:
    """DenseNet-BC-100 (k = 12) for CIFAR: 769,162 parameters at 10 classes."""
    return cifar_densenet_bc(100, 12, num_classes, **kwargs)


MODELS: dict[str, Callable[..., nn.Module]] = {
    "densenet121": densenet121,
    "densenet_bc_100_12": densenet_bc_100_12,
}
