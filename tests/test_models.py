"""The FractalNet model: schedule, parameter counts, joins, drop-path plans, columns, bad input."""
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fractal_jax.models import drop_path
from fractal_jax.models.columns import extract_column
from fractal_jax.models.fractal import FractalBlock, ConvUnit, join
from fractal_jax.models.registry import create_model, fractalnet
from fractal_jax.models.schedule import BlockSchedule, NetworkSchedule
from fractal_jax.models.summary import count_params
from assertions import assert_only_column_units_get_gradients

TINY = dict(num_blocks=2, num_columns=3, widths=(4, 8))
X = jax.random.normal(jax.random.key(7), (6, 8, 8, 3))


@pytest.fixture(scope="session")
def tiny():
    """A 2-block, 3-column model with small widths and its initialised variables."""
    model = fractalnet(5, **TINY)
    variables = jax.jit(model.init)(jax.random.key(0), X)
    return model, variables


# --- structure ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name,classes,expected", [
    ("fractalnet20", 10, 33_724_618), ("fractalnet20", 100, 33_770_788),
    ("fractalnet_ultra1", 100, 258_292), ("fractalnet_ultra2", 100, 847_716),
    ("fractalnet_ultra3", 100, 2_125_204), ("fractalnet_ultra4", 100, 4_778_820),
    ("fractalnet_ultra5", 100, 10_184_692), ("fractalnet_ultra6", 100, 21_095_076),
])
def test_parameter_counts_match_the_spec(name, classes, expected):
    assert count_params(create_model(name, classes), (1, 32, 32, 3)) == expected


def test_schedules_are_the_spec_ones():
    def grid(c):
        s = BlockSchedule(c)
        return [set(s.columns_at(p)) for p in range(1, s.depth + 1)], [j.columns for j in s.joins]

    assert grid(2) == ([{2}, {1, 2}], [(1, 2)])
    assert grid(3) == ([{3}, {2, 3}, {3}, {1, 2, 3}], [(2, 3), (1, 2, 3)])
    units, joins = grid(4)
    assert sum(map(len, units)) == 15
    assert [(x.position, x.columns) for x in BlockSchedule(4).joins] == [
        (2, (3, 4)), (4, (2, 3, 4)), (6, (3, 4)), (8, (1, 2, 3, 4))]
    for c in range(1, 7):
        s = BlockSchedule(c)
        assert len(s.units) == 2 ** c - 1
        assert [len(s.column_positions(k)) for k in range(1, c + 1)] == [2 ** (k - 1)
                                                                         for k in range(1, c + 1)]
    assert NetworkSchedule.create(3, 5).depth == 20
    assert NetworkSchedule.create(6, 5).depth == 160


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_receptive_field_of_one_block_column_through_gradients(k):
    """One block of column k alone sees a (1 + 2·2^(k-1))-pixel window (spec §6)."""
    size = 21
    unit = lambda name: ConvUnit(16, name=name)  # noqa: E731  (wide, so no path dies in ReLUs)
    block = FractalBlock(BlockSchedule(4), unit, pool=False)
    x = jax.random.uniform(jax.random.key(k), (1, size, size, 2), minval=0.5, maxval=1.5)
    variables = block.init(jax.random.key(1), x)

    def centre(x):
        return block.apply(variables, x, None, k, False)[0, size // 2, size // 2].sum()

    g = np.abs(np.asarray(jax.grad(centre)(x)))[0].sum(-1)
    rows, cols = np.nonzero(g)
    assert rows.max() - rows.min() + 1 == 1 + 2 * 2 ** (k - 1)
    assert cols.max() - cols.min() + 1 == 1 + 2 * 2 ** (k - 1)


# --- joins and plans ---------------------------------------------------------------------------

def test_join_is_the_mean_of_surviving_inputs():
    a, b, c = (jnp.full((2, 1, 1, 1), v) for v in (1.0, 4.0, 10.0))
    chex.assert_trees_all_close(join([a, b, c]), jnp.full((2, 1, 1, 1), 5.0))
    chex.assert_trees_all_close(join([a, b, c], jnp.array([1.0, 0.0, 1.0])),
                                jnp.full((2, 1, 1, 1), 5.5))
    chex.assert_trees_all_close(join([a, b, c], jnp.array([0.0, 1.0, 0.0])), b)
    per_sample = join([a, b, c], jnp.array([[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]))
    np.testing.assert_allclose(np.asarray(per_sample).ravel(), [2.5, 10.0])


SCHEDULE = NetworkSchedule.create(4, 2)
draw_many = jax.jit(jax.vmap(lambda k, pl, pg: drop_path.sample(k, SCHEDULE, pl, pg),
                             in_axes=(0, None, None)))


def test_local_plans_never_drop_a_whole_join_and_drop_at_the_rate():
    n = 20_000
    p = 0.15
    plans = draw_many(jax.random.split(jax.random.key(0), n), p, 0.0)
    for block, masks in zip(SCHEDULE.blocks, plans):
        for j, mask in zip(block.joins, masks):
            mask = np.asarray(mask)
            assert mask.min(axis=1).min() >= 0 and mask.sum(axis=1).min() >= 1
            m = len(j.columns)
            # Each input is dropped with p, unless all were dropped and it was the revived one.
            expected = p - p ** m / m
            bound = 5 * np.sqrt(expected * (1 - expected) / n)
            np.testing.assert_allclose(1 - mask.mean(axis=0), expected, atol=bound)


def test_global_plans_pick_one_column_for_the_whole_network_uniformly():
    n = 12_000
    plans = draw_many(jax.random.split(jax.random.key(1), n), 0.15, 1.0)
    final = np.asarray(plans[0][-1])  # the last join of block 1 takes every column
    assert (final.sum(axis=1) == 1).all()
    column = final.argmax(axis=1) + 1
    for c in range(1, 5):  # the same column in every block's last join
        np.testing.assert_array_equal(np.asarray(plans[1][-1]).argmax(axis=1) + 1, column)
        frac = (column == c).mean()
        assert abs(frac - 0.25) < 5 * np.sqrt(0.25 * 0.75 / n)
    for i in range(20):
        c = int(column[i])
        chex.assert_trees_all_equal(jax.tree.map(lambda m: m[i], plans),
                                    drop_path.global_plan(SCHEDULE, c))


def test_p_global_is_the_fraction_of_global_draws():
    n = 8_000
    plans = draw_many(jax.random.split(jax.random.key(2), n), 1.0, 0.5)
    # With p_local = 1 a local join keeps exactly one input, so use block 1 vs block 2 agreement:
    # a global draw keeps the same column in both final joins, a local one only by chance (1/4).
    same = (np.asarray(plans[0][-1]).argmax(1) == np.asarray(plans[1][-1]).argmax(1)).mean()
    assert abs(same - (0.5 + 0.5 * 0.25)) < 5 * np.sqrt(0.25 / n)


def test_plans_are_pure_functions_of_the_key_and_vmap_over_rates():
    a = drop_path.sample(jax.random.key(3), SCHEDULE, 0.5, 0.5)
    chex.assert_trees_all_equal(a, drop_path.sample(jax.random.key(3), SCHEDULE, 0.5, 0.5))
    others = [drop_path.sample(jax.random.key(s), SCHEDULE, 0.5, 0.5) for s in range(4, 12)]
    assert any(not all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a),
                                                              jax.tree.leaves(o)))
               for o in others)
    rates = jnp.array([0.0, 0.3, 0.6])
    swept = jax.jit(jax.vmap(lambda k, p: drop_path.sample(k, SCHEDULE, p, 0.0)))(
        jax.random.split(jax.random.key(5), 3), rates)
    np.testing.assert_array_equal(np.asarray(swept[0][0])[0], 1.0)  # rate 0 keeps all
    per_sample = drop_path.sample(jax.random.key(6), SCHEDULE, 0.15, 0.5, batch_size=7)
    chex.assert_shape(per_sample[0][0], (7, 2))
    assert "block 1:" in drop_path.describe(a, SCHEDULE)


# --- the model under plans and columns ----------------------------------------------------------

def test_eval_mode_ignores_plans_and_keys(tiny):
    model, variables = tiny
    plan = drop_path.sample(jax.random.key(1), model.network_schedule, 0.9, 0.5)
    plain = model.apply(variables, X)
    chex.assert_trees_all_equal(plain, model.apply(variables, X, plan=plan,
                                                   rngs={"dropout": jax.random.key(3)}))
    chex.assert_shape(plain, (6, 5))


def test_full_plan_equals_no_plan_in_train_mode(tiny):
    model, variables = tiny
    a, _ = model.apply(variables, X, train=True, mutable=["batch_stats"])
    b, _ = model.apply(variables, X, train=True, plan=drop_path.full_plan(model.network_schedule),
                       mutable=["batch_stats"])
    chex.assert_trees_all_close(a, b, rtol=1e-6)


@pytest.mark.parametrize("column", [1, 2, 3])
def test_global_plan_equals_the_extracted_column(tiny, column):
    model, variables = tiny
    plain, plain_vars = extract_column(model, variables, column)
    # Eval mode: the column alone equals the extracted plain network.
    chex.assert_trees_all_close(model.apply(variables, X, column=column),
                                plain.apply(plain_vars, X), rtol=1e-5, atol=1e-6)
    # Train mode (batch statistics): the global plan equals the column, and the plain network.
    plan = drop_path.global_plan(model.network_schedule, column)
    masked, _ = model.apply(variables, X, train=True, plan=plan, mutable=["batch_stats"])
    alone, _ = plain.apply(plain_vars, X, train=True, mutable=["batch_stats"])
    chex.assert_trees_all_close(masked, alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("column", [1, 2, 3])
def test_gradients_off_the_global_column_are_exactly_zero(tiny, column):
    model, variables = tiny
    plan = drop_path.global_plan(model.network_schedule, column)

    def loss(params):
        out, _ = model.apply({**variables, "params": params}, X, train=True, plan=plan,
                             mutable=["batch_stats"])
        return (out ** 2).sum()

    grads = jax.grad(loss)(variables["params"])
    assert_only_column_units_get_gradients(grads, column)


def test_per_sample_plans_and_dropout_options_run(tiny):
    model, variables = tiny
    plan = drop_path.sample(jax.random.key(0), model.network_schedule, 0.15, 0.5, batch_size=6)
    out, _ = model.apply(variables, X, train=True, plan=plan, mutable=["batch_stats"])
    chex.assert_shape(out, (6, 5))
    unit = ConvUnit(16, dropout_rate=0.5, dropout_type="channel", dropout_position="after_relu")
    x = jax.random.normal(jax.random.key(2), (2, 4, 4, 3))
    v = unit.init(jax.random.key(0), x)
    y, _ = unit.apply(v, x, True, rngs={"dropout": jax.random.key(1)}, mutable=["batch_stats"])
    base, _ = ConvUnit(16).apply(v, x, True, mutable=["batch_stats"])
    y, base = np.asarray(y), np.asarray(base)
    dropped = (y == 0).all(axis=(1, 2))  # (batch, channel)
    assert dropped.any() and (~dropped).any()
    # A kept channel is the whole undropped channel rescaled by 1/(1-p): channels, not elements.
    kept = np.broadcast_to(~dropped[:, None, None, :], y.shape)
    np.testing.assert_allclose(y[kept], 2 * base[kept], rtol=1e-6)


@pytest.mark.parametrize("kwargs,shape", [
    (dict(head="gap"), (6, 5)),
    (dict(join_order="join_then_pool"), (6, 5)),
    (dict(num_columns=(1, 3)), (6, 5)),
    (dict(bn_affine=False), (6, 5)),
])
def test_variants_build_and_run(kwargs, shape):
    model = fractalnet(5, **{**TINY, **kwargs})
    variables = model.init(jax.random.key(0), X)
    chex.assert_shape(model.apply(variables, X), shape)
    feats = model.apply(variables, X, features=True)
    assert [f.shape for f in feats] == [(6, 4, 4, 4), (6, 2, 2, 8)]


def test_join_order_matters_and_imagenet_stem_downsamples():
    a = fractalnet(5, **TINY)
    b = fractalnet(5, **TINY, join_order="join_then_pool")
    v = a.init(jax.random.key(0), X)
    assert not np.allclose(a.apply(v, X), b.apply(v, X))
    stem = fractalnet(5, num_blocks=2, num_columns=2, widths=(4, 8), stem="imagenet",
                      head="gap", pool_last_block=False)
    x = jnp.ones((1, 32, 32, 3))
    feats = stem.apply(stem.init(jax.random.key(0), x), x, features=True)
    assert [f.shape[1] for f in feats] == [4, 4]


# --- bad input -----------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,match", [
    (dict(num_columns=0), "num_columns"),
    (dict(widths=(4,)), "widths"),
    (dict(dropout=(0.1,)), "dropout"),
    (dict(dropout=(0.1, 1.5)), "dropout"),
    (dict(head="avg"), "head"),
    (dict(num_columns=(3,)), "num_columns"),
])
def test_bad_model_config_is_a_clear_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fractalnet(5, **{**TINY, **kwargs})


def test_bad_call_arguments_are_clear_errors(tiny):
    model, variables = tiny
    with pytest.raises(ValueError, match="multiple of 4"):
        model.apply(variables, jnp.ones((1, 10, 10, 3)))
    with pytest.raises(ValueError, match="column must be in 1..3"):
        model.apply(variables, X, column=4)
    with pytest.raises(ValueError, match="column must be in 1..3"):
        drop_path.global_plan(model.network_schedule, 0)
    with pytest.raises(ValueError, match="p_local"):
        drop_path.sample(jax.random.key(0), model.network_schedule, 1.5, 0.5)
    with pytest.raises(ValueError, match="p_global"):
        drop_path.sample(jax.random.key(0), model.network_schedule, 0.1, -0.1)
    with pytest.raises(ValueError, match="Did you mean 'fractalnet20'"):
        create_model("fractalnet2O", 10)


def test_summary_command_ends_with_the_total():
    out = subprocess.run([sys.executable, "-m", "fractal_jax.models.summary", "fractalnet20"],
                         capture_output=True, text=True, check=True).stdout
    assert out.rstrip().splitlines()[-1] == "total parameters: 33,724,618"
    assert "J{1,2,3}" in out and "FLOPs per image" in out
