"""Pure train and eval steps: one SGD step of the network a plan or a column names.

The same functions run on one device, sharded over a mesh and vmapped over K models
(`programs.py` compiles them): nothing here knows how many devices or models there are, nor
how a plan was drawn.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from fractal_jax.models import drop_path
from fractal_jax.models.fractal import keep_live_batch_stats
from fractal_jax.training.state import TrainState

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)


def train_step(state: TrainState, batch: Batch, dropout_key: jax.Array, *, model: nn.Module,
               plan: drop_path.Plan | None = None, column: int | None = None,
               bn_update: str = "live",
               skip_nonfinite: bool = False) -> tuple[TrainState, Metrics]:
    """One SGD step; returns the new state and the batch's loss, accuracy and gradient norm.

    A FractalNet trains the network that `plan` (a drop-path plan, traced) or `column` (static:
    that column alone, computing only its units) names; with neither, every join takes all its
    inputs. `bn_update` says whose BatchNorm statistics a plan's step updates: "live" (units
    the plan leaves dead keep theirs, so a column step equals the step of that column's global
    plan, which `programs.py` relies on to skip dead work) or "all" (every unit computed,
    every unit updated, as in Caffe).

    A step is finite when its loss, its gradient and everything it would write (parameters,
    optimiser state, BatchNorm statistics) are; its metrics report ``nonfinite`` = 1 when it is
    not. `skip_nonfinite`: such a step leaves parameters, optimiser and BatchNorm state
    unchanged (the step count still advances, keeping later keys aligned).
    """
    kwargs = {}
    if plan is not None:
        kwargs["plan"] = plan
    if column is not None:
        kwargs["column"] = column

    def loss_fn(params):
        logits, updates = state.apply_fn(
            {"params": params, "batch_stats": state.batch_stats}, batch["image"], train=True,
            rngs={"dropout": dropout_key}, mutable=["batch_stats"], **kwargs)
        return cross_entropy(logits, batch["label"]).mean(), (logits, updates)

    (loss, (logits, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    batch_stats = updates.get("batch_stats", {})
    if plan is not None and bn_update == "live":
        batch_stats = keep_live_batch_stats(model, batch_stats, state.batch_stats, plan)
    grad_norm = optax.global_norm(grads)
    new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
    metrics = {"loss": loss,
               "accuracy": (logits.argmax(-1) == batch["label"]).mean(),
               "grad_norm": grad_norm}
    # A finite loss and gradient can still overflow a BatchNorm variance or a momentum.
    finite = (jnp.isfinite(loss) & jnp.isfinite(grad_norm)
              & all_finite((new_state.params, new_state.opt_state, new_state.batch_stats)))
    if skip_nonfinite:
        new_state = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new_state,
                                 state).replace(step=new_state.step)
    metrics["nonfinite"] = 1.0 - finite.astype(jnp.float32)
    return new_state, metrics


def all_finite(tree) -> jax.Array:
    """Whether every floating-point value of `tree` is finite (a scalar boolean)."""
    checks = [jnp.isfinite(x).all() for x in jax.tree.leaves(tree)
              if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.stack(checks).all() if checks else jnp.asarray(True)


def eval_step(variables: dict, batch: Batch, *, model: nn.Module,
              column: int | None = None) -> Metrics:
    """Sums of loss and correct predictions over the batch's real (mask) examples.

    `variables` are {"params", "batch_stats"}: the statistics decide which network is measured
    (`evaluate.py`). `column` evaluates one FractalNet column alone; sums (not means) let padded
    batches and several devices add up exactly.
    """
    kwargs = {} if column is None else {"column": column}
    logits = model.apply(variables, batch["image"], train=False, **kwargs)
    mask = batch["mask"].astype(jnp.float32)
    return {"loss_sum": (cross_entropy(logits, batch["label"]) * mask).sum(),
            "correct": ((logits.argmax(-1) == batch["label"]) * mask).sum(),
            "count": mask.sum()}
