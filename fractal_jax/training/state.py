"""The train state: everything a step reads and writes, as one pytree."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax.training import train_state


class TrainState(train_state.TrainState):
    """Flax's TrainState plus BatchNorm statistics and the drop-path rates.

    The rates live in the state as arrays (not Python constants baked into the step) so a
    vmapped sweep can give every member its own rates inside one compiled program.
    """

    batch_stats: Any
    rates: dict[str, jax.Array]


def create_train_state(model: nn.Module, tx: optax.GradientTransformation, key: jax.Array,
                       input_shape: tuple[int, ...], *, p_local: float = 0.0,
                       p_global: float = 0.0) -> TrainState:
    """Initialises parameters from `key` (pure: the same key gives the same state)."""
    variables = model.init(key, jnp.zeros(input_shape, jnp.float32))
    return TrainState.create(
        apply_fn=model.apply, params=variables["params"],
        batch_stats=variables.get("batch_stats", {}), tx=tx,
        rates={"p_local": jnp.asarray(p_local, jnp.float32),
               "p_global": jnp.asarray(p_global, jnp.float32)})
