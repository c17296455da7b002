"""Dead work in local drop-path steps, and how much of it a few extra programs could skip.

A local plan at p_local = 0.15 leaves about 14% of the conv units dead (their outputs reach no
kept join input), but every batch draws another plan, so one program per plan is impossible and
a program that skips a set S of units serves only the plans whose dead units include S. These
pure functions measure that trade on sampled plans: which units each plan leaves dead, what each
unit costs, a greedy family of K skip sets (each one block's dead pattern), and the share of a
local step's convolution FLOPs that the family skips. The benchmark reports it for K = 1..8
(`experiments/benchmark.py`, "local-step skipping").

Measured on FractalNet-20 (p_local = 0.15): dead units hold 15% of a local step's convolution
FLOPs, but 4 programs skip 4.2% and 8 skip 5.7% of them (the dead sets are spread over many
patterns), i.e. under 4% of a paper-mix step for 8 more compiled programs; so local steps keep
the one masked program.
"""
from __future__ import annotations

import functools

import jax
import numpy as np

from fractal_jax.models import drop_path
from fractal_jax.models.schedule import NetworkSchedule

Unit = tuple[int, int, int]  # (block, column, position)


def units(schedule: NetworkSchedule) -> list[Unit]:
    """Every conv unit of the network, in the order of the columns of `dead_units`."""
    return [(b, k, p) for b, block in enumerate(schedule.blocks) for (k, p) in block.units]


@functools.partial(jax.jit, static_argnums=(1, 3))
def _dead(key: jax.Array, schedule: NetworkSchedule, p_local: jax.Array, num_plans: int):
    def one(k):
        live = drop_path.live_units(drop_path.sample_local(k, schedule, p_local), schedule)
        return jax.numpy.stack([~live[b][(c, p)] for b, c, p in units(schedule)])
    return jax.vmap(one)(jax.random.split(key, num_plans))


def dead_units(key: jax.Array, schedule: NetworkSchedule, p_local: float,
               num_plans: int) -> np.ndarray:
    """(num_plans, units) bool: which units each of `num_plans` sampled local plans leaves dead."""
    return np.asarray(_dead(key, schedule, np.float32(p_local), num_plans))


def unit_flops(schedule: NetworkSchedule, widths: tuple[int, ...], image_size: int,
               in_channels: int = 3) -> np.ndarray:
    """Forward FLOPs of each unit's 3×3 convolution (2 per multiply-add), per image; a column's
    first unit in a block reads the block input (the previous width, or the image)."""
    costs = []
    for b, block in enumerate(schedule.blocks):
        side = image_size // 2 ** b
        for k, p in block.units:
            cin = (widths[b - 1] if b else in_channels) if p == block.first_unit(k) else widths[b]
            costs.append(2.0 * side * side * 9 * cin * widths[b])
    return np.asarray(costs)


def _saved(dead: np.ndarray, cost: np.ndarray, programs: list[np.ndarray]) -> np.ndarray:
    """Per plan: the cost of the largest program skip set that the plan's dead units contain."""
    saved = np.zeros(len(dead))
    for skip in programs:
        fits = ~np.any(skip & ~dead, axis=1)
        saved = np.maximum(saved, np.where(fits, cost[skip].sum(), 0.0))
    return saved


def choose_programs(dead: np.ndarray, cost: np.ndarray, num_programs: int,
                    schedule: NetworkSchedule) -> list[np.ndarray]:
    """Up to `num_programs` skip sets (bool masks over `units`), picked greedily to skip the most
    expected cost; candidates are the dead units of one block of some sampled plan."""
    block_of = np.asarray([b for b, _, _ in units(schedule)])
    candidates = {tuple(row & (block_of == b)) for row in dead
                  for b in range(len(schedule.blocks)) if np.any(row & (block_of == b))}
    candidates = [np.asarray(c) for c in sorted(candidates)]
    chosen: list[np.ndarray] = []
    for _ in range(num_programs):
        base = _saved(dead, cost, chosen).sum()
        gains = [_saved(dead, cost, chosen + [c]).sum() - base for c in candidates]
        if not gains or max(gains) <= 0:
            break
        chosen.append(candidates[int(np.argmax(gains))])
    return chosen


def saved_fraction(dead: np.ndarray, cost: np.ndarray, programs: list[np.ndarray]) -> float:
    """The share of a local step's convolution FLOPs that `programs` skip, averaged over plans."""
    return float(_saved(dead, cost, programs).mean() / cost.sum())


def dead_fraction(dead: np.ndarray, cost: np.ndarray) -> float:
    """The share of convolution FLOPs that local plans leave dead (what skipping all could save)."""
    return float((dead * cost).sum(axis=1).mean() / cost.sum())

