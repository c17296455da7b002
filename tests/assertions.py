"""Assertions that several test modules share."""
import jax
import jax.numpy as jnp

from fractal_jax.models.schedule import BlockSchedule


def assert_only_column_units_get_gradients(grads, column: int, num_blocks: int = 2,
                                           num_columns: int = 3) -> None:
    """Every unit on column `column`'s path gets a nonzero gradient, every other unit exactly 0."""
    keep = {f"unit_c{column}_p{p}" for p in BlockSchedule(num_columns).column_positions(column)}
    for b in range(num_blocks):
        for name, g in grads[f"block_{b}"].items():
            total = sum(float(jnp.abs(x).sum()) for x in jax.tree.leaves(g))
            assert (total > 0) == (name in keep), (b, name, total)
