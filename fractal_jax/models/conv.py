"""The 3×3 convolution of a conv unit, implemented per shape and backend.

XLA:CPU runs convolutions on tiny feature maps badly: FractalNet's last block (2×2 maps, 128+
channels) ran at ~20 GFLOP/s forward + backward, while the same convolution written as patches
(the 9 shifted copies of the padded input, concatenated on the channel axis) times one matmul
ran ~6× faster with equal results. On larger maps XLA's convolution wins. `conv2d` chooses per
shape (`use_patches`); the choice is static, so every program compiles to one plain graph.
`Conv` is a drop-in for ``nn.Conv(features, (kh, kw), padding=..., use_bias=False)``: same
parameter name (``kernel``), shape (HWIO) and initialiser, so checkpoints do not depend on it.
"""
from __future__ import annotations

from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from fractal_jax.checks import check_choice
from fractal_jax.config import CONV_IMPLS

# Where "auto" uses patches on CPU. Measured on a 2-core CPU, 3×3 convolutions forward +
# backward, batch 32 (`experiments/benchmark.py --kernels` times every shape): patches ran
# 7.5× faster on 2×2 maps and 1.5× on 3-channel image inputs; XLA's convolution won everywhere
# else (patches 0.24-0.9×, 4×4 maps included).
PATCHES_MAX_PIXELS = 4
PATCHES_MAX_IN_FEATURES = 3

Padding = Sequence[tuple[int, int]]


def use_patches(impl: str, spatial: tuple[int, int], in_features: int,
                strides: tuple[int, int], platform: str | None = None) -> bool:
    """Whether `conv2d` computes with patches + matmul: always for "patches", never for "xla",
    and for "auto" on CPU with stride 1 when the map has at most PATCHES_MAX_PIXELS pixels or
    the input at most PATCHES_MAX_IN_FEATURES channels. Other backends keep XLA's convolution
    under "auto" (not measured there)."""
    check_choice("conv_impl", impl, CONV_IMPLS)
    if impl != "auto":
        return impl == "patches"
    platform = platform or jax.default_backend()
    return (platform == "cpu" and tuple(strides) == (1, 1)
            and (spatial[0] * spatial[1] <= PATCHES_MAX_PIXELS
                 or in_features <= PATCHES_MAX_IN_FEATURES))


def patches_conv(x: jax.Array, kernel: jax.Array, strides: tuple[int, int],
                 padding: Padding) -> jax.Array:
    """NHWC `x` convolved with HWIO `kernel` as one matmul over the (kh, kw, cin) patches."""
    kh, kw, cin, cout = kernel.shape
    x = jnp.pad(x, ((0, 0), *padding, (0, 0)))
    sh, sw = strides
    out_h = (x.shape[1] - kh) // sh + 1
    out_w = (x.shape[2] - kw) // sw + 1
    # Shifted windows in (kh, kw) order, channels innermost: the order of kernel.reshape below.
    patches = jnp.concatenate(
        [x[:, i:i + sh * (out_h - 1) + 1:sh, j:j + sw * (out_w - 1) + 1:sw, :]
         for i in range(kh) for j in range(kw)], axis=-1)
    return jax.lax.dot_general(patches, kernel.reshape(kh * kw * cin, cout),
                               (((3,), (0,)), ((), ())))


def conv2d(x: jax.Array, kernel: jax.Array, strides: tuple[int, int] = (1, 1),
           padding: Padding = ((1, 1), (1, 1)), impl: str = "auto") -> jax.Array:
    """NHWC `x` convolved with HWIO `kernel` (no bias), by XLA's convolution or patches +
    matmul as `use_patches` decides; both give the same result within float tolerance."""
    if use_patches(impl, x.shape[1:3], x.shape[-1], strides):
        return patches_conv(x, kernel, strides, padding)
    return jax.lax.conv_general_dilated(x, kernel, strides, padding,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


class Conv(nn.Module):
    """A bias-free 2-D convolution whose implementation follows `impl` (see `conv2d`).

    Parameters match ``nn.Conv(features, kernel_size, use_bias=False)``: one ``kernel`` of shape
    (kh, kw, in_features, features).
    """

    features: int
    kernel_size: tuple[int, int] = (3, 3)
    strides: tuple[int, int] = (1, 1)
    padding: Padding = ((1, 1), (1, 1))
    kernel_init: Callable = nn.initializers.lecun_normal()
    dtype: str | None = None
    impl: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", self.kernel_init,
                            (*self.kernel_size, x.shape[-1], self.features), jnp.float32)
        x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
        return conv2d(x, kernel, self.strides, self.padding, self.impl)
