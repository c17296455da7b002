"""FractalNet variants: learned joins, stage presets, the join-weights plot, and the weight-init,
precision and rematerialisation options."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from fractal_jax import config as config_lib
from fractal_jax.analysis import join_weights as jw
from fractal_jax.models import drop_path
from fractal_jax.models.columns import extract_column
from fractal_jax.models.fractal import input_weights, join
from fractal_jax.models.registry import create_model, fractalnet
from fractal_jax.models.summary import count_params
from fractal_jax.training.checkpoint import Checkpointer
from fractal_jax.training.experiment import build_model
from assertions import assert_only_column_units_get_gradients

TINY = dict(num_blocks=2, num_columns=3, widths=(4, 8))
X = jax.random.normal(jax.random.key(7), (6, 8, 8, 3))
LOG_123 = jnp.log(jnp.array([1.0, 2.0, 3.0]))  # softmax weights 1/6, 2/6, 3/6


def with_logits(variables, logits):
    """`variables` with every join's logits replaced by `logits(n)` for its n inputs."""
    flat = traverse_util.flatten_dict(variables)
    return traverse_util.unflatten_dict(
        {k: logits(v.shape[0]) if k[-1] == "logits" else v for k, v in flat.items()})


def train_apply(model, variables, plan):
    return model.apply(variables, X, train=True, plan=plan, mutable=["batch_stats"])[0]


@pytest.fixture(scope="session")
def learned():
    """A tiny learned-join model, its initial variables, and those with unequal logits."""
    model = fractalnet(5, **TINY, join="learned")
    variables = jax.jit(model.init)(jax.random.key(0), X)
    skewed = with_logits(variables, lambda n: LOG_123[:n] * 2.0)
    return model, variables, skewed


# --- the learned join itself -------------------------------------------------------------------

def test_weights_are_a_softmax_over_the_survivors_only():
    chex.assert_trees_all_close(input_weights(None, LOG_123), jnp.array([1, 2, 3]) / 6)
    chex.assert_trees_all_close(input_weights(jnp.array([1.0, 0.0, 1.0]), LOG_123),
                                jnp.array([0.25, 0.0, 0.75]))
    per_sample = input_weights(jnp.array([[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]), LOG_123)
    chex.assert_trees_all_close(per_sample, jnp.array([[1 / 3, 2 / 3, 0.0], [0.0, 0.0, 1.0]]))
    # A huge logit on a dropped input changes nothing, and dropping everything gives zeros.
    chex.assert_trees_all_close(input_weights(jnp.array([1.0, 0.0, 1.0]),
                                              jnp.array([0.0, 1e4, 0.0])),
                                jnp.array([0.5, 0.0, 0.5]))
    chex.assert_trees_all_equal(input_weights(jnp.zeros(3), LOG_123), jnp.zeros(3))
    grad = jax.grad(lambda l: input_weights(jnp.zeros(3), l).sum())(LOG_123)
    chex.assert_trees_all_equal(grad, jnp.zeros(3))

    a, b, c = (jnp.full((2, 1, 1, 1), v) for v in (1.0, 4.0, 10.0))
    chex.assert_trees_all_close(join([a, b, c], jnp.array([1.0, 0.0, 1.0]), LOG_123),
                                jnp.full((2, 1, 1, 1), 0.25 * 1 + 0.75 * 10))
    chex.assert_trees_all_close(join([a, b, c], None, jnp.zeros(3)), join([a, b, c]))


def test_learned_join_params_start_at_zero_and_equal_the_mean(learned):
    model, variables, _ = learned
    logits = {k: v["logits"] for k, v in variables["params"]["block_0"].items()
              if k.startswith("join_")}
    assert {k: v.shape for k, v in logits.items()} == {"join_2": (2,), "join_4": (3,)}
    chex.assert_trees_all_equal(logits, jax.tree.map(jnp.zeros_like, logits))
    mean = fractalnet(5, **TINY)  # takes the same unit parameters and ignores the logits
    plan = drop_path.sample(jax.random.key(1), model.network_schedule, 0.5, 0.0)
    chex.assert_trees_all_close(model.apply(variables, X), mean.apply(variables, X), rtol=1e-6)
    chex.assert_trees_all_close(train_apply(model, variables, plan),
                                train_apply(mean, variables, plan), rtol=1e-6)


def test_eval_mode_keeps_every_input_and_column_mode_ignores_joins(learned):
    model, _, skewed = learned
    plan = drop_path.global_plan(model.network_schedule, 1)
    chex.assert_trees_all_equal(model.apply(skewed, X), model.apply(skewed, X, plan=plan))
    assert not np.allclose(model.apply(skewed, X), fractalnet(5, **TINY).apply(skewed, X))
    plain, plain_vars = extract_column(model, skewed, 3)
    chex.assert_trees_all_close(model.apply(skewed, X, column=3), plain.apply(plain_vars, X),
                                rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("column", [1, 3])
def test_global_plan_is_the_column_alone_and_gradients_elsewhere_are_zero(learned, column):
    model, _, skewed = learned
    plan = drop_path.global_plan(model.network_schedule, column)
    alone, _ = model.apply(skewed, X, train=True, column=column, mutable=["batch_stats"])
    chex.assert_trees_all_close(train_apply(model, skewed, plan), alone, rtol=1e-5, atol=1e-5)

    grads = jax.grad(lambda p: (train_apply(model, {**skewed, "params": p}, plan) ** 2).sum())(
        skewed["params"])
    assert_only_column_units_get_gradients(grads, column)


def test_per_sample_plans_match_per_batch_ones(learned):
    model, _, skewed = learned
    plan = drop_path.global_plan(model.network_schedule, 2)
    tiled = jax.tree.map(lambda m: jnp.broadcast_to(m, (6,) + m.shape), plan)
    chex.assert_trees_all_close(train_apply(model, skewed, tiled),
                                train_apply(model, skewed, plan), rtol=1e-6)
    sampled = drop_path.sample(jax.random.key(0), model.network_schedule, 0.15, 0.5,
                               batch_size=6)
    chex.assert_shape(train_apply(model, skewed, sampled), (6, 5))


def test_logits_learn_under_the_full_plan(learned):
    model, variables, _ = learned
    plan = drop_path.full_plan(model.network_schedule)
    grads = jax.grad(lambda p: (train_apply(model, {**variables, "params": p}, plan) ** 2).sum())(
        variables["params"])
    logit_grads = {k: v for k, v in traverse_util.flatten_dict(grads).items() if k[-1] == "logits"}
    assert len(logit_grads) == 4
    for name, g in logit_grads.items():
        assert float(jnp.abs(g).sum()) > 0, name


def test_bad_join_and_the_config_key():
    with pytest.raises(ValueError, match="join='.*' is invalid: it must be one of 'mean', 'learned'"):
        fractalnet(5, **TINY, join="sum")
    config = config_lib.base_config()
    assert config.model.join is None
    config.model.update(name="fractalnet", num_blocks=2, num_columns=3, widths=(4, 8),
                        join="learned")
    assert build_model(config, 5).join == "learned"


# --- stage presets ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name,columns,widths", [
    ("fractalnet_micro", (1, 2, 2), (16, 32, 64)),
    ("fractalnet_small", (2, 3, 3), (32, 64, 128)),
    ("fractalnet_medium", (3, 4, 4), (64, 128, 256)),
    ("fractalnet_large", (4, 5, 5), (96, 192, 384)),
])
def test_stage_presets(name, columns, widths):
    model = create_model(name, 10)
    assert tuple(b.num_columns for b in model.network_schedule.blocks) == columns
    assert (model.widths, model.head, model.dropout) == (widths, "gap", None)
    x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.key(0), x)
    assert jax.eval_shape(model.apply, variables, x).shape == (2, 10)
    feats = jax.eval_shape(lambda v, x: model.apply(v, x, features=True), variables, x)
    assert [f.shape for f in feats] == [(2, 16, 16, widths[0]), (2, 8, 8, widths[1]),
                                        (2, 4, 4, widths[2])]


def test_micro_parameter_count():
    # Units: 1 + 3 + 3 conv-BN (3→16, 16→32, 32→32, 16→32, 32→64, 64→64, 32→64), GAP dense 64→10.
    assert count_params(create_model("fractalnet_micro", 10), (1, 32, 32, 3)) == 93_850
    # Learned joins add one logit per input of the two 2-input joins.
    assert count_params(create_model("fractalnet_micro", 10, join="learned"),
                        (1, 32, 32, 3)) == 93_854


# --- join weights ----------------------------------------------------------------------------------

def test_join_weights_and_plot(learned, tmp_path):
    model, variables, skewed = learned
    weights = jw.join_weights(model, skewed["params"])
    assert sorted(weights) == [(0, 2), (0, 4), (1, 2), (1, 4)]
    np.testing.assert_allclose(weights[1, 4], [1 / 14, 4 / 14, 9 / 14], rtol=1e-5)
    np.testing.assert_allclose(weights[0, 2], [1 / 5, 4 / 5], rtol=1e-5)
    path = jw.plot_join_weights(model, skewed["params"], str(tmp_path / "w.png"))
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="no learned joins.*--config.model.join=learned"):
        jw.join_weights(fractalnet(5, **TINY), variables["params"])


def _fake_run(workdir, join_kind, params):
    config = config_lib.base_config()
    config.model.update(name="fractalnet", num_blocks=2, num_columns=3, widths=(4, 8),
                        join=join_kind)
    with Checkpointer(str(workdir), keep_best=False, async_save=False) as checkpointer:
        checkpointer.save(3, {"params": params},
                          metadata={"config": config_lib.to_json_dict(config), "step": 3})


def test_join_weights_command(learned, tmp_path, capsys):
    model, _, skewed = learned
    _fake_run(tmp_path / "learned", "learned", skewed["params"])
    assert jw.main(["--workdir", str(tmp_path / "learned")]) == 0
    with open(tmp_path / "learned" / "join_weights.png", "rb") as f:
        assert f.read(4) == b"\x89PNG"
    loaded, params = jw.load_model_and_params(str(tmp_path / "learned"))
    assert loaded.num_classes == 5
    chex.assert_trees_all_close(jw.join_weights(loaded, params),
                                jw.join_weights(model, skewed["params"]))

    _fake_run(tmp_path / "mean", "mean", skewed["params"])
    assert jw.main(["--workdir", str(tmp_path / "mean"), "--out", str(tmp_path / "x.png")]) == 2
    assert "--config.model.join=learned" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def loss_and_grads(model, variables, plan):
    def loss(params):
        logits = train_apply(model, {**variables, "params": params}, plan)
        return jnp.mean(logits.astype(jnp.float32) ** 2)
    return jax.jit(jax.value_and_grad(loss))(variables["params"])


def test_remat_gives_the_same_loss_and_gradients():
    plain, remat = fractalnet(5, **TINY), fractalnet(5, **TINY, remat=True)
    variables = jax.jit(plain.init)(jax.random.key(0), X)
    plan = drop_path.sample(jax.random.key(3), plain.network_schedule, 0.15, 0.0)
    chex.assert_trees_all_close(loss_and_grads(remat, variables, plan),
                                loss_and_grads(plain, variables, plan), atol=1e-6)
    assert extract_column(remat, variables, 2)[0].remat  # extracted columns keep the option


def test_bfloat16_computes_in_bfloat16_and_keeps_float32_state():
    model = fractalnet(5, **TINY, dtype="bfloat16")
    variables = jax.jit(model.init)(jax.random.key(0), X)
    for leaf in jax.tree.leaves(variables):
        assert leaf.dtype == jnp.float32  # parameters and BatchNorm statistics
    logits, updates = jax.jit(lambda v: model.apply(
        v, X, train=True, mutable=["batch_stats"]))(variables)
    assert logits.dtype == jnp.bfloat16
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(updates))
    reference = fractalnet(5, **TINY).apply(variables, X)
    np.testing.assert_allclose(model.apply(variables, X).astype(jnp.float32), reference,
                               atol=0.1, rtol=0.05)


def test_weight_init_schemes():
    def kernel_std(init):
        model = fractalnet(5, num_blocks=1, num_columns=1, widths=(64,), weight_init=init)
        variables = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
        return float(jnp.std(variables["params"]["block_0"]["unit_c1_p1"]["Conv_0"]["kernel"]))
    fan_in, fan_out = 3 * 3 * 3, 3 * 3 * 64
    np.testing.assert_allclose(kernel_std("xavier"), np.sqrt(1 / fan_in), rtol=0.1)  # Caffe
    np.testing.assert_allclose(kernel_std("he"), np.sqrt(2 / fan_in), rtol=0.1)
    np.testing.assert_allclose(kernel_std("glorot"), np.sqrt(2 / (fan_in + fan_out)), rtol=0.1)


@pytest.mark.parametrize("key, value, message", [
    ("weight_init", "kaiming", "weight_init='kaiming' is invalid: it must be one of 'xavier', 'he', 'glorot'"),
    ("dtype", "float16", "dtype='float16' is invalid: it must be one of 'float32', 'bfloat16'"),
])
def test_bad_option_names_the_choices(key, value, message):
    with pytest.raises(ValueError, match=message):
        fractalnet(5, **TINY, **{key: value})


@pytest.mark.parametrize("overrides, check", [
    ({"model.dropout_position": "after_relu"}, lambda m: m.dropout_position == "after_relu"),
    ({"model.dropout_type": "channel"}, lambda m: m.dropout_type == "channel"),
    ({"model.join_order": "join_then_pool"}, lambda m: m.join_order == "join_then_pool"),
    ({"model.bn_affine": False}, lambda m: not m.bn_affine),
    ({"model.head": "gap"}, lambda m: m.head == "gap"),
    ({"model.weight_init": "he"}, lambda m: m.weight_init == "he"),
    ({"model.name": "plain", "model.depth": 10},
     lambda m: m.units_per_block == (2,) * 5),  # Table 4's plain network
])
def test_every_model_ablation_switch_reaches_the_model(overrides, check):
    config = config_lib.base_config()
    config.update_from_flattened_dict(overrides)
    assert check(build_model(config_lib.validate(config), num_classes=10))


@pytest.mark.parametrize("key, value", [
    ("drop_path.per_sample", True), ("drop_path.p_global", 0.25), ("drop_path.p_local", 0.3),
    ("optim.weight_decay", 5e-4), ("data.augment", "++"), ("data.augment", "none"),
])
def test_every_training_ablation_switch_is_a_checked_config_key(key, value):
    config = config_lib.base_config()
    config.update_from_flattened_dict({key: value})
    section, name = key.split(".")
    assert config_lib.validate(config)[section][name] == value
