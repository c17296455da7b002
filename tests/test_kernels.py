"""Convolution and max-pool implementations: each equals XLA's own op, values and gradients."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fractal_jax.models import conv, pool
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


def test_slice_max_pool_equals_reduce_window_in_value_and_gradients():
    x = jax.random.normal(jax.random.key(1), (2, 8, 6, 3))
    dy = jax.random.normal(jax.random.key(2), (2, 4, 3, 3))
    values, grads = {}, {}
    for impl in pool.POOL_IMPLS:
        values[impl], grads[impl] = jax.jit(lambda a, impl=impl: (
            lambda y, vjp: (y, vjp(dy)[0]))(*jax.vjp(lambda b: pool.max_pool_2x2(b, impl), a)))(x)
    np.testing.assert_array_equal(values["slices"], values["reduce_window"])
    np.testing.assert_array_equal(grads["slices"], grads["reduce_window"])
    with pytest.raises(ValueError, match="pool_impl='average' is invalid: it must be one of"):
        pool.max_pool_2x2(x, "average")


def test_implementations_leave_parameters_and_training_results_alone():
    """A FractalNet's parameters do not depend on conv_impl / pool_impl, and a train-mode
    forward and backward pass (every convolution as patches, 2×2 maps in the last block)
    agrees with XLA's ops within float tolerance."""
    x = jax.random.normal(jax.random.key(3), (4, 8, 8, 3))
    kwargs = dict(num_blocks=2, num_columns=3, widths=(4, 8), dropout=(0.0, 0.2))
    models = {impls: fractalnet(5, conv_impl=impls[0], pool_impl=impls[1], **kwargs)
              for impls in (("xla", "reduce_window"), ("patches", "slices"))}
    variables = {k: m.init(jax.random.key(0), x) for k, m in models.items()}
    first = next(iter(variables.values()))
    for v in variables.values():
        assert jax.tree.structure(v) == jax.tree.structure(first)
        jax.tree.map(np.testing.assert_array_equal, v, first)

    def loss(params, model):
        logits, _ = model.apply({"params": params, "batch_stats": first["batch_stats"]}, x,
                                train=True, rngs={"dropout": jax.random.key(4)},
                                mutable=["batch_stats"])
        return (logits ** 2).mean()

    results = [jax.jit(jax.value_and_grad(loss), static_argnums=1)(first["params"], m)
               for m in models.values()]
    for value, grads in results[1:]:
        np.testing.assert_allclose(value, results[0][0], rtol=1e-5)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
                     grads, results[0][1])
