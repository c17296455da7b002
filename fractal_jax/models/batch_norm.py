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


def _channel_sum(a: jax.Array) -> jax.Array:
    """Sum over every axis but the last, as a matmul with ones: XLA:CPU's matmul beats its
    reduction. In two levels, so that float32 rounding stays that of XLA's reduction: ones (k)
    @ the (k, r·c) rows sums k ≈ √n terms per entry, then r terms per channel (one level, n
    terms: the variance at mean/std = 10 was 50× less accurate)."""
    rows = a.reshape(-1, a.shape[-1])
    n, c = rows.shape
    r = max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)
    partial = jnp.dot(jnp.ones(n // r, rows.dtype), rows.reshape(n // r, r * c),
                      precision=jax.lax.Precision.HIGHEST)
    return partial.reshape(r, c).sum(0)


def _fused_forward(x, scale, bias, epsilon):
    n = x.size // x.shape[-1]
    x32 = x.astype(jnp.float32)
    # One pass (mean and mean of squares), as the "autodiff" path computes them.
    mean = _channel_sum(x32) / n
    var = jnp.maximum(_channel_sum(jnp.square(x32)) / n - jnp.square(mean), 0.0)
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
            axes = tuple(range(x.ndim - 1))
            x32 = x.astype(jnp.float32)
            mean = x32.mean(axes)
            var = jnp.maximum(jnp.square(x32).mean(axes) - jnp.square(mean), 0.0)
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
