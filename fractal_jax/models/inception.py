"""GoogLeNet / Inception v1 (Szegedy et al. 2015) in torchvision's layout.

Matches torchvision's `GoogLeNet(aux_logits=False, transform_input=False)`, including its quirks:
BatchNorm after every conv (eps 1e-3) and a 3×3 kernel in the branch the paper calls "5×5".
"""
from __future__ import annotations

import functools
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from fractal_jax.models.layers import ConvBN, check_input, global_avg_pool

# torchvision's BasicConv2d: bias-free conv, BatchNorm with eps 1e-3, ReLU.
BasicConv = functools.partial(ConvBN, epsilon=1e-3)

# Inception blocks per stage as (1×1, 3×3 reduce, 3×3, "5×5" reduce, "5×5", pool projection)
# channel counts; each stage follows a stride-2 ceil-mode max-pool with the given window.
STAGES: tuple[tuple[int, tuple[tuple[int, ...], ...]], ...] = (
    (3, ((64, 96, 128, 16, 32, 32),  # inception3a, stride 8
         (128, 128, 192, 32, 96, 64))),
    (3, ((192, 96, 208, 16, 48, 64),  # inception4a, stride 16
         (160, 112, 224, 24, 64, 64),
         (128, 128, 256, 24, 64, 64),
         (112, 144, 288, 32, 64, 64),
         (256, 160, 320, 32, 128, 128))),
    (2, ((256, 160, 320, 32, 128, 128),  # inception5a, stride 32
         (384, 192, 384, 48, 128, 128))),
)


def max_pool_ceil(x: jax.Array, window: int, stride: int, padding: int = 0) -> jax.Array:
    """Max-pool as PyTorch's `MaxPool2d(ceil_mode=True)`: keeps a last, partial window.

    Returns a map of ceil((size + 2·padding - window) / stride) + 1 per side, minus one if the
    last window would start in the right padding (PyTorch's rule); the extra high-side padding
    is -inf, so it never wins the max.
    """
    pads = []
    for size in x.shape[1:3]:
        out = -(-(size + 2 * padding - window) // stride) + 1
        if (out - 1) * stride >= size + padding:
            out -= 1
        pads.append((padding, (out - 1) * stride + window - size - padding))
    return nn.max_pool(x, (window, window), strides=(stride, stride), padding=pads)


class InceptionBlock(nn.Module):
    """Four parallel branches concatenated on channels.

    Branches: 1×1; 1×1 → 3×3; 1×1 → 3×3 (the paper's 5×5, a 3×3 in torchvision);
    3×3/1 max-pool → 1×1. Output channels: ch1x1 + ch3x3 + ch5x5 + pool_proj.
    """

    ch1x1: int
    ch3x3_reduce: int
    ch3x3: int
    ch5x5_reduce: int
    ch5x5: int
    pool_proj: int

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        def chain(y: jax.Array, *convs: nn.Module) -> jax.Array:
            for layer in convs:
                y = layer(y, train=train)
            return y

        return jnp.concatenate([
            chain(x, BasicConv(self.ch1x1, 1)),
            chain(x, BasicConv(self.ch3x3_reduce, 1), BasicConv(self.ch3x3, 3)),
            chain(x, BasicConv(self.ch5x5_reduce, 1), BasicConv(self.ch5x5, 3)),
            chain(max_pool_ceil(x, 3, 1, padding=1), BasicConv(self.pool_proj, 1)),
        ], axis=-1)


class GoogLeNet(nn.Module):
    """GoogLeNet without auxiliary heads: stem, three stages of Inception blocks, GAP, dropout, FC.

    `__call__` returns logits (N, num_classes), or with `features=True` four NHWC maps: the stem
    output (192 channels, stride 4) and the last block of each stage (480, 832 and 1024 channels
    at strides 8, 16, 32).
    """

    num_classes: int
    dropout_rate: float = 0.2
    arch: str = "googlenet"

    min_input_size = 32  # total stride; a class constant, not a field

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False,
                 features: bool = False) -> jax.Array | tuple[jax.Array, ...]:
        check_input(x, self.arch, self.min_input_size)
        x = BasicConv(64, 7, strides=2, name="conv1")(x, train=train)
        x = max_pool_ceil(x, 3, 2)
        x = BasicConv(64, 1, name="conv2")(x, train=train)
        x = BasicConv(192, 3, name="conv3")(x, train=train)
        stage_maps = [x]
        for stage, (pool_window, blocks) in enumerate(STAGES):
            x = max_pool_ceil(x, pool_window, 2)
            for index, channels in enumerate(blocks):
                x = InceptionBlock(*channels, name=f"inception{stage + 3}{'abcde'[index]}")(
                    x, train=train)
            stage_maps.append(x)
        if features:
            return tuple(stage_maps)
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(global_avg_pool(x))
        return nn.Dense(self.num_classes, name="classifier")(x)


def googlenet(num_classes: int = 1000, **kwargs) -> GoogLeNet:
    """GoogLeNet (torchvision layout, no auxiliary heads): 6,624,904 parameters at 1000 classes."""
    return GoogLeNet(num_classes=num_classes, **kwargs)


MODELS: dict[str, Callable[..., nn.Module]] = {"googlenet": googlenet}
