"""Drop-path plans: which join inputs survive, drawn by a pure function of a PRNG key.

A plan is a pytree ``tuple[block][join] -> mask`` with one float32 entry per join input (in the
join's ascending column order; 1 = keep, 0 = drop). A per-batch plan's masks have shape ``(n,)``;
a per-sample plan's have shape ``(batch, n)``. Plans are ordinary model inputs
(``model.apply(..., plan=plan, train=True)``), so they can be printed, saved, replayed and ``vmap``ped
over keys and rates; rates may be traced values.

Paper semantics (spec §3): *local* drops each join input independently with ``p_local`` and, as in
the Caffe release, revives one input chosen uniformly if all were dropped; *global* picks one column
for the whole network, and every join keeps only that column's input; each mini-batch is global with
probability ``p_global`` (0.5 in the paper), else local.

Per-sample plans (``batch_size=...``) draw an independent plan for every example. Units off a
sample's surviving paths still run on that sample, so their activations still enter the batch
statistics of their BatchNorm layers; the per-batch default avoids that mixing.
"""
from __future__ import annotations

import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fractal_jax.models.schedule import NetworkSchedule

Plan = tuple[tuple[jax.Array, ...], ...]
Rate = Any  # a float or a traced scalar


def check_rate(name: str, value: Rate) -> None:
    """Rejects a concrete rate outside [0, 1]; traced rates cannot be checked and pass through."""
    if isinstance(value, jax.core.Tracer):
        return
    if isinstance(value, (numbers.Real, np.ndarray, jax.Array)) and np.ndim(value) == 0:
        v = float(value)
        if not 0.0 <= v <= 1.0 or np.isnan(v):
            raise ValueError(f"{name} must be a probability in [0, 1], got {v}.")
        return
    raise ValueError(f"{name} must be a scalar probability in [0, 1], got {value!r}.")


def full_plan(schedule: NetworkSchedule) -> Plan:
    """Keeps every input of every join: each join is the plain mean (the test-time network)."""
    return tuple(tuple(jnp.ones(len(j.columns), jnp.float32) for j in block.joins)
                 for block in schedule.blocks)


def _global_masks(schedule: NetworkSchedule, column: jax.Array) -> Plan:
    """Masks that keep only network column `column` (traced int, 1-based) at every join.

    A join that `column` does not reach keeps all inputs: its output feeds only dead columns, so
    the value is irrelevant, and keeping it finite keeps gradients exactly zero there.
    """
    blocks = []
    for block in schedule.blocks:
        target = jnp.minimum(column, block.num_columns)
        masks = []
        for join in block.joins:
            hit = jnp.asarray(join.columns) == target
            masks.append(jnp.where(hit.any(), hit, True).astype(jnp.float32))
        blocks.append(tuple(masks))
    return tuple(blocks)


def global_plan(schedule: NetworkSchedule, column: int) -> Plan:
    """The plan that runs network column `column` alone (1 = shallowest)."""
    schedule.block_column(0, column)  # validates the range with a clear error
    return _global_masks(schedule, jnp.asarray(column))


def _local_masks(key: jax.Array, schedule: NetworkSchedule, p_local: Rate) -> Plan:
    blocks = []
    index = 0
    for block in schedule.blocks:
        masks = []
        for join in block.joins:
            k_keep, k_revive = jax.random.split(jax.random.fold_in(key, index))
            index += 1
            n = len(join.columns)
            keep = jax.random.bernoulli(k_keep, 1.0 - p_local, (n,))
            revive = jax.nn.one_hot(jax.random.randint(k_revive, (), 0, n), n, dtype=bool)
            masks.append(jnp.where(keep.any(), keep, revive).astype(jnp.float32))
        blocks.append(tuple(masks))
    return tuple(blocks)


def sample_mode(key: jax.Array, schedule: NetworkSchedule,
                p_global: Rate) -> tuple[jax.Array, jax.Array]:
    """Returns (is_global, column): the mode `sample` draws for `key` (column 1-based).

    Split out so that a caller can pick the mode on the host and run a program that computes
    only the chosen column (training/programs.py) while drawing exactly the plans of `sample`.
    """
    k_mode, k_column, _ = jax.random.split(key, 3)
    is_global = jax.random.uniform(k_mode) < p_global
    return is_global, jax.random.randint(k_column, (), 1, schedule.max_columns + 1)


def sample_local(key: jax.Array, schedule: NetworkSchedule, p_local: Rate) -> Plan:
    """The local plan `sample` draws for `key` when its mode comes out local."""
    check_rate("p_local", p_local)
    return _local_masks(jax.random.split(key, 3)[2], schedule, p_local)


def _sample_one(key: jax.Array, schedule: NetworkSchedule, p_local: Rate, p_global: Rate) -> Plan:
    is_global, column = sample_mode(key, schedule, p_global)
    return jax.tree.map(lambda g, l: jnp.where(is_global, g, l),
                        _global_masks(schedule, column), sample_local(key, schedule, p_local))


def is_per_sample(plan: Plan) -> bool:
    """Whether `plan` holds one plan per example (masks of shape (batch, n)), not one per batch."""
    return any(jnp.ndim(mask) == 2 for block in plan for mask in block)


def live_units(plan: Plan, schedule: NetworkSchedule) -> tuple[dict[tuple[int, int], jax.Array], ...]:
    """Which conv units of a per-batch plan reach the output: ``[block][(column, position)]``.

    A unit is live when a chain of kept join inputs carries its output to the block's output
    (the deepest column after the last join). Dead units do not change the loss, so a program
    that skips them and one that computes and masks them agree once dead units also leave their
    BatchNorm statistics alone (`fractal.keep_live_batch_stats`). Entries are boolean scalars
    (traceable).
    """
    out = []
    for block, masks in zip(schedule.blocks, plan):
        if any(jnp.ndim(m) != 1 for m in masks):
            raise ValueError("live_units needs a per-batch plan (masks of shape (n,)); per-sample "
                             "plans run every unit on some sample.")
        joins = {j.position: (j.columns, m) for j, m in zip(block.joins, masks)}
        # needed[k]: the value of column k at this point of the walk reaches the block output.
        needed = {k: jnp.asarray(k == block.num_columns) for k in range(1, block.num_columns + 1)}
        live = {}
        for p in range(block.depth, 0, -1):
            if p in joins:
                columns, mask = joins[p]
                out_needed = jnp.any(jnp.stack([needed[k] for k in columns]))
                for k, keep in zip(columns, mask):
                    needed[k] = out_needed & (keep > 0)
            for k in block.columns_at(p):
                live[(k, p)] = needed[k]
        out.append(live)
    return tuple(out)


def sample(key: jax.Array, schedule: NetworkSchedule, p_local: Rate, p_global: Rate,
           *, batch_size: int | None = None) -> Plan:
    """Draws a drop-path plan: global with probability `p_global`, else local with `p_local`.

    Returns a per-batch plan, or with `batch_size` a per-sample plan (leading batch axis). Pure in
    `key`: the same key and rates always give the same plan. Jit- and vmap-able over key and rates.
    """
    check_rate("p_local", p_local)
    check_rate("p_global", p_global)
    if batch_size is None:
        return _sample_one(key, schedule, p_local, p_global)
    keys = jax.random.split(key, batch_size)
    return jax.vmap(lambda k: _sample_one(k, schedule, p_local, p_global))(keys)


def describe(plan: Plan, schedule: NetworkSchedule) -> str:
    """One line per block naming the surviving columns of each join, e.g. 'block 1: J{2,3}->{3}'."""
    lines = []
    for b, (block, masks) in enumerate(zip(schedule.blocks, plan)):
        parts = []
        for join, mask in zip(block.joins, masks):
            m = np.asarray(mask)
            if m.ndim == 1:
                kept = ",".join(str(c) for c, keep in zip(join.columns, m) if keep)
                parts.append(f"J{{{','.join(map(str, join.columns))}}}->{{{kept}}}")
            else:
                parts.append(f"J{{{','.join(map(str, join.columns))}}} keep-rate "
                             + "/".join(f"{r:.2f}" for r in m.mean(0)))
        lines.append(f"block {b + 1}: " + ("; ".join(parts) if parts else "(no joins)"))
    return "\n".join(lines)
