"""ResNeXt (Xie et al. 2017): ResNet-50's layout with grouped 3×3 convs in wider bottlenecks."""
from __future__ import annotations

import functools
from typing import Callable

import flax.linen as nn

from fractal_jax.models.resnet import Bottleneck, ResNet


def resnext50_32x4d(num_classes: int = 1000, **kwargs) -> ResNet:
    """ResNeXt-50 32×4d (torchvision layout): 25,028,904 parameters at 1000 classes.

    Each bottleneck's 3×3 conv has 32 groups of 4·(stage width / 64) channels.
    """
    block = functools.partial(Bottleneck, groups=32, width_per_group=4)
    return ResNet(num_classes=num_classes, stage_sizes=(3, 4, 6, 3), block=block,
                  arch="resnext50_32x4d", **kwargs)


MODELS: dict[str, Callable[..., nn.Module]] = {"resnext50_32x4d": resnext50_32x4d}
