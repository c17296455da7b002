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
from fractal_jax.checks import check_choice
from fractal_jax.training import evaluate, experiment, parallel
from fractal_jax.training.checkpoint import (checkpoint_dir, read_eval_batch_stats,
                                             read_metadata, read_state)

Variables = dict[str, Any]
COLLECTIONS = ("params", "batch_stats")  # what evaluation needs of the saved train state


class RunError(ValueError):
    """A workdir cannot be loaded as a trained run (e.g. it holds no checkpoint)."""


class ModelMismatchError(RunError):
    """A checkpoint's parameters do not fit the model that its config (or the caller) describes."""


BN_STATISTICS = ("precise", "stored")


@dataclasses.dataclass(frozen=True, eq=False)
class Run:
    """A trained model with everything needed to evaluate it on the data it was trained for.

    `variables` hold the running BatchNorm statistics of training ("stored"); `eval_batch_stats`
    the precise statistics of each network (`training/evaluate.py`) by network name, those its
    reported accuracies were computed with, or None for a run evaluated without them.
    """

    workdir: str
    step: int
    config: ml_collections.ConfigDict
    model: nn.Module
    variables: Variables  # {"params", "batch_stats"}
    info: pipeline.DatasetInfo
    eval_batch_stats: dict[str, Any] | None = None


def network_variables(run: Run, column: int | None = None, bn: str = "precise") -> Variables:
    """{"params", "batch_stats"} to evaluate the full network (`column` None) or one column with:
    its precise statistics (`bn="precise"`, the default; the stored ones for a run evaluated
    without them) or the running statistics of training (`bn="stored"`)."""
    check_choice("bn", bn, BN_STATISTICS)
    if bn == "stored" or run.eval_batch_stats is None:
        return run.variables
    return {"params": run.variables["params"],
            "batch_stats": run.eval_batch_stats[evaluate.network_name(column)]}


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
               info=info, eval_batch_stats=_eval_batch_stats(workdir, step, config, model,
                                                             info, variables))


def _eval_batch_stats(workdir: str, step: int, config: ml_collections.ConfigDict, model,
                      info: pipeline.DatasetInfo, variables: Variables) -> dict | None:
    """The precise statistics saved with an evaluated checkpoint; for a checkpoint saved between
    evaluations, the same computation the training loop makes (deterministic)."""
    if not config.get("precise_bn", {}).get("enabled", False):
        return None
    saved = read_eval_batch_stats(workdir, step)
    return saved if saved is not None else _precise_stats(config, model, info, variables)


def _precise_stats(config: ml_collections.ConfigDict, model, info: pipeline.DatasetInfo,
                   variables: Variables) -> dict:
    """Every network's precise statistics, as the training loop computes them for `config`."""
    config = config.copy_and_resolve_references()
    config.precise_bn.enabled = True
    calibration = experiment.calibration_batches(config, info.num_train_examples)
    return evaluate.Evaluator(model, parallel.create_mesh()).precise_stats(variables, calibration)


def with_precise_stats(run: Run) -> Run:
    """`run`, with precise statistics computed as training would (with its config's
    calibration settings) if it was evaluated without them."""
    if run.eval_batch_stats is not None:
        return run
    return dataclasses.replace(run, eval_batch_stats=_precise_stats(
        run.config, run.model, run.info, run.variables))


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


def probabilities(run: Run, images: np.ndarray | jax.Array, column: int | None = None,
                  bn: str = "precise") -> jax.Array:
    """Returns the eval-mode class probabilities (N, num_classes) of a batch of images.

    `column` runs one FractalNet column alone (None: the full network), with the BatchNorm
    statistics `bn` names (`network_variables`). Compiled once per model, column and batch
    shape (the model is a static, hashable argument), so every equal-sized batch of every run of
    the same model reuses one program.
    """
    return _probabilities(run.model, network_variables(run, column, bn), images, column)


def predict(run: Run, batches: Iterable[pipeline.Batch], column: int | None = None,
            bn: str = "precise") -> tuple[np.ndarray, np.ndarray]:
    """Returns (probabilities (N, num_classes), labels (N,)) over the real rows of `batches`.

    `column` predicts with one FractalNet column alone, with the BatchNorm statistics `bn`
    names. Padding rows (mask False) are dropped, so N is the number of examples in the split.
    """
    probs, labels = [], []
    for batch in batches:
        mask = np.asarray(batch["mask"], bool)
        probs.append(np.asarray(probabilities(run, batch["image"], column, bn))[mask])
        labels.append(np.asarray(batch["label"])[mask])
    return np.concatenate(probs), np.concatenate(labels)


def accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    """Returns the fraction of rows whose most probable class is the label."""
    return float(np.mean(np.argmax(probs, axis=-1) == labels))
