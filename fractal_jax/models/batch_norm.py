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
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


class BatchNorm(nn.Module):
    """Batch normalisation over every axis but the last, with bias-corrected running averages."""

    use_running_average: bool | None = None
    momentum: float = 0.99
    epsilon: float = 1e-5
    use_scale: bool = True
    use_bias: bool = True
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, use_running_average: bool | None = None) -> jax.Array:
        use_running_average = nn.merge_param("use_running_average", self.use_running_average,
                                             use_running_average)
        features = (x.shape[-1],)
        mean_stat = self.variable("batch_stats", "mean", jnp.zeros, features, jnp.float32)
        var_stat = self.variable("batch_stats", "var", jnp.ones, features, jnp.float32)
        weight = self.variable("batch_stats", "weight", jnp.zeros, (), jnp.float32)
        if use_running_average:
            mean, var = mean_stat.value, var_stat.value
        else:
            # Statistics in float32 whatever the compute dtype, as flax does.
            axes = tuple(range(x.ndim - 1))
            x32 = x.astype(jnp.float32)
            mean = x32.mean(axes)
            var = jnp.maximum(jnp.square(x32).mean(axes) - jnp.square(mean), 0.0)
            if not self.is_initializing():
                m = self.momentum
                new_weight = m * weight.value + (1.0 - m)
                mean_stat.value = (m * weight.value * mean_stat.value + (1.0 - m) * mean) / new_weight
                var_stat.value = (m * weight.value * var_stat.value + (1.0 - m) * var) / new_weight
                weight.value = new_weight
        y = (x.astype(jnp.float32) - mean) * jax.lax.rsqrt(var + self.epsilon)
        if self.use_scale:
            y = y * self.param("scale", nn.initializers.ones, features, jnp.float32)
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, features, jnp.float32)
        return y.astype(self.dtype or x.dtype)
