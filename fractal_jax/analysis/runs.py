"""Trained runs as analysis inputs: `load_run(workdir)` and `predict(run, batches)`.

A run is rebuilt from its checkpoint alone: the metadata holds the config, the config names the
model and the data, and the state item holds the parameters and BatchNorm statistics. The
restored parameters are checked against the model the config describes, so a checkpoint that
belongs to another model is refused by name instead of failing deep inside `apply`.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Iterable, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fractal_jax.data import pipeline
from fractal_jax.training import experiment
from fractal_jax.training.checkpoint import checkpoint_dir, read_metadata, read_state

Variables = dict[str, Any]
COLLECTIONS = ("params", "batch_stats")  # what evaluation needs of the saved train state


class RunError(ValueError):
    """A workdir cannot be loaded as a trained run (e.g. it holds no checkpoint)."""


class ModelMismatchError(RunError):
    """A checkpoint's parameters do not fit the model that its config (or the caller) describes."""


@dataclasses.dataclass(frozen=True, eq=False)
class Run:
    """A trained model with everything needed to evaluate it on the data it was trained for."""

    workdir: str
    step: int
    config: ml_collections.ConfigDict
    model: nn.Module
    variables: Variables  # {"params", "batch_stats"}
    info: pipeline.DatasetInfo


def load_run(workdir: str, step: int | None = None) -> Run:
    """Returns the run saved in `workdir` at `step` (default: the newest readable checkpoint).

    Raises RunError if the workdir has no checkpoint (or not that step), ModelMismatchError if
    the saved parameters are not those of the model in the saved config, and CheckpointError if
    the files cannot be read.
    """
    missing_step = step is not None and not os.path.isdir(
        os.path.join(checkpoint_dir(workdir), str(step)))
    metadata = None if missing_step else read_metadata(workdir, step)
    if metadata is None:
        what = "no checkpoint" if step is None else f"no checkpoint for step {step}"
        raise RunError(
            f"{what} in {checkpoint_dir(workdir)}; train one first with\n  python -m "
            f"fractal_jax.main --config CONFIG_FILE --workdir {workdir}")
    config = ml_collections.ConfigDict(metadata["config"])
    info = experiment.dataset_info(config)
    model = experiment.build_model(config, info.num_classes)
    step = int(metadata["step"])
    variables = restore_variables(workdir, step, model, info.image_shape)
    return Run(workdir=workdir, step=step, config=config, model=model, variables=variables,
               info=info)


def restore_variables(workdir: str, step: int, model: nn.Module,
                      image_shape: tuple[int, ...]) -> Variables:
    """Returns {"params", "batch_stats"} of checkpoint `step`, checked to fit `model`.

    The state is restored without a target (as saved), then its parameter and statistics trees
    are compared with the model's abstract initialisation; the first differing path is named.
    """
    path = os.path.join(checkpoint_dir(workdir), str(step), "state")
    state = read_state(workdir, step)
    expected = jax.eval_shape(model.init, jax.random.key(0),
                              jnp.zeros((1, *image_shape), jnp.float32))
    variables = {c: state.get(c, {}) for c in COLLECTIONS}
    for collection in COLLECTIONS:  # parameters first: they name the layer that differs
        mismatch = first_mismatch(_shapes(expected.get(collection, {}), collection),
                                  _shapes(variables[collection], collection))
        if mismatch:
            raise ModelMismatchError(
                f"{path} is a checkpoint of another model: {mismatch}. It does not fit the "
                f"{type(model).__name__} it is loaded into; build the model from the config it "
                "was trained with (the saved config or the model code may have changed since).")
    return variables


def _shapes(tree: Any, prefix: str) -> dict[str, tuple[int, ...]]:
    """Returns {"prefix/block_0/.../kernel": shape} for every leaf of `tree`."""
    return {"/".join([prefix, *(str(getattr(k, "key", k)) for k in path)]): tuple(np.shape(leaf))
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def first_mismatch(expected: dict[str, tuple[int, ...]],
                   found: dict[str, tuple[int, ...]]) -> str | None:
    """Returns how the first (sorted) path that differs between the model's shapes (`expected`)
    and the checkpoint's (`found`) differs, None if they agree."""
    for path in sorted(expected.keys() | found.keys()):
        if path not in found:
            return f"it lacks {path} {expected[path]}"
        if path not in expected:
            return f"its {path} {found[path]} is not in the model"
        if expected[path] != found[path]:
            return f"its {path} has shape {found[path]} where the model has {expected[path]}"
    return None


def eval_batches(run: Run) -> Iterator[pipeline.Batch]:
    """Returns one pass over the run's eval split, batched and normalised as in training."""
    return experiment.eval_batches(run.config)


@functools.partial(jax.jit, static_argnames=("model", "column"))
def _probabilities(model: nn.Module, variables: Variables, images: jax.Array,
                   column: int | None) -> jax.Array:
    kwargs = {} if column is None else {"column": column}
    logits = model.apply(variables, images, train=False, **kwargs)
    return jax.nn.softmax(logits.astype(jnp.float32))


def probabilities(run: Run, images: np.ndarray | jax.Array,
                  column: int | None = None) -> jax.Array:
    """Returns the eval-mode class probabilities (N, num_classes) of a batch of images.

    `column` runs one FractalNet column alone (None: the full network). Compiled once per
    model, column and batch shape (the model is a static, hashable argument), so every
    equal-sized batch of every run of the same model reuses one program.
    """
    return _probabilities(run.model, run.variables, images, column)


def predict(run: Run, batches: Iterable[pipeline.Batch],
            column: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Returns (probabilities (N, num_classes), labels (N,)) over the real rows of `batches`.

    `column` predicts with one FractalNet column alone. Padding rows (mask False) are dropped,
    so N is the number of examples in the split.
    """
    probs, labels = [], []
    for batch in batches:
        mask = np.asarray(batch["mask"], bool)
        probs.append(np.asarray(probabilities(run, batch["image"], column))[mask])
        labels.append(np.asarray(batch["label"])[mask])
    return np.concatenate(probs), np.concatenate(labels)


def accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    """Returns the fraction of rows whose most probable class is the label."""
    return float(np.mean(np.argmax(probs, axis=-1) == labels))
