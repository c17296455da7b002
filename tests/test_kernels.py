"""Convolution, max-pool and BatchNorm implementations: each equals the plain op, values and
gradients; hashed dropout keeps elements at its rate, reproducibly."""
import functools
import re

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fractal_jax.models import batch_norm, conv, pool
from fractal_jax.models.dropout import hash_dropout
from fractal_jax.models.registry import fractalnet


def _conv_xla(x, kernel, strides, padding):
    return jax.lax.conv_general_dilated(x, kernel, strides, padding,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


@pytest.mark.parametrize("hw,cin,cout,strides,padding,ksize", [
    (2, 16, 8, (1, 1), ((1, 1), (1, 1)), 3),   # the last block's 2×2 maps
    (8, 3, 4, (1, 1), ((1, 1), (1, 1)), 3),    # an image input
    (7, 4, 6, (2, 2), ((1, 1), (1, 1)), 3),    # strided, odd size
    (8, 4, 5, (1, 1), ((0, 0), (0, 0)), 3),    # no padding
    (9, 3, 4, (2, 2), ((3, 3), (3, 3)), 7),    # a stem-like 7×7/2
])
def test_patches_conv_equals_xla_conv_in_value_and_gradients(hw, cin, cout, strides, padding,
                                                             ksize):
    kx, kk, ky = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (3, hw, hw, cin))
    kernel = jax.random.normal(kk, (ksize, ksize, cin, cout))
    outs = []
    for fn in (conv.patches_conv, _conv_xla):
        def value_and_vjp(a, b, fn=fn):
            y, vjp = jax.vjp(lambda a, b: fn(a, b, strides, padding), a, b)
            return y, vjp(jax.random.normal(ky, y.shape))
        outs.append(jax.jit(value_and_vjp)(x, kernel))
    (ours, grads), (ref, ref_grads) = outs
    assert ours.shape == ref.shape
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)
    for g, r in zip(grads, ref_grads):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-4)


def test_auto_uses_patches_only_where_they_measured_faster_on_cpu():
    assert conv.use_patches("auto", (2, 2), 128, (1, 1), "cpu")
    assert conv.use_patches("auto", (32, 32), 3, (1, 1), "cpu")
    assert not conv.use_patches("auto", (4, 4), 128, (1, 1), "cpu")
    assert not conv.use_patches("auto", (2, 2), 128, (2, 2), "cpu")
    assert not conv.use_patches("auto", (2, 2), 128, (1, 1), "gpu")  # not measured there
    assert conv.use_patches("patches", (32, 32), 64, (1, 1), "gpu")
    assert not conv.use_patches("xla", (2, 2), 128, (1, 1), "cpu")
    with pytest.raises(ValueError, match="conv_impl='winograd' is invalid: it must be one of"):
        conv.use_patches("winograd", (2, 2), 8, (1, 1), "cpu")


def test_conv_module_has_nn_conv_parameters():
    x = jnp.ones((1, 4, 4, 3))
    ours = conv.Conv(8).init(jax.random.key(0), x)
    ref = nn.Conv(8, (3, 3), padding=((1, 1), (1, 1)), use_bias=False).init(
        jax.random.key(0), x)
    assert jax.tree.map(jnp.shape, ours) == jax.tree.map(jnp.shape, ref)
    np.testing.assert_array_equal(ours["params"]["kernel"], ref["params"]["kernel"])


def test_max_pools_equal_reduce_window_in_value_and_gradients():
    x = jax.random.normal(jax.random.key(1), (2, 8, 6, 3))
    dy = jax.random.normal(jax.random.key(2), (2, 4, 3, 3))
    values, grads = {}, {}
    for impl in pool.POOL_IMPLS:
        values[impl], grads[impl] = jax.jit(lambda a, impl=impl: (
            lambda y, vjp: (y, vjp(dy)[0]))(*jax.vjp(lambda b: pool.max_pool_2x2(b, impl), a)))(x)
    for impl in pool.POOL_IMPLS:
        np.testing.assert_array_equal(values[impl], values["reduce_window"])
        np.testing.assert_array_equal(grads[impl], grads["reduce_window"])
    with pytest.raises(ValueError, match="pool_impl='average' is invalid: it must be one of"):
        pool.max_pool_2x2(x, "average")


@pytest.mark.parametrize("impl", pool.POOL_IMPLS)
@pytest.mark.parametrize("hw", [(2, 2), (3, 4), (4, 3), (5, 5), (7, 6), (2, 9)])
def test_max_pools_of_any_size_equal_a_valid_max_pool(impl, hw):
    """Odd sides drop their last row / column, as VALID pooling does: the same values, and on
    continuous inputs (no ties) the same gradients, zero on the dropped row / column."""
    x = jax.random.normal(jax.random.key(1), (2, *hw, 3))
    y_ref, vjp_ref = jax.vjp(lambda a: nn.max_pool(a, (2, 2), strides=(2, 2), padding="VALID"), x)
    y, vjp = jax.vjp(lambda a: pool.max_pool_2x2(a, impl), x)
    assert y.shape == y_ref.shape == (2, hw[0] // 2, hw[1] // 2, 3)
    np.testing.assert_array_equal(y, y_ref)
    dy = jax.random.normal(jax.random.key(2), y.shape)
    (dx,), (dx_ref,) = vjp(dy), vjp_ref(dy)
    np.testing.assert_array_equal(dx, dx_ref)
    assert not np.asarray(dx)[:, 2 * (hw[0] // 2):].any()
    assert not np.asarray(dx)[:, :, 2 * (hw[1] // 2):].any()


@pytest.mark.parametrize("impl", pool.POOL_IMPLS)
@pytest.mark.parametrize("shape", [(2, 1, 4, 3), (2, 4, 1, 3), (1, 1, 1, 1), (2, 0, 6, 3),
                                   (4, 4, 3)])
def test_max_pools_refuse_maps_smaller_than_a_window(impl, shape):
    with pytest.raises(ValueError, match=r"height and width >= 2, got shape "
                                         + re.escape(str(shape))):
        pool.max_pool_2x2(jnp.ones(shape), impl)


def test_window_max_pool_shares_the_gradient_among_ties_as_slices_do():
    x = jax.nn.relu(jax.random.normal(jax.random.key(1), (2, 4, 6, 3)))
    x = x.at[0, 0, 0, 0].set(0.7).at[0, 1, 1, 0].set(0.7)  # a non-zero tie: half each
    x = x.at[1, 2:4, 2:4, 1].set(0.5)  # a four-way tie: a quarter each
    dy = jax.random.normal(jax.random.key(2), (2, 2, 3, 3))
    grads = {impl: jax.vjp(lambda a, impl=impl: pool.max_pool_2x2(a, impl), x)[1](dy)[0]
             for impl in ("windows", "slices")}
    np.testing.assert_array_equal(grads["windows"], grads["slices"])
    np.testing.assert_allclose(grads["windows"][1, 2:4, 2:4, 1], dy[1, 1, 1, 1] / 4)


def test_implementations_leave_parameters_and_training_results_alone():
    """A FractalNet's parameters do not depend on conv_impl / pool_impl / bn_impl, and a
    train-mode forward and backward pass (every convolution as patches, 2×2 maps in the last
    block, fused BatchNorm) agrees with the plain ops within float tolerance, BatchNorm
    statistics included."""
    x = jax.random.normal(jax.random.key(3), (4, 8, 8, 3))
    kwargs = dict(num_blocks=2, num_columns=3, widths=(4, 8), dropout=(0.0, 0.2))
    models = {impls: fractalnet(5, conv_impl=impls[0], pool_impl=impls[1], bn_impl=impls[2],
                                **kwargs)
              for impls in (("xla", "reduce_window", "autodiff"), ("patches", "slices", "fused"),
                            ("auto", "windows", "auto"))}
    variables = {k: m.init(jax.random.key(0), x) for k, m in models.items()}
    first = next(iter(variables.values()))
    for v in variables.values():
        assert jax.tree.structure(v) == jax.tree.structure(first)
        jax.tree.map(np.testing.assert_array_equal, v, first)

    def loss(params, model):
        logits, updates = model.apply({"params": params, "batch_stats": first["batch_stats"]}, x,
                                train=True, rngs={"dropout": jax.random.key(4)},
                                mutable=["batch_stats"])
        return (logits ** 2).mean(), updates

    results = [jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)(
        first["params"], m) for m in models.values()]
    close = functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-5)
    for (value, stats), grads in results[1:]:
        np.testing.assert_allclose(value, results[0][0][0], rtol=1e-5)
        jax.tree.map(close, grads, results[0][1])
        jax.tree.map(close, stats, results[0][0][1])


def _batch_norm_pass(impl, x, variables, dy):
    """y, the updated statistics and the gradients (x, params) of a train-mode BatchNorm."""
    layer = batch_norm.BatchNorm(momentum=0.9, impl=impl, use_scale="params" in variables,
                                 use_bias="params" in variables)

    def f(x, params):
        y, updates = layer.apply({**variables, **params}, x, use_running_average=False,
                                 mutable=["batch_stats"])
        return y, updates["batch_stats"]

    params = {k: v for k, v in variables.items() if k == "params"}
    y, vjp, stats = jax.vjp(f, x, params, has_aux=True)
    return y, stats, vjp(dy)


@pytest.mark.parametrize("dtype,affine", [(jnp.float32, True), (jnp.float32, False),
                                          (jnp.bfloat16, True)])
@pytest.mark.parametrize("shape", [(8, 6, 6, 5), (32, 2, 2, 16)])
def test_fused_batch_norm_equals_autodiff_in_values_gradients_and_statistics(dtype, affine,
                                                                             shape):
    kx, ks, kb, ky = jax.random.split(jax.random.key(5), 4)
    x = (3.0 * jax.random.normal(kx, shape) + 1.5).astype(dtype)
    dy = jax.random.normal(ky, shape).astype(dtype)
    layer = batch_norm.BatchNorm(use_scale=affine, use_bias=affine)
    variables = layer.init(jax.random.key(0), x, use_running_average=True)
    if affine:  # parameters away from their (1, 0) initial values
        variables["params"] = {"scale": 1 + jax.random.normal(ks, shape[-1:]),
                               "bias": jax.random.normal(kb, shape[-1:])}
    # Running statistics after one update, then after a second from them (bias correction).
    out = {}
    for impl in ("autodiff", "fused"):
        y, stats, grads = jax.jit(functools.partial(_batch_norm_pass, impl))(x, variables, dy)
        _, stats2, _ = jax.jit(functools.partial(_batch_norm_pass, impl))(
            x * 2, {**variables, "batch_stats": stats}, dy)
        out[impl] = (y, stats, stats2, grads)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == jnp.float32 else dict(rtol=2e-2, atol=2e-2)
    for ours, ref in zip(jax.tree.leaves(out["fused"]), jax.tree.leaves(out["autodiff"])):
        assert ours.dtype == ref.dtype
        np.testing.assert_allclose(np.asarray(ours, np.float32), np.asarray(ref, np.float32),
                                   **tol)
    assert out["fused"][0].dtype == dtype
    assert out["fused"][1]["mean"].dtype == jnp.float32  # statistics in float32 for any dtype
    np.testing.assert_allclose(out["fused"][1]["mean"],
                               np.asarray(x, np.float32).mean((0, 1, 2)), rtol=1e-5, atol=1e-5)


def test_fused_batch_norm_statistics_are_as_accurate_as_the_autodiff_path():
    """float32 sums of 32,768 rows: the fused path's (matmul) variance, with the mean 10
    standard deviations from 0, is within 3× of the error of the reduction path."""
    x = np.random.default_rng(0).normal(10.0, 1.0, (32, 32, 32, 4)).astype(np.float32)
    exact = x.astype(np.float64).var((0, 1, 2))
    errors = {}
    for impl in ("autodiff", "fused"):
        _, stats, _ = jax.jit(functools.partial(_batch_norm_pass, impl))(
            x, {"batch_stats": {"mean": jnp.zeros(4), "var": jnp.ones(4), "weight": 0.0}},
            jnp.zeros_like(x))
        errors[impl] = np.abs(np.asarray(stats["var"], np.float64) - exact).max() / exact.max()
    assert errors["fused"] < max(3 * errors["autodiff"], 1e-6), errors


# (|mean| / std, std) of inputs far from zero: 32,768 values per channel.
FAR_FROM_ZERO = [(1.0, 1.0), (10.0, 1.0), (100.0, 1.0), (1e3, 1.0), (1e4, 1.0), (1e5, 1e-2)]
# bfloat16 keeps 8 bits: at 10⁴ every value of std 1 rounds to the same one.
FAR_FROM_ZERO_BF16 = [(1.0, 1.0), (10.0, 1.0), (100.0, 1.0), (1e3, 1.0)]


def far_from_zero(ratio, std, dtype=jnp.float32, shape=(32, 32, 32, 4), seed=0):
    """Normal values with |mean| / std = `ratio` (channel signs alternate), rounded to `dtype`."""
    signs = np.resize([1.0, -1.0], shape[-1])
    x = np.random.default_rng(seed).normal(signs * ratio * std, std, shape)
    return jnp.asarray(x, jnp.float32).astype(dtype)


@functools.cache
def _train_statistics(impl):
    """x -> the (mean, var) of a train-mode BatchNorm of `impl` (jit-compiled): its running
    statistics after one update at momentum 0."""
    layer = batch_norm.BatchNorm(momentum=0.0, impl=impl)

    def statistics(x):
        variables = layer.init(jax.random.key(0), x, use_running_average=True)
        _, updates = layer.apply(variables, x, use_running_average=False,
                                 mutable=["batch_stats"])
        return updates["batch_stats"]["mean"], updates["batch_stats"]["var"]
    return jax.jit(statistics)


@pytest.mark.parametrize("impl", ["autodiff", "fused"])
@pytest.mark.parametrize("dtype,ratio,std",
                         [(jnp.float32, *case) for case in FAR_FROM_ZERO]
                         + [(jnp.bfloat16, *case) for case in FAR_FROM_ZERO_BF16])
def test_batch_norm_statistics_far_from_zero_match_float64(impl, dtype, ratio, std):
    """Sums of deviations from a shift keep float32's digits at any |mean| / std (E[x²] - E[x]²
    was off by 2e-3 fused and 7e-2 autodiff at 100, and lost every digit from 10⁴): the mean
    within float32's rounding, the variance within 1e-4; bfloat16 inputs get float32
    statistics, compared with float64 statistics of the bfloat16 values."""
    x = far_from_zero(ratio, std, dtype)
    mean, var = _train_statistics(impl)(x)
    chex.assert_type([mean, var], jnp.float32)
    exact = np.asarray(x, np.float64)
    np.testing.assert_allclose(var, exact.var((0, 1, 2)), rtol=1e-4)
    np.testing.assert_allclose(mean, exact.mean((0, 1, 2)), rtol=2 ** -23, atol=1e-5 * std)


def test_auto_fuses_batch_norm_where_it_measured_faster():
    assert batch_norm.use_fused("auto", "cpu")
    assert batch_norm.use_fused("auto", "gpu")
    assert not batch_norm.use_fused("auto", "tpu")  # not measured there
    assert batch_norm.use_fused("fused", "tpu")
    assert not batch_norm.use_fused("autodiff", "cpu")
    with pytest.raises(ValueError, match="bn_impl='cudnn' is invalid: it must be one of"):
        batch_norm.use_fused("cudnn")


@pytest.mark.parametrize("rate", [0.1, 0.4, 0.9])
def test_hash_dropout_keeps_at_the_rate_reproducibly(rate):
    x = jnp.ones((64, 16, 16, 8))
    fn = jax.jit(hash_dropout, static_argnums=(2,))
    y = np.asarray(fn(jax.random.key(0), x, rate))
    kept = y != 0
    # 131,072 draws: the keep fraction is within 5 standard deviations of 1 - rate.
    assert abs(kept.mean() - (1 - rate)) < 5 * np.sqrt(rate * (1 - rate) / kept.size)
    np.testing.assert_allclose(y[kept], 1 / (1 - rate), rtol=1e-6)
    np.testing.assert_array_equal(fn(jax.random.key(0), x, rate), y)  # same key, same mask
    other = np.asarray(fn(jax.random.key(1), x, rate)) != 0
    assert abs((kept == other).mean() - (rate ** 2 + (1 - rate) ** 2)) < 0.01  # independent
    # Channel dropout: one draw per (example, channel), shared over the map.
    c = np.asarray(hash_dropout(jax.random.key(2), x, rate, (1, 2))) != 0
    assert (c == c[:, :1, :1, :]).all() and c.any() and not c.all()


def test_hash_dropout_is_exact_at_rates_0_and_1_and_its_gradient_is_the_mask():
    x = jax.random.normal(jax.random.key(0), (4, 3, 3, 2))
    np.testing.assert_array_equal(hash_dropout(jax.random.key(1), x, 0.0), x)
    np.testing.assert_array_equal(hash_dropout(jax.random.key(1), x, 1.0), jnp.zeros_like(x))
    y, vjp = jax.vjp(lambda a: hash_dropout(jax.random.key(1), a, 0.5), x)
    (dx,) = vjp(jnp.ones_like(x))
    np.testing.assert_array_equal(dx, np.where(np.asarray(y) != 0, 2.0, 0.0))
