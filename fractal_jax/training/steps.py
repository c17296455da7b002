"""Pure train and eval steps: ``train_step(state, batch, key) -> (state, metrics)``.

The same functions run on one device, sharded over a mesh (`parallel.py`) and vmapped over K
models (`sweep.py`): nothing here knows how many devices or models there are.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from fractal_jax.models import drop_path
from fractal_jax.models.fractal import FractalNet, keep_live_batch_stats
from fractal_jax.training.state import TrainState

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)


Mode = str | int  # "sample", "local" or a network column (1-based)


def train_step(state: TrainState, batch: Batch, key: jax.Array, *, model: nn.Module,
               per_sample: bool = False, mode: Mode = "sample",
               skip_nonfinite: bool = False) -> tuple[TrainState, Metrics]:
    """One SGD step. `key` (the run key folded with the step) gives the plan and dropout masks.

    For a FractalNet, `mode` says which drop-path plan the step trains:
      - "sample": the plan `drop_path.sample` draws from the state's rates (per batch, or per
        sample with `per_sample`); every unit is computed and dead join inputs are masked.
      - "local": the local plan `sample` would draw for this key (masked the same way).
      - column c: the global plan of column c, computing only that column's units.
    With per-batch plans, units the plan leaves dead keep their BatchNorm statistics, so a
    column-c step equals a "sample" step whose key draws column c (training/skipping.py relies
    on it). Other models get only the dropout key.

    `skip_nonfinite`: a step with a non-finite loss or gradient leaves parameters, optimiser
    and BatchNorm state unchanged (the step count still advances, keeping later keys aligned)
    and reports ``nonfinite`` = 1 in its metrics.
    """
    plan_key, dropout_key = jax.random.split(key)
    kwargs: dict[str, Any] = {}
    plan = None
    if isinstance(model, FractalNet):
        schedule = model.network_schedule
        if isinstance(mode, int):
            kwargs["column"] = mode
        elif mode == "local":
            plan = drop_path.sample_local(plan_key, schedule, state.rates["p_local"])
        elif mode == "sample":
            batch_size = batch["image"].shape[0] if per_sample else None
            plan = drop_path.sample(plan_key, schedule, state.rates["p_local"],
                                    state.rates["p_global"], batch_size=batch_size)
        else:
            raise ValueError(f'mode must be "sample", "local" or a column number, got {mode!r}.')
        if plan is not None:
            kwargs["plan"] = plan

    def loss_fn(params):
        logits, updates = state.apply_fn(
            {"params": params, "batch_stats": state.batch_stats}, batch["image"], train=True,
            rngs={"dropout": dropout_key}, mutable=["batch_stats"], **kwargs)
        return cross_entropy(logits, batch["label"]).mean(), (logits, updates)

    (loss, (logits, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    batch_stats = updates.get("batch_stats", {})
    if plan is not None and not per_sample:
        batch_stats = keep_live_batch_stats(model, batch_stats, state.batch_stats, plan)
    grad_norm = optax.global_norm(grads)
    new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
    metrics = {"loss": loss,
               "accuracy": (logits.argmax(-1) == batch["label"]).mean(),
               "grad_norm": grad_norm}
    if skip_nonfinite:
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        new_state = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new_state,
                                 state).replace(step=new_state.step)
        metrics["nonfinite"] = 1.0 - finite.astype(jnp.float32)
    return new_state, metrics


def eval_step(state: TrainState, batch: Batch, *, column: int | None = None) -> Metrics:
    """Sums of loss and correct predictions over the batch's real (mask) examples.

    `column` evaluates one FractalNet column alone; sums (not means) let padded batches and
    several devices add up exactly.
    """
    kwargs = {} if column is None else {"column": column}
    logits = state.apply_fn({"params": state.params, "batch_stats": state.batch_stats},
                            batch["image"], train=False, **kwargs)
    mask = batch["mask"].astype(jnp.float32)
    return {"loss_sum": (cross_entropy(logits, batch["label"]) * mask).sum(),
            "correct": ((logits.argmax(-1) == batch["label"]) * mask).sum(),
            "count": mask.sum()}
