"""The 2×2 / stride 2 max-pool between and inside fractal blocks.

`nn.max_pool` lowers to a reduce-window whose gradient XLA:CPU computes with a variadic
reduce-window that tracks argmax indices (iota tensors); in the FractalNet-20 train step that was
28% of all op time. The maximum of the four strided slices has the same forward value and the same
gradient except at exact ties, and ran 4-12× faster forward + backward
(`experiments/benchmark.py --kernels`). JAX's gradient of those slices (interior-padded
scatters, fused with the ReLU and BatchNorm backward around them) then ran at ~16 ns an element
in the train step; "windows" (the default) writes the same gradient in the windows' own layout
(`window_max_pool`), 1.1-1.2× faster for the whole FractalNet-20 train step.

Every implementation pools as `nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")`: an odd
last row or column is dropped (its gradient is zero), and a side under 2 is refused.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from fractal_jax.checks import check_choice
from fractal_jax.config import POOL_IMPLS


def _check_shape(x: jax.Array) -> None:
    """Rejects anything but NHWC with height and width >= 2, which would pool to nothing."""
    if x.ndim != 4 or min(x.shape[1:3]) < 2:
        raise ValueError(f"max_pool_2x2 needs an NHWC array with height and width >= 2, got "
                         f"shape {tuple(x.shape)}.")


def _even_sides(x: jax.Array) -> jax.Array:
    """`x` without an odd last row / column, which a VALID 2×2 / stride 2 window never covers."""
    h, w = x.shape[1:3]
    if h % 2 or w % 2:  # even maps (the model's) stay copy-free
        return x[:, :h - h % 2, :w - w % 2]
    return x


def _windows(x: jax.Array) -> jax.Array:
    """NHWC `x` as (n, h/2, 2, w/2, 2, c): each 2×2 window on axes 2 and 4 (a free reshape)."""
    n, h, w, c = x.shape
    return x.reshape(n, h // 2, 2, w // 2, 2, c)


def _corners(x6: jax.Array) -> list[jax.Array]:
    """The four inputs of every window, each (n, h/2, w/2, c)."""
    return [x6[:, :, i, :, j] for i in (0, 1) for j in (0, 1)]


@jax.custom_vjp
def window_max_pool(x: jax.Array) -> jax.Array:
    """2×2 / stride 2 max-pool of NHWC `x` (even sides) whose gradient goes, in the windows'
    own layout, to every input equal to its window's maximum, divided equally among exact ties
    (as "slices" divides two or four tied inputs; three get 1/4, 1/4, 1/2 there): one
    elementwise pass that XLA fuses with the ReLU and BatchNorm around it.
    Maxima and tie counts come from the four corners (elementwise), not a reduce over the
    window axes, which XLA:CPU ran 5× slower."""
    a, b, c, d = _corners(_windows(x))
    return jnp.maximum(jnp.maximum(a, b), jnp.maximum(c, d))


def _window_forward(x):
    y = window_max_pool(x)
    return y, (x, y)


def _window_backward(residuals, dy):
    x, y = residuals
    x6 = _windows(x)
    ties = sum((corner == y).astype(dy.dtype) for corner in _corners(x6))
    share = (dy / ties)[:, :, None, :, None, :]
    return (jnp.where(x6 == y[:, :, None, :, None, :], share, 0).reshape(x.shape),)


window_max_pool.defvjp(_window_forward, _window_backward)


def max_pool_2x2(x: jax.Array, impl: str = "windows") -> jax.Array:
    """2×2 max-pool with stride 2 of NHWC `x`: the maximum of four strided slices ("windows"
    with its own gradient, or "slices" with JAX's), or `nn.max_pool`'s reduce-window
    ("reduce_window"). Height and width must be >= 2; an odd last row or column is dropped, as
    a VALID pool does (output (n, h // 2, w // 2, c)), and a side under 2 raises ValueError.

    They differ only in the gradient at exact ties, which "windows" and "slices" share between
    the tied inputs (`window_max_pool`) and the reduce-window gives to one; after a ReLU the common tie is at 0,
    where no gradient passes the ReLU either way.
    """
    check_choice("pool_impl", impl, POOL_IMPLS)
    _check_shape(x)
    if impl == "reduce_window":
        return nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")
    x = _even_sides(x)
    if impl == "windows":
        with jax.named_scope("max_pool"):  # the op name the benchmark's profile counts it by
            return window_max_pool(x)
    return jnp.maximum(jnp.maximum(x[:, 0::2, 0::2], x[:, 0::2, 1::2]),
                       jnp.maximum(x[:, 1::2, 0::2], x[:, 1::2, 1::2]))
