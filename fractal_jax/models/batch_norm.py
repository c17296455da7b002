"""BatchNorm whose running statistics are bias-corrected averages (Caffe's convention).

Flax's `nn.BatchNorm` starts its running mean at 0 and variance at 1 and moves them by
``1 - momentum`` per update, so after n updates the start values still weigh ``momentum**n``. A
FractalNet unit is updated only in the steps whose drop-path plan keeps it alive (about half of
them), so at momentum 0.99 the start values still weighed 17-20% after 300 steps of the digits
default. Caffe's BatchNorm, which the paper used, divides its accumulated sums by the
accumulated weight instead. `BatchNorm` here keeps, per layer, the total weight of its updates,

    weight_n = momentum * weight_{n-1} + (1 - momentum)            (= 1 - momentum**n)

and stores the mean (and variance) averaged over the updates alone,

    mean_n = (momentum * weight_{n-1} * mean_{n-1} + (1 - momentum) * batch_mean) / weight_n,

so the first update sets them to its batch's statistics and a layer fed the same statistics n
times holds exactly them. Eval mode reads ``mean`` and ``var`` exactly as flax does, so
statistics estimated another way (`training/evaluate.py`'s precise statistics) drop in.
Parameters (``scale``, ``bias``) and statistics are named as in flax.

How training-mode normalisation is computed (`impl`, `use_fused`): "autodiff" lets JAX
differentiate the statistics; "fused" (`fused_batch_norm`) has a hand-written backward with two
reductions, and computes every per-channel sum as a matmul with a ones vector. On XLA:CPU the
column reductions of JAX's gradient were the largest cost of a FractalNet-20 train step once its
convolutions and max-pools were fast (54% of op time); "fused" ran 3.7-8.6× faster forward + backward (BatchNorm + ReLU) on every map size of the
benchmark. On an H200 GPU (jax 0.11.2) the fused path made the whole masked FractalNet-20 train
step 1.05× faster (rounds 1.01..1.06; BENCHMARKS.md, GPU). "auto" picks "fused" on CPU and GPU,
and "autodiff" elsewhere (not measured on TPUs).

Statistics are float32 for any input dtype, from sums of the deviations from a per-channel shift
near the mean (a value of the batch), in both paths (`_shifted_moments` for "fused",
`shifted_statistics` for "autodiff" and the precise statistics of `training/evaluate.py`).
E[x²] - E[x]² lost about log10(mean²/var) of float32's 7 digits to cancellation: with 32,768
values per channel its variance was off by 2e-3 (fused) and 7e-2 (autodiff) at |mean| / std =
100, 0.13 and 13× at 10³, and came out 0 at 10⁴ (every digit lost); now by under 1e-5 at any
ratio up to 10⁵ (tests/test_kernels.py).
"""
from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from fractal_jax.checks import check_choice
from fractal_jax.config import BN_IMPLS

FUSED_BACKENDS = ("cpu", "gpu")  # where "auto" fuses: measured faster on both



def use_fused(impl: str, platform: str | None = None) -> bool:
    """Whether training-mode BatchNorm uses `fused_batch_norm`: always for "fused", never for
    "autodiff", and for "auto" on the backends where it measured faster (CPU, GPU)."""
    check_choice("bn_impl", impl, BN_IMPLS)
    if impl != "auto":
        return impl == "fused"
    return (platform or jax.default_backend()) in FUSED_BACKENDS


def shifted_statistics(x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(shift, offset, var) of `x` over every axis but the last, in float32 for any dtype: the
    mean is shift + offset (summed in float64 it keeps digits that a float32 mean far from 0
    rounds off), var the biased variance, with XLA's reductions of the deviations d from the
    shift, the first row's values: E[d²] - E[d]² cancels digits of ((mean - shift) / std)²
    only. Two passes would not do here: under our XLA:CPU flags the reduction's mean is off by
    4e-6 of itself, 0.04 std at |mean| / std = 10⁴, and the variance by its square. The shift
    is a constant to autodiff (the statistics do not depend on it)."""
    axes = tuple(range(x.ndim - 1))
    x32 = x.astype(jnp.float32)
    shift = jax.lax.stop_gradient(x32.reshape(-1, x.shape[-1])[0])
    d = x32 - shift
    offset = d.mean(axes)
    return shift, offset, jnp.maximum(jnp.square(d).mean(axes) - jnp.square(offset), 0.0)


def batch_statistics(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(mean, biased variance) of `x` over every axis but the last, in float32:
    `shifted_statistics` with the mean summed."""
    shift, offset, var = shifted_statistics(x)
    return shift + offset, var


def _num_blocks(n: int) -> int:
    """r, the largest divisor of `n` up to √n: `_channel_sum` sums n rows as r blocks."""
    return max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)


def _channel_sum(a: jax.Array) -> jax.Array:
    """Sum over every axis but the last, as a matmul with ones: XLA:CPU's matmul beats its
    reduction. In two levels, so that float32 rounding stays that of XLA's reduction: ones (k)
    @ the (k, r·c) rows sums k ≈ √n terms per entry, then r terms per channel (one level, n
    terms: the one-pass variance at mean/std = 10 was 50× less accurate)."""
    rows = a.reshape(-1, a.shape[-1])
    n, c = rows.shape
    r = _num_blocks(n)
    partial = jnp.dot(jnp.ones(n // r, rows.dtype), rows.reshape(n // r, r * c),
                      precision=jax.lax.Precision.HIGHEST)
    return partial.reshape(r, c).sum(0)


def _shifted_moments(x32: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(mean, var) over every axis but the last, from `_channel_sum`'s two-level matmul sums of
    the deviations d from a shift: E[d²] - E[d]² cancels digits of ((mean - shift) / std)²
    only, not of (mean / std)². Each of the r·c columns of the (k, r·c) view is shifted by its
    first row (one of its own values, so a few std from the mean at most), then the r block
    sums of a channel are moved to one shift. Measured on the paper-mix train step (CPU), two
    passes (the mean, then deviations from it) were 4% slower and one shift per channel 3%:
    on XLA:CPU a fusion that broadcasts a per-channel vector over the (k, r·c) view takes
    ~1.5× as long as one that broadcasts a row of it."""
    rows = x32.reshape(-1, x32.shape[-1])
    n, c = rows.shape
    r = _num_blocks(n)
    k = n // r
    columns = rows.reshape(k, r * c)
    shift = columns[0]
    d = columns - shift
    ones = jnp.ones(k, jnp.float32)
    s1 = jnp.dot(ones, d, precision=jax.lax.Precision.HIGHEST).reshape(r, c)
    s2 = jnp.dot(ones, jnp.square(d), precision=jax.lax.Precision.HIGHEST).reshape(r, c)
    # Sums about the first block's shift: delta is a difference of two samples (~ std).
    delta = shift.reshape(r, c) - shift[:c]
    offset = (s1 + k * delta).sum(0) / n
    mean_square = (s2 + delta * (2 * s1 + k * delta)).sum(0) / n
    return shift[:c] + offset, jnp.maximum(mean_square - jnp.square(offset), 0.0)


def _fused_forward(x, scale, bias, epsilon):
    x32 = x.astype(jnp.float32)
    mean, var = _shifted_moments(x32)
    rstd = jax.lax.rsqrt(var + epsilon)
    y = (x32 - mean) * (rstd * scale) + bias
    return (y, mean, var), (x, mean, rstd, scale)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def fused_batch_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float
                     ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(y, mean, var): `x` normalised over every axis but the last by its batch statistics,
    times `scale` plus `bias`, in float32. The statistics outputs carry no gradient: they feed
    only the running averages, which are never differentiated."""
    return _fused_forward(x, scale, bias, epsilon)[0]


def _fused_backward(epsilon, residuals, cotangents):
    x, mean, rstd, scale = residuals
    dy = cotangents[0].astype(jnp.float32)
    n = x.size // x.shape[-1]
    xhat = (x.astype(jnp.float32) - mean) * rstd
    dbias = _channel_sum(dy)
    dscale = _channel_sum(dy * xhat)
    # d/dx of scale * xhat: the two reductions are also the parameters' gradients.
    dx = (scale * rstd) * (dy - dbias / n - xhat * (dscale / n))
    return dx.astype(x.dtype), dscale, dbias


fused_batch_norm.defvjp(_fused_forward, _fused_backward)


class BatchNorm(nn.Module):
    """Batch normalisation over every axis but the last, with bias-corrected running averages."""

    use_running_average: bool | None = None
    momentum: float = 0.99
    epsilon: float = 1e-5
    use_scale: bool = True
    use_bias: bool = True
    dtype: Any = None
    impl: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, use_running_average: bool | None = None) -> jax.Array:
        use_running_average = nn.merge_param("use_running_average", self.use_running_average,
                                             use_running_average)
        features = (x.shape[-1],)
        mean_stat = self.variable("batch_stats", "mean", jnp.zeros, features, jnp.float32)
        var_stat = self.variable("batch_stats", "var", jnp.ones, features, jnp.float32)
        weight = self.variable("batch_stats", "weight", jnp.zeros, (), jnp.float32)
        scale = (self.param("scale", nn.initializers.ones, features, jnp.float32)
                 if self.use_scale else None)
        bias = (self.param("bias", nn.initializers.zeros, features, jnp.float32)
                if self.use_bias else None)
        fused = not use_running_average and use_fused(self.impl)
        if use_running_average:
            mean, var = mean_stat.value, var_stat.value
        elif fused:
            ones, zeros = jnp.ones(features, jnp.float32), jnp.zeros(features, jnp.float32)
            y, mean, var = fused_batch_norm(x, ones if scale is None else scale,
                                            zeros if bias is None else bias, self.epsilon)
        else:
            # Statistics in float32 whatever the compute dtype, as flax does.
            mean, var = batch_statistics(x)
        if not use_running_average and not self.is_initializing():
            m = self.momentum
            new_weight = m * weight.value + (1.0 - m)
            mean_stat.value = (m * weight.value * mean_stat.value + (1.0 - m) * mean) / new_weight
            var_stat.value = (m * weight.value * var_stat.value + (1.0 - m) * var) / new_weight
            weight.value = new_weight
        if not fused:
            y = (x.astype(jnp.float32) - mean) * jax.lax.rsqrt(var + self.epsilon)
            if scale is not None:
                y = y * scale
            if bias is not None:
                y = y + bias
        return y.astype(self.dtype or x.dtype)
