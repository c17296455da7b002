"""ResNets (He et al. 2016) in torchvision's ImageNet layout and the CIFAR 6n+2 layout.

Both layouts are one `ResNet` module; they differ only in stem, stage widths and block counts.
Any ResNet can use stochastic depth (Huang et al. 2016), which the CIFAR models are known for.
"""
from __future__ import annotations

from typing import Callable, Sequence

import flax.linen as nn
import jax

from fractal_jax.models.layers import (ConvBN, ImageNetStem, check_input, global_avg_pool,
                                      min_input_size)


def survival_probabilities(num_blocks: int, rate: float) -> tuple[float, ...]:
    """Per-block probability of keeping the residual branch, decaying linearly from 1 to 1 - rate.

    The first block always survives and the last survives with 1 - `rate`, so deeper blocks,
    whose branches refine rather than build features, are dropped more often. (Huang et al.
    index blocks from 1 and pin p = 1 to the input, so their first block keeps 1 - rate / L.)
    """
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"stochastic_depth_rate must be in [0, 1), got {rate}.")
    return tuple(1.0 - rate * i / max(num_blocks - 1, 1) for i in range(num_blocks))


class ResidualBlock(nn.Module):
    """Base for residual blocks: output = ReLU(shortcut(x) + branch(x)), with stochastic depth.

    `features` is the block's base width; subclasses set the branch's output channels from it.
    """

    features: int
    strides: int = 1
    survival_prob: float = 1.0

    def merge(self, x: jax.Array, branch: jax.Array, *, train: bool) -> jax.Array:
        """Adds the (possibly dropped) branch to the shortcut and applies the final ReLU.

        The shortcut is the identity unless the shape changes, then a 1×1 conv + BN projection
        (option B). A dropped branch is computed and zeroed rather than skipped, since a static
        XLA graph cannot cheaply skip it: outputs and gradients are those of skipping, but the
        branch's BatchNorm running averages still see the batch.
        """
        shortcut = x
        if x.shape[-1] != branch.shape[-1] or self.strides != 1:
            shortcut = ConvBN(branch.shape[-1], 1, self.strides, relu=False,
                              name="projection")(x, train=train)
        if self.survival_prob < 1.0:
            if train:  # one draw per mini-batch, as in Huang et al.
                keep = jax.random.bernoulli(self.make_rng("dropout"), self.survival_prob)
                branch = branch * keep
            else:  # the expected contribution of a branch that trains with this survival rate
                branch = branch * self.survival_prob
        return nn.relu(shortcut + branch)


class BasicBlock(ResidualBlock):
    """Two 3×3 conv-BN layers (ResNet-18/34 and the CIFAR ResNets)."""

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        y = ConvBN(self.features, 3, self.strides)(x, train=train)
        y = ConvBN(self.features, 3, relu=False)(y, train=train)
        return self.merge(x, y, train=train)


class Bottleneck(ResidualBlock):
    """1×1 reduce → 3×3 (strided, grouped) → 1×1 expand ×4, as torchvision's v1.5 Bottleneck.

    The inner width is `int(features * width_per_group / 64) * groups`: `features` for ResNet-50
    (groups 1, width 64) and 2·`features` split into 32 groups for ResNeXt-50 32×4d.
    """

    groups: int = 1
    width_per_group: int = 64

    expansion = 4  # output channels per unit of `features`; a class constant, not a field

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        width = int(self.features * self.width_per_group / 64) * self.groups
        y = ConvBN(width, 1)(x, train=train)
        y = ConvBN(width, 3, self.strides, groups=self.groups)(y, train=train)
        y = ConvBN(self.features * self.expansion, 1, relu=False)(y, train=train)
        return self.merge(x, y, train=train)


class ResNet(nn.Module):
    """A ResNet: stem, stages of residual blocks (each after the first halves the map), GAP, FC.

    ImageNet layout (default): 7×7/2 stem + max-pool, stages of width 64/128/256/512.
    CIFAR layout (`cifar_stem=True`, widths 16/32/64): a 3×3 conv-BN-ReLU stem at full resolution.

    `__call__` returns logits (N, num_classes), or with `features=True` one NHWC map per stage:
    ImageNet layout at strides 4, 8, 16, 32 with widths × block expansion channels
    (64, 128, 256, 512 for BasicBlock; 256, 512, 1024, 2048 for Bottleneck); CIFAR layout at
    strides 1, 2, 4 with 16, 32, 64 channels.
    """

    num_classes: int
    stage_sizes: Sequence[int] = (2, 2, 2, 2)
    block: Callable[..., ResidualBlock] = BasicBlock
    stage_widths: Sequence[int] = (64, 128, 256, 512)
    cifar_stem: bool = False
    stochastic_depth_rate: float = 0.0
    arch: str = "resnet"

    @property
    def min_input_size(self) -> int:
        return min_input_size(self.cifar_stem, len(self.stage_sizes))

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False,
                 features: bool = False) -> jax.Array | tuple[jax.Array, ...]:
        check_input(x, self.arch, self.min_input_size)
        if self.cifar_stem:
            x = ConvBN(self.stage_widths[0], 3, name="stem")(x, train=train)
        else:
            x = ImageNetStem(self.stage_widths[0], name="stem")(x, train=train)
        survival = iter(survival_probabilities(sum(self.stage_sizes), self.stochastic_depth_rate))
        stage_maps = []
        for stage, (num_blocks, width) in enumerate(zip(self.stage_sizes, self.stage_widths)):
            for index in range(num_blocks):
                strides = 2 if stage > 0 and index == 0 else 1
                x = self.block(width, strides=strides, survival_prob=next(survival),
                               name=f"stage{stage + 1}_block{index + 1}")(x, train=train)
            stage_maps.append(x)
        if features:
            return tuple(stage_maps)
        return nn.Dense(self.num_classes, name="classifier")(global_avg_pool(x))


def resnet18(num_classes: int = 1000, **kwargs) -> ResNet:
    """ResNet-18 (ImageNet layout): 11,689,512 parameters at 1000 classes."""
    return ResNet(num_classes=num_classes, stage_sizes=(2, 2, 2, 2), block=BasicBlock,
                  arch="resnet18", **kwargs)


def resnet34(num_classes: int = 1000, **kwargs) -> ResNet:
    """ResNet-34 (ImageNet layout): 21,797,672 parameters at 1000 classes."""
    return ResNet(num_classes=num_classes, stage_sizes=(3, 4, 6, 3), block=BasicBlock,
                  arch="resnet34", **kwargs)


def resnet50(num_classes: int = 1000, **kwargs) -> ResNet:
    """ResNet-50 v1.5 (ImageNet layout): 25,557,032 parameters at 1000 classes."""
    return ResNet(num_classes=num_classes, stage_sizes=(3, 4, 6, 3), block=Bottleneck,
                  arch="resnet50", **kwargs)


def cifar_resnet(depth: int, num_classes: int = 10, **kwargs) -> ResNet:
    """The CIFAR ResNet of `depth` = 6n + 2 layers: three stages of n BasicBlocks (16/32/64).

    Downsampling blocks use projection shortcuts (option B), which adds 2,752 parameters over
    the paper's parameter-free option A (e.g. ResNet-20: 272,474 here vs 269,722).
    """
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(f"CIFAR ResNet depth must be 6n + 2 with n ≥ 1, got {depth}.")
    n = (depth - 2) // 6
    return ResNet(num_classes=num_classes, stage_sizes=(n, n, n), block=BasicBlock,
                  stage_widths=(16, 32, 64), cifar_stem=True, arch=f"resnet{depth}", **kwargs)


def resnet20(num_classes: int = 10, **kwargs) -> ResNet:
    """ResNet-20 (CIFAR): 272,474 parameters at 10 classes."""
    return cifar_resnet(20, num_classes, **kwargs)


def resnet56(num_classes: int = 10, **kwargs) -> ResNet:
    """ResNet-56 (CIFAR): 855,770 parameters at 10 classes."""
    return cifar_resnet(56, num_classes, **kwargs)


def resnet110(num_classes: int = 10, **kwargs) -> ResNet:
    """ResNet-110 (CIFAR): 1,730,714 parameters at 10 classes."""
    return cifar_resnet(110, num_classes, **kwargs)


MODELS: dict[str, Callable[..., nn.Module]] = {
    "resnet18": resnet18,
    "resnet34": resnet34,
    "resnet50": resnet50,
    "resnet20": resnet20,
    "resnet56": resnet56,
    "resnet110": resnet110,
}
