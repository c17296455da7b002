"""Skipping dead work: a step that computes only what its drop-path plan keeps must train exactly
what the compute-everything step trains (loss, gradients, BatchNorm statistics)."""
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fractal_jax.models import drop_path
from fractal_jax.models.fractal import FractalNet
from fractal_jax.models.schedule import NetworkSchedule
from fractal_jax.training import parallel, programs
from fractal_jax.training.state import create_train_state
from test_training import tiny_config

SCHEDULE = NetworkSchedule.create(3, 1)


def live_set(plan, schedule=SCHEDULE):
    return [{u for u, alive in block.items() if bool(alive)}
            for block in drop_path.live_units(plan, schedule)]


def test_every_unit_is_live_under_the_full_plan():
    assert live_set(drop_path.full_plan(SCHEDULE)) == [set(SCHEDULE.blocks[0].units)]


@pytest.mark.parametrize("column", [1, 2, 3])
def test_a_global_plan_keeps_exactly_its_columns_units(column):
    schedule = NetworkSchedule.create((3, 2), 2)
    live = live_set(drop_path.global_plan(schedule, column), schedule)
    for b, block in enumerate(schedule.blocks):
        k = schedule.block_column(b, column)
        assert live[b] == {(k, p) for p in block.column_positions(k)}


def test_dropped_join_inputs_kill_their_subtrees():
    # C=3: join after position 2 takes columns (2, 3), the last join takes (1, 2, 3).
    drop_deep_early = ((jnp.array([1.0, 0.0]), jnp.array([1.0, 1.0, 1.0])),)
    assert live_set(drop_deep_early) == [{(1, 4), (2, 2), (2, 4), (3, 3), (3, 4)}]
    only_shallow_at_the_end = ((jnp.array([1.0, 1.0]), jnp.array([1.0, 0.0, 0.0])),)
    assert live_set(only_shallow_at_the_end) == [{(1, 4)}]


def test_live_units_refuses_per_sample_plans():
    plan = drop_path.sample(jax.random.key(0), SCHEDULE, 0.15, 0.5, batch_size=4)
    with pytest.raises(ValueError, match="per-batch plan"):
        drop_path.live_units(plan, SCHEDULE)


@pytest.mark.parametrize("p_global", [0.0, 0.5, 1.0])
def test_host_plan_kinds_are_the_kinds_the_device_step_draws(p_global):
    schedule = NetworkSchedule.create(3, 2)
    steps_ = np.arange(1, 41)
    kinds = programs.plan_kinds(7, steps_, schedule, p_global)
    for step, kind in zip(steps_, kinds):
        plan_key = jax.random.split(programs.step_key(7, int(step)))[0]
        is_global, column = drop_path.sample_mode(plan_key, schedule, p_global)
        assert kind == (int(column) if is_global else None)
    if p_global == 0.0:
        assert set(kinds) == {None}
    elif p_global == 1.0:
        assert set(kinds) == {1, 2, 3}
    else:
        assert set(kinds) == {None, 1, 2, 3}


MODEL = FractalNet(num_classes=10, num_blocks=2, num_columns=3, widths=(8, 16),
                   dropout=(0.0, 0.1))


@pytest.fixture(scope="module")
def setup():
    state = create_train_state(MODEL, optax.sgd(0.05, momentum=0.9), jax.random.key(0),
                               (1, 8, 8, 3), p_local=0.15, p_global=0.5)
    rng = np.random.default_rng(0)
    batch = {"image": jnp.asarray(rng.normal(size=(16, 8, 8, 3)), jnp.float32),
             "label": jnp.asarray(rng.integers(0, 10, 16))}
    return state, batch


def make_programs(data_dir, skip=True, per_sample=False, nonfinite="stop"):
    config = tiny_config(data_dir, nonfinite=nonfinite, **{"drop_path.skip": skip,
                                                           "drop_path.per_sample": per_sample})
    return programs.Programs(MODEL, config, parallel.create_mesh())


def test_skipping_trains_exactly_what_masking_trains(setup, data_dir):
    state, batch = setup
    skip = make_programs(data_dir).run_step(seed=3, p_global=0.5)
    full = make_programs(data_dir, skip=False).run_step(seed=3, p_global=0.5)
    assert isinstance(skip, programs.SkippingStep)
    # The compiled steps donate their input state: each side trains its own copy.
    a, b = (jax.tree.map(jnp.copy, state) for _ in range(2))
    kinds = set()
    for step in range(1, 16):
        kinds.add(skip.kind(step))
        a, metrics_a = skip(a, batch, step)
        b, metrics_b = full(b, batch, step)
        np.testing.assert_allclose(metrics_a["loss"], metrics_b["loss"], rtol=1e-5)
    assert kinds == {None, 1, 2, 3}  # every program was compared
    chex.assert_trees_all_close(a.params, b.params, atol=1e-5)
    chex.assert_trees_all_close(a.batch_stats, b.batch_stats, atol=1e-5)
    chex.assert_trees_all_close(a.opt_state, b.opt_state, atol=1e-5)


def test_dead_units_keep_their_batchnorm_statistics(setup):
    state, batch = setup
    key = next(programs.step_key(3, s) for s in range(1, 100)
               if programs.plan_kinds(3, np.array([s]), MODEL.network_schedule, 0.5) == [1])
    new, _ = jax.jit(functools.partial(programs.sampled_step, model=MODEL))(state, batch, key)
    for b, block in enumerate(MODEL.network_schedule.blocks):
        for (k, p) in block.units:
            name = f"unit_c{k}_p{p}"
            moved = not np.allclose(new.batch_stats[f"block_{b}"][name]["BatchNorm_0"]["mean"],
                                    state.batch_stats[f"block_{b}"][name]["BatchNorm_0"]["mean"])
            assert moved == (k == 1), (b, name)


def test_per_sample_plans_keep_the_compute_everything_step(data_dir):
    step = make_programs(data_dir, per_sample=True).run_step(seed=0, p_global=0.5)
    assert not isinstance(step, programs.SkippingStep)


def test_a_nonfinite_batch_can_be_skipped(setup):
    state, batch = setup
    fn = jax.jit(functools.partial(programs.sampled_step, model=MODEL, skip_nonfinite=True))
    bad = dict(batch, image=batch["image"].at[0, 0, 0, 0].set(jnp.nan))
    skipped, metrics = fn(state, bad, jax.random.key(1))
    assert float(metrics["nonfinite"]) == 1.0
    assert int(skipped.step) == int(state.step) + 1
    chex.assert_trees_all_equal((skipped.params, skipped.batch_stats, skipped.opt_state),
                                (state.params, state.batch_stats, state.opt_state))
    trained, metrics = fn(state, batch, jax.random.key(1))
    assert float(metrics["nonfinite"]) == 0.0
    assert not np.allclose(trained.params["head"]["Dense_0"]["bias"],
                           state.params["head"]["Dense_0"]["bias"])
