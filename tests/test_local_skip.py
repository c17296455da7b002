"""Dead units of local plans and the skip-set family measured for local-step skipping."""
import jax
import numpy as np

from fractal_jax.models import drop_path, local_skip
from fractal_jax.models.schedule import NetworkSchedule

SCHEDULE = NetworkSchedule.create(3, 2)


def test_dead_units_are_the_units_live_units_leaves_out():
    key = jax.random.key(3)
    dead = local_skip.dead_units(key, SCHEDULE, 0.5, 16)
    assert dead.shape == (16, 14) and dead.any() and not dead.all()
    plan = drop_path.sample_local(jax.random.split(key, 16)[5], SCHEDULE, 0.5)
    live = drop_path.live_units(plan, SCHEDULE)
    expected = [not bool(live[b][(k, p)]) for b, k, p in local_skip.units(SCHEDULE)]
    np.testing.assert_array_equal(dead[5], expected)


def test_unit_flops_count_each_units_input_channels():
    cost = local_skip.unit_flops(NetworkSchedule.create(3, 2), (4, 8), 8)
    first = local_skip.units(SCHEDULE).index((1, 3, 1))  # block 1's deepest first unit
    assert cost[0] == 2 * 8 * 8 * 9 * 3 * 4  # block 0, c3 p1 reads the image
    assert cost[first] == 2 * 4 * 4 * 9 * 4 * 8 and cost[first + 1] == 2 * 4 * 4 * 9 * 8 * 8


def test_chosen_programs_skip_only_dead_units_and_more_programs_skip_more():
    dead = local_skip.dead_units(jax.random.key(0), SCHEDULE, 0.15, 500)
    cost = local_skip.unit_flops(SCHEDULE, (4, 8), 8)
    fractions = []
    for k in (1, 2, 4):
        programs = local_skip.choose_programs(dead, cost, k, SCHEDULE)
        assert 1 <= len(programs) <= k
        fractions.append(local_skip.saved_fraction(dead, cost, programs))
    assert 0 < fractions[0] <= fractions[1] <= fractions[2] <= local_skip.dead_fraction(dead, cost)
    assert local_skip.saved_fraction(dead, cost, []) == 0.0
