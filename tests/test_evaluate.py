"""Honest evaluation: bias-corrected running statistics, precise BatchNorm statistics of the
network evaluated, and the rule that decides whose statistics a drop-path step updates."""
import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fractal_jax import config as config_lib
from fractal_jax.models import drop_path
from fractal_jax.models.batch_norm import BatchNorm
from fractal_jax.models.fractal import FractalNet
from fractal_jax.training import evaluate, steps
from fractal_jax.training.state import create_train_state
from test_kernels import FAR_FROM_ZERO, FAR_FROM_ZERO_BF16, far_from_zero
from test_training import tiny_config

MODEL = FractalNet(num_classes=10, num_blocks=2, num_columns=3, widths=(8, 16),
                   dropout=(0.0, 0.2))


def _bn_updates(momentum, batches, bias_correction=True):
    """The running (mean, var) of one BatchNorm layer after a train-mode pass over each batch."""
    layer = BatchNorm(momentum=momentum) if bias_correction else nn.BatchNorm(momentum=momentum)
    variables = layer.init(jax.random.key(0), batches[0], use_running_average=True)
    for x in batches:
        _, updates = layer.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
        variables = {**variables, **updates}
    return variables["batch_stats"]["mean"], variables["batch_stats"]["var"]


def test_bias_corrected_statistics_are_the_exact_mean_of_the_updates():
    rng = np.random.default_rng(0)
    same = jnp.asarray(rng.normal(2.0, 3.0, (64, 4)), jnp.float32)
    true_mean, true_var = same.mean(0), same.var(0)
    for n in (1, 2, 5):
        mean, var = _bn_updates(0.99, [same] * n)
        np.testing.assert_allclose(mean, true_mean, rtol=1e-5)
        np.testing.assert_allclose(var, true_var, rtol=1e-5)
    # Flax's uncorrected rule still holds most of its start values (0, 1) after 5 updates.
    mean, _ = _bn_updates(0.99, [same] * 5, bias_correction=False)
    np.testing.assert_allclose(mean, (1 - 0.99 ** 5) * true_mean, rtol=1e-4)
    # Different batches: the average weighted by momentum**(n - i), normalised to sum to 1.
    batches = [jnp.asarray(rng.normal(i, 1.0, (32, 4)), jnp.float32) for i in range(4)]
    weights = np.array([0.5 ** (3 - i) for i in range(4)]) * 0.5
    mean, _ = _bn_updates(0.5, batches)
    expected = sum(w * np.asarray(b.mean(0)) for w, b in zip(weights, batches)) / weights.sum()
    np.testing.assert_allclose(mean, expected, rtol=1e-5)


@pytest.fixture(scope="module")
def variables():
    x = jnp.zeros((1, 8, 8, 3))
    v = MODEL.init(jax.random.key(0), x)
    # Running statistics far from anything the network computes: precise ones must not care.
    return {**v, "batch_stats": jax.tree.map(lambda s: s * 7.0 + 3.0, v["batch_stats"])}


def _images(n, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(n, 8, 8, 3)), jnp.float32)


def _bn_inputs(variables, images, column):
    """Every BatchNorm layer's input when the network runs in eval mode with `variables`."""
    inputs = {}

    def record(next_fun, args, kwargs, context):
        if context.method_name == "__call__" and isinstance(context.module, evaluate.BATCH_NORMS):
            inputs[context.module.path] = np.asarray(args[0], np.float64)
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        MODEL.apply(variables, images, train=False,
                    **({} if column is None else {"column": column}))
    return inputs


@pytest.mark.parametrize("column", [None, 1, 3])
def test_precise_statistics_are_the_population_statistics_of_the_evaluated_network(
        variables, column):
    images = _images(64)
    stats = evaluate.precise_batch_stats(MODEL, variables, [images], column)
    inputs = _bn_inputs({"params": variables["params"], "batch_stats": stats}, images, column)
    expected_layers = 2 * 7 if column is None else sum(
        len(b.column_positions(MODEL.network_schedule.block_column(i, column)))
        for i, b in enumerate(MODEL.network_schedule.blocks))
    assert len(inputs) == expected_layers
    for path, x in inputs.items():
        layer = stats
        for name in path:
            layer = layer[name]
        # Computed directly: each BatchNorm input of the evaluated network over the set.
        np.testing.assert_allclose(layer["mean"], x.mean((0, 1, 2)), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(layer["var"], x.var((0, 1, 2)), rtol=1e-4, atol=1e-5)
    # Layers the network does not run keep their statistics.
    untouched = [(b, u) for b, block in variables["batch_stats"].items() for u in block
                 if (b, u, "BatchNorm_0") not in inputs]
    for b, u in untouched:
        np.testing.assert_array_equal(stats[b][u]["BatchNorm_0"]["mean"],
                                      variables["batch_stats"][b][u]["BatchNorm_0"]["mean"])


def test_precise_statistics_over_batches_pool_their_moments(variables):
    images = _images(64)
    whole = evaluate.precise_batch_stats(MODEL, variables, [images])
    halves = evaluate.precise_batch_stats(MODEL, variables, [images[:32], images[32:]])
    # The first layer's inputs do not depend on normalisation: pooled moments are exact.
    first = ("block_0", "unit_c3_p1", "BatchNorm_0")
    for key in ("mean", "var"):
        a, b = whole, halves
        for name in first:
            a, b = a[name], b[name]
        np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-6)


class _OneBatchNorm(nn.Module):
    """A network of one BatchNorm layer, called as the evaluated networks are."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        return BatchNorm(use_running_average=not train)(x)


@pytest.mark.parametrize("dtype,ratio,std",
                         [(jnp.float32, *case) for case in FAR_FROM_ZERO]
                         + [(jnp.bfloat16, *case) for case in FAR_FROM_ZERO_BF16])
def test_precise_statistics_pooled_far_from_zero_match_float64(dtype, ratio, std):
    """Four calibration batches of 4..12 examples (32,768 values per channel in all), their
    means a standard deviation or more apart: statistics pooled in float64 by (count, mean, M2)
    equal the float64 statistics of all the values, whatever |mean| / std."""
    batches = [far_from_zero(ratio + k, std, dtype, (n, 32, 32, 4), seed=k)
               for k, n in enumerate((4, 8, 8, 12))]
    model = _OneBatchNorm()
    variables = model.init(jax.random.key(0), batches[0][:1])
    stats = evaluate.precise_batch_stats(model, variables, batches)["BatchNorm_0"]
    chex.assert_type([stats["mean"], stats["var"]], np.float32)
    exact = np.concatenate([np.asarray(b, np.float64) for b in batches])
    np.testing.assert_allclose(stats["var"], exact.var((0, 1, 2)), rtol=1e-4)
    np.testing.assert_allclose(stats["mean"], exact.mean((0, 1, 2)), rtol=2 ** -23,
                               atol=1e-5 * std)


def test_pooled_moments_are_those_of_the_whole_set():
    """Chan's update in float64 keeps the variance at |mean| / std = 10⁶, where the pooled sums
    of squares, n·E[x²] - n·E[x]², lose about 12 of float64's 16 digits."""
    x = np.random.default_rng(0).normal(1e4, 1e-2, 1000)
    parts = [x[:1], x[1:300], x[300:]]
    n, mean, m2 = functools.reduce(evaluate.pool_moments,
                                   [(len(p), p.mean(), len(p) * p.var()) for p in parts])
    assert n == 1000
    np.testing.assert_allclose(mean, x.mean(), rtol=1e-15)
    np.testing.assert_allclose(m2 / n, x.var(), rtol=1e-9)


def test_evaluator_measures_each_network_with_its_own_statistics(variables):
    mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    images, labels = _images(40, seed=1), np.arange(40) % 10
    batch = {"image": np.asarray(images), "label": labels, "mask": np.ones(40, bool)}
    calibration = [np.asarray(_images(64))]
    metrics, precise = evaluate.Evaluator(MODEL, mesh)(variables, [batch], calibration)
    assert set(precise) == {"full", "column_1", "column_2", "column_3"}
    for network in evaluate.networks(MODEL):
        suffix = evaluate.metric_suffix(network)
        kwargs = {} if network is None else {"column": network}
        own = {"params": variables["params"],
               "batch_stats": precise[evaluate.network_name(network)]}
        for prefix, v in (("", own), (evaluate.STORED_PREFIX, variables)):
            logits = MODEL.apply(v, images, train=False, **kwargs)
            assert metrics[f"{prefix}accuracy{suffix}"] == pytest.approx(
                int((logits.argmax(-1) == labels).sum()) / 40, abs=1e-12)
    without, none = evaluate.Evaluator(MODEL, mesh)(variables, [batch])
    assert none is None and without["accuracy"] == metrics["stored_bn/accuracy"]
    assert not any(k.startswith(evaluate.STORED_PREFIX) for k in without)


def _moved(new, old):
    """{(block, unit): whether its BatchNorm statistics changed}."""
    return {(b, u): not np.allclose(new[b][u]["BatchNorm_0"]["mean"],
                                    old[b][u]["BatchNorm_0"]["mean"])
            for b in old for u in old[b]}


@pytest.mark.parametrize("bn_update", ["live", "all"])
def test_the_configured_rule_decides_whose_statistics_a_step_updates(bn_update):
    state = create_train_state(MODEL, optax.sgd(0.1), jax.random.key(0), (1, 8, 8, 3))
    schedule = MODEL.network_schedule
    batch = {"image": _images(6), "label": jnp.arange(6) % 10}
    per_batch = drop_path.global_plan(schedule, 1)
    # Per sample: examples 0-2 keep column 1, examples 3-5 column 2; column 3 is dead for all.
    per_sample = jax.tree.map(lambda a, b: jnp.stack([a] * 3 + [b] * 3),
                              drop_path.global_plan(schedule, 1), drop_path.global_plan(schedule, 2))
    for plan, live_columns in ((per_batch, {1}), (per_sample, {1, 2})):
        new, _ = steps.train_step(state, batch, jax.random.key(1), model=MODEL, plan=plan,
                                  bn_update=bn_update)
        for (b, unit), moved in _moved(new.batch_stats, state.batch_stats).items():
            column = int(unit.split("_")[1][1:])  # unit_c{column}_p{position}
            assert moved == (bn_update == "all" or column in live_columns), (bn_update, b, unit)


def test_bn_rule_and_precise_evaluation_are_checked_config_keys(data_dir):
    with pytest.raises(ValueError, match="drop_path.skip=True is invalid: skipping dead work "
                                         "needs drop_path.bn_update='live'"):
        config_lib.validate(tiny_config(data_dir, **{"drop_path.bn_update": "all"}))
    config_lib.validate(tiny_config(data_dir, **{"drop_path.bn_update": "all",
                                                 "drop_path.skip": False}))
    with pytest.raises(ValueError, match="drop_path.bn_update='some' is invalid"):
        config_lib.validate(tiny_config(data_dir, **{"drop_path.bn_update": "some",
                                                     "drop_path.skip": False}))
    with pytest.raises(ValueError, match="precise_bn.num_examples=0 is invalid"):
        config_lib.validate(tiny_config(data_dir, **{"precise_bn.num_examples": 0}))
    config_lib.validate(tiny_config(data_dir, **{"model.bn_impl": "autodiff"}))
    with pytest.raises(ValueError, match="model.bn_impl='cudnn' is invalid: it must be one of"):
        config_lib.validate(tiny_config(data_dir, **{"model.bn_impl": "cudnn"}))
