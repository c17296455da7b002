"""Baseline CNNs: exact parameter counts, output and feature shapes, training mode, stochastic
depth and input checks.

ImageNet-size models are only traced (`jax.eval_shape`); real forward and backward passes run at
32×32 with batch 2, the smallest input every model accepts.
"""
import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fractal_jax.models import densenet, inception, resnet, resnext
from fractal_jax.models.densenet import cifar_densenet_bc
from fractal_jax.models.inception import max_pool_ceil
from fractal_jax.models.resnet import Bottleneck, ResNet, cifar_resnet, survival_probabilities

MODELS = {**resnet.MODELS, **resnext.MODELS, **densenet.MODELS, **inception.MODELS}

IMAGENET_PARAMS = {  # torchvision's counts at 1000 classes
    "resnet18": 11_689_512,
    "resnet34": 21_797_672,
    "resnet50": 25_557_032,
    "resnext50_32x4d": 25_028_904,
    "densenet121": 7_978_856,
    "googlenet": 6_624_904,
}
CIFAR_PARAMS = {  # at 10 classes; the ResNets have projection shortcuts (option B)
    "resnet20": 272_474,
    "resnet56": 855_770,
    "resnet110": 1_730_714,
    "densenet_bc_100_12": 769_162,
}
assert set(IMAGENET_PARAMS) | set(CIFAR_PARAMS) == set(MODELS)

# (height, width, channels) of each backbone map at the model's usual input size.
IMAGENET_FEATURES = {
    "resnet18": ((56, 56, 64), (28, 28, 128), (14, 14, 256), (7, 7, 512)),
    "resnet34": ((56, 56, 64), (28, 28, 128), (14, 14, 256), (7, 7, 512)),
    "resnet50": ((56, 56, 256), (28, 28, 512), (14, 14, 1024), (7, 7, 2048)),
    "resnext50_32x4d": ((56, 56, 256), (28, 28, 512), (14, 14, 1024), (7, 7, 2048)),
    "densenet121": ((56, 56, 256), (28, 28, 512), (14, 14, 1024), (7, 7, 1024)),
    "googlenet": ((56, 56, 192), (28, 28, 480), (14, 14, 832), (7, 7, 1024)),
}
CIFAR_FEATURES = {
    "resnet20": ((32, 32, 16), (16, 16, 32), (8, 8, 64)),
    "resnet56": ((32, 32, 16), (16, 16, 32), (8, 8, 64)),
    "resnet110": ((32, 32, 16), (16, 16, 32), (8, 8, 64)),
    "densenet_bc_100_12": ((32, 32, 216), (16, 16, 300), (8, 8, 342)),
}

BATCH = 2
SMALL = (BATCH, 32, 32, 3)


def usual_input_shape(name: str) -> tuple[int, int, int, int]:
    return (1, 224, 224, 3) if name in IMAGENET_PARAMS else (1, 32, 32, 3)


def traced_init(model: nn.Module, input_shape: tuple[int, ...]) -> dict:
    """Shapes of `model.init`'s variables, traced without compiling or running anything."""
    return jax.eval_shape(model.init, jax.random.key(0),
                          jax.ShapeDtypeStruct(input_shape, jnp.float32))


def traced_features(model: nn.Module, input_shape: tuple[int, ...]) -> tuple:
    def run(x):
        return model.init_with_output(jax.random.key(0), x, features=True)[0]
    return jax.eval_shape(run, jax.ShapeDtypeStruct(input_shape, jnp.float32))


def host_variables(model: nn.Module, input_shape: tuple[int, ...], seed: int = 0) -> dict:
    """Variables shaped as `model.init` makes them, filled with numpy on the host.

    Compiling the initialisers of the deep models takes tens of seconds on CPU, so tests that
    only need sensible values use these: He-normal kernels, zero biases, identity BatchNorm.
    """
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = path[-1].key
        if name == "kernel":
            fan_in = np.prod(leaf.shape[:-1])
            return rng.normal(0.0, np.sqrt(2.0 / fan_in), leaf.shape).astype(np.float32)
        return np.full(leaf.shape, 1.0 if name in ("scale", "var") else 0.0, np.float32)

    return jax.tree_util.tree_map_with_path(fill, traced_init(model, input_shape))


def num_params(variables: dict) -> int:
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(variables["params"]))


def images(seed: int = 0, shape: tuple[int, ...] = SMALL) -> jax.Array:
    return jax.random.normal(jax.random.key(seed), shape)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_parameter_count(name):
    model = MODELS[name]()
    expected = {**IMAGENET_PARAMS, **CIFAR_PARAMS}[name]
    assert num_params(traced_init(model, usual_input_shape(name))) == expected


@pytest.mark.parametrize("name", sorted(MODELS))
def test_logit_and_feature_shapes(name):
    model = MODELS[name](num_classes=7)
    shape = usual_input_shape(name)
    logits = jax.eval_shape(lambda x: model.init_with_output(jax.random.key(0), x)[0],
                            jax.ShapeDtypeStruct(shape, jnp.float32))
    chex.assert_shape(logits, (1, 7))
    maps = traced_features(model, shape)
    expected = {**IMAGENET_FEATURES, **CIFAR_FEATURES}[name]
    chex.assert_shape(list(maps), [(1, *hwc) for hwc in expected])


# One model per distinct code path: deeper CIFAR ResNets and ResNet-34 only repeat blocks.
@pytest.mark.parametrize("name", sorted(set(MODELS) - {"resnet34", "resnet56", "resnet110"}))
def test_eval_forward_at_smallest_input(name):
    model = MODELS[name](num_classes=5)
    variables = host_variables(model, SMALL)
    logits = jax.jit(model.apply)(variables, images())
    chex.assert_shape(logits, (BATCH, 5))
    chex.assert_tree_all_finite(logits)


# Small stand-ins for each block type, so that training steps compile in seconds.
TRAINABLE = {
    "resnet8": lambda: cifar_resnet(8),
    "tiny_resnext": lambda: ResNet(
        num_classes=10, stage_sizes=(1, 1, 1, 1), stage_widths=(16, 32, 64, 128),
        block=functools.partial(Bottleneck, groups=4, width_per_group=8)),
    "tiny_densenet_bc": lambda: cifar_densenet_bc(depth=10, growth_rate=4),
}


@pytest.mark.parametrize("name", TRAINABLE)
def test_train_step_updates_batch_stats_and_gives_finite_gradients(name):
    model = TRAINABLE[name]()
    x, labels = images(), jnp.arange(BATCH)
    variables = host_variables(model, SMALL)

    def loss_fn(params):
        logits, updates = model.apply({**variables, "params": params}, x, train=True,
                                      mutable=["batch_stats"], rngs={"dropout": jax.random.key(1)})
        one_hot = jax.nn.one_hot(labels, logits.shape[-1])
        return -jnp.mean(jnp.sum(one_hot * jax.nn.log_softmax(logits), -1)), updates

    (loss, updates), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(
        variables["params"])
    chex.assert_tree_all_finite((loss, grads))
    chex.assert_trees_all_equal_shapes(updates["batch_stats"], variables["batch_stats"])
    changed = jax.tree.map(lambda new, old: bool(jnp.any(new != old)),
                           updates["batch_stats"], variables["batch_stats"])
    assert all(jax.tree.leaves(changed)), "some BatchNorm statistics were not updated"


def test_googlenet_dropout_is_random_in_training_only():
    model = inception.googlenet(num_classes=10, dropout_rate=0.5)
    variables = host_variables(model, SMALL)

    @functools.partial(jax.jit, static_argnames="train")
    def logits(key, train):
        return model.apply(variables, images(), train=train, rngs={"dropout": key},
                           mutable=["batch_stats"])[0]

    a, b = jax.random.key(0), jax.random.key(1)
    assert not np.allclose(logits(a, True), logits(b, True))
    chex.assert_trees_all_close(logits(a, False), logits(b, False))


def test_survival_probabilities_decay_linearly():
    np.testing.assert_allclose(survival_probabilities(5, 0.5), [1.0, 0.875, 0.75, 0.625, 0.5])
    assert survival_probabilities(3, 0.0) == (1.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="stochastic_depth_rate"):
        survival_probabilities(3, 1.0)


@pytest.fixture(scope="module")
def resnet20_variables():
    return host_variables(resnet.resnet20(), SMALL)


@functools.partial(jax.jit, static_argnames=("model", "train"))
def apply_resnet(model, variables, x, key, train):
    out = model.apply(variables, x, train=train, rngs={"dropout": key},
                      mutable=["batch_stats"] if train else False)
    return out[0] if train else out


def test_stochastic_depth_rate_zero_matches_plain_resnet(resnet20_variables):
    x = images()
    # No dropout rng at all: a plain ResNet must not draw one.
    plain = jax.jit(lambda v, x: resnet.resnet20().apply(v, x, train=True,
                                                         mutable=["batch_stats"])[0])
    zero = apply_resnet(resnet.resnet20(stochastic_depth_rate=0.0), resnet20_variables, x,
                        jax.random.key(3), True)
    chex.assert_trees_all_close(zero, plain(resnet20_variables, x))


def test_stochastic_depth_is_random_in_training_and_deterministic_in_eval(resnet20_variables):
    model, x = resnet.resnet20(stochastic_depth_rate=0.5), images()
    train_a = apply_resnet(model, resnet20_variables, x, jax.random.key(0), True)
    train_b = apply_resnet(model, resnet20_variables, x, jax.random.key(1), True)
    train_a_again = apply_resnet(model, resnet20_variables, x, jax.random.key(0), True)
    assert not np.allclose(train_a, train_b)
    chex.assert_trees_all_close(train_a, train_a_again)

    eval_a = apply_resnet(model, resnet20_variables, x, jax.random.key(0), False)
    eval_b = apply_resnet(model, resnet20_variables, x, jax.random.key(1), False)
    chex.assert_trees_all_close(eval_a, eval_b)
    # At test time the branches are scaled by their survival rates, unlike the plain ResNet.
    plain = apply_resnet(resnet.resnet20(), resnet20_variables, x, jax.random.key(0), False)
    assert not np.allclose(eval_a, plain)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_smallest_input_gives_one_pixel_maps_and_smaller_is_rejected(name):
    model = MODELS[name]()
    size = model.min_input_size
    last = traced_features(model, (1, size, size, 3))[-1]
    assert last.shape[1:3] == (1, 1)
    with pytest.raises(ValueError, match=rf"{name}.*{size}x{size}.*got {size - 1}x{size + 8}"):
        traced_init(model, (1, size - 1, size + 8, 3))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_non_nhwc_input_is_rejected(name):
    with pytest.raises(ValueError, match=rf"{name} expects an NHWC batch of rank 4"):
        traced_init(MODELS[name](), (32, 32, 3))


@pytest.mark.parametrize("build, depth", [(cifar_resnet, 21), (cifar_resnet, 2),
                                          (functools.partial(cifar_densenet_bc, growth_rate=12),
                                           99)])
def test_invalid_cifar_depth_is_rejected(build, depth):
    with pytest.raises(ValueError, match=f"got {depth}"):
        build(depth)


def reference_max_pool_ceil(x: np.ndarray, window: int, stride: int, padding: int) -> np.ndarray:
    """PyTorch's MaxPool2d(ceil_mode=True) on one (H, W) map, written out window by window."""
    def out_size(size):
        out = -(-(size + 2 * padding - window) // stride) + 1
        return out - 1 if (out - 1) * stride >= size + padding else out

    result = np.empty((out_size(x.shape[0]), out_size(x.shape[1])), x.dtype)
    for i in range(result.shape[0]):
        for j in range(result.shape[1]):
            top, left = i * stride - padding, j * stride - padding
            result[i, j] = x[max(top, 0):top + window, max(left, 0):left + window].max()
    return result


@pytest.mark.parametrize("size", [5, 6, 7, 14])
@pytest.mark.parametrize("window, stride, padding", [(3, 2, 0), (2, 2, 0), (3, 1, 1)])
def test_max_pool_ceil_matches_pytorch_ceil_mode(size, window, stride, padding):
    x = np.random.default_rng(size).normal(size=(size, size + 1)).astype(np.float32)
    pooled = max_pool_ceil(jnp.asarray(x)[None, :, :, None], window, stride, padding)
    np.testing.assert_array_equal(pooled[0, :, :, 0],
                                  reference_max_pool_ceil(x, window, stride, padding))
