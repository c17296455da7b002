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
from fractal_jax.models.fractal import FractalNet
from fractal_jax.training.state import TrainState

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)


def train_step(state: TrainState, batch: Batch, key: jax.Array, *, model: nn.Module,
               per_sample: bool = False) -> tuple[TrainState, Metrics]:
    """One SGD step. `key` (the run key folded with the step) gives the plan and dropout masks.

    For a FractalNet a drop-path plan is drawn from the state's rates (per batch, or per sample
    with `per_sample`); other models get only the dropout key.
    """
    plan_key, dropout_key = jax.random.split(key)
    kwargs: dict[str, Any] = {}
    if isinstance(model, FractalNet):
        batch_size = batch["image"].shape[0] if per_sample else None
        kwargs["plan"] = drop_path.sample(plan_key, model.network_schedule,
                                          state.rates["p_local"], state.rates["p_global"],
                                          batch_size=batch_size)

    def loss_fn(params):
        logits, updates = state.apply_fn(
            {"params": params, "batch_stats": state.batch_stats}, batch["image"], train=True,
            rngs={"dropout": dropout_key}, mutable=["batch_stats"], **kwargs)
        return cross_entropy(logits, batch["label"]).mean(), (logits, updates)

    (loss, (logits, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    state = state.apply_gradients(grads=grads, batch_stats=updates.get("batch_stats", {}))
    metrics = {"loss": loss,
               "accuracy": (logits.argmax(-1) == batch["label"]).mean(),
               "grad_norm": optax.global_norm(grads)}
    return state, metrics


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
