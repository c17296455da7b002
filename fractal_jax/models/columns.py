"""Single columns of a FractalNet as plain networks ("anytime" prediction, spec §3 and Table 4).

`PlainNet` is a chain of conv units with the FractalNet trunk (stem, per-block widths and dropout,
pools, head); trained from scratch it is the paper's plain baseline. `extract_column` turns column
c of a trained FractalNet into a PlainNet with its own variables, equal to the full model run
with ``column=c`` (or under ``drop_path.global_plan(c)``).
"""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax

from fractal_jax.models.fractal import ConvNet, ConvUnit, FractalNet, unit_name
from fractal_jax.models.pool import max_pool_2x2

Variables = dict[str, Any]


class PlainBlock(nn.Module):
    """`depth` conv units in a row, then an optional 2×2 max-pool."""

    depth: int
    unit: Callable[..., ConvUnit]
    pool: bool = True
    pool_impl: str = "windows"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        for i in range(self.depth):
            x = self.unit(name=f"unit_{i}")(x, train)
        return max_pool_2x2(x, self.pool_impl) if self.pool else x


class PlainNet(ConvNet):
    """A plain conv chain with `units_per_block[b]` units in block b (no joins, no drop-path)."""

    units_per_block: tuple[int, ...] = (4, 4, 4, 4, 4)

    def __post_init__(self):
        if len(self.units_per_block) != self.num_blocks or min(self.units_per_block) < 1:
            raise ValueError(f"units_per_block must give a positive unit count for each of the "
                             f"{self.num_blocks} blocks, got {tuple(self.units_per_block)}.")
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False, features: bool = False):
        x = self.apply_stem(x, train)
        block_cls = self.block_class(PlainBlock, static_argnums=(2,))  # train
        outputs = []
        for b, depth in enumerate(self.units_per_block):
            x = block_cls(depth, self.unit_factory(b), self.pools_after(b), self.pool_impl,
                          name=f"block_{b}")(x, train)
            outputs.append(x)
        return tuple(outputs) if features else self.apply_head(x)


def column_network(model: FractalNet, column: int) -> PlainNet:
    """The PlainNet with the shape of `model`'s network column `column`."""
    schedule = model.network_schedule
    depths = tuple(len(b.column_positions(schedule.block_column(i, column)))
                   for i, b in enumerate(schedule.blocks))
    shared = {f: getattr(model, f) for f in (
        "num_classes", "num_blocks", "widths", "dropout", "dropout_position", "dropout_type",
        "head", "stem", "pool_last_block", "bn_momentum", "bn_affine", "bn_bias_correction",
        "weight_init", "dtype", "remat", "conv_impl", "pool_impl", "bn_impl",
        "dropout_impl")}
    return PlainNet(units_per_block=depths, **shared)


def extract_column(model: FractalNet, variables: Variables, column: int
                   ) -> tuple[PlainNet, Variables]:
    """Column `column` of a FractalNet as a standalone PlainNet and its own copy of the variables.

    The result's output equals ``model.apply(variables, x, column=column)`` in both modes, with
    the BatchNorm statistics of `variables`: pass the column's own precise statistics
    (`analysis.runs.network_variables(run, column)`), not the running statistics of training,
    which describe neither the column nor the full network.
    """
    schedule = model.network_schedule
    plain = column_network(model, column)
    out: Variables = {}
    for collection, tree in variables.items():
        new = {k: v for k, v in tree.items() if not k.startswith("block_")}  # stem, head
        for b, block in enumerate(schedule.blocks):
            k = schedule.block_column(b, column)
            source = tree[f"block_{b}"]
            new[f"block_{b}"] = {f"unit_{i}": source[unit_name(k, p)]
                                 for i, p in enumerate(block.column_positions(k))}
        out[collection] = new
    return plain, jax.tree.map(lambda a: a.copy(), out)
