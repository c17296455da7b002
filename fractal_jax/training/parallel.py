"""Data parallelism with `jax.jit` and shardings: the batch is split over a 1-D device mesh,
parameters are replicated. The same program runs on one CPU, N GPUs or a multi-host slice."""
from __future__ import annotations

from typing import Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def create_mesh() -> Mesh:
    # Auto axis types: plain jit + NamedSharding propagation (the default became Explicit).
    return jax.make_mesh((jax.device_count(),), (DATA_AXIS,),
                         axis_types=(jax.sharding.AxisType.Auto,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def data_sharded(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(DATA_AXIS))


def check_batch_size(batch_size: int, name: str = "batch_size") -> None:
    """The global batch must split evenly over devices and hosts."""
    n = jax.device_count()
    if batch_size % n:
        raise ValueError(f"{name}={batch_size} cannot be split over {n} devices; "
                         f"use a multiple of {n} (e.g. {n * max(1, batch_size // n)}).")


def to_global(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assembles each host's local slice of the batch into one array sharded over the mesh."""
    sharding = data_sharded(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


def jit_train_step(step_fn: Callable, mesh: Mesh) -> Callable:
    """Compiles `step_fn(state, batch, key)` with replicated state and a data-sharded batch.

    The input state is donated, so its buffers are reused for the new state.
    """
    rep, data = replicated(mesh), data_sharded(mesh)
    return jax.jit(step_fn, in_shardings=(rep, data, rep), out_shardings=(rep, rep),
                   donate_argnums=0)


def jit_eval_step(step_fn: Callable, mesh: Mesh) -> Callable:
    rep, data = replicated(mesh), data_sharded(mesh)
    return jax.jit(step_fn, in_shardings=(rep, data), out_shardings=rep)
