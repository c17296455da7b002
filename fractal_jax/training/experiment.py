"""What an experiment's config builds, for the loop, sweeps, analysis and the command lines: the
model, the dataset's facts and batches, the checkpoint metadata and the workdir checks."""
from __future__ import annotations

import itertools
import os
import shutil
import time
from typing import Any, Iterator

import jax
import ml_collections
import numpy as np

import fractal_jax
from fractal_jax import config as config_lib
from fractal_jax.data import pipeline
from fractal_jax.data.sources import DataError
from fractal_jax.models.registry import create_model
from fractal_jax.training import multihost, parallel
from fractal_jax.training.checkpoint import read_metadata
from fractal_jax.training.lock import workdir_lock

# Marks a sweep's workdir (`sweep.py`), which a single run must not train in.
SWEEP_FILE = "sweep.json"


class WorkdirConflictError(ValueError):
    """The workdir holds a checkpoint of a different experiment."""


def build_model(config: ml_collections.ConfigDict, num_classes: int):
    """The registry model `config.model.name` with every model.* key that is set."""
    kwargs = {k: tuple(v) if isinstance(v, list) else v
              for k, v in config.model.to_dict().items() if k != "name" and v is not None}
    return create_model(config.model.name, num_classes, **kwargs)


def check_batch_sizes(config: ml_collections.ConfigDict) -> None:
    """Both batch sizes must split evenly over the devices."""
    parallel.check_batch_size(config.batch_size)
    parallel.check_batch_size(config.eval_batch_size, "eval_batch_size")


def _data_kwargs(config: ml_collections.ConfigDict) -> dict[str, Any]:
    return dict(data_dir=config.data_dir, path=config.data.path, normalize=config.data.normalize)


def dataset_info(config: ml_collections.ConfigDict) -> pipeline.DatasetInfo:
    """Returns the DatasetInfo of the config's dataset and splits, which sizes model and schedule.

    Raises DataError if the training split holds fewer examples than one batch.
    """
    info = pipeline.get_dataset_info(config.dataset, train_split=config.data.train_split,
                                     eval_split=config.data.eval_split,
                                     data_dir=config.data_dir, path=config.data.path)
    if info.num_train_examples < config.batch_size:
        raise DataError(f"The {config.data.train_split!r} split of {config.dataset} has "
                        f"{info.num_train_examples} examples, fewer than one batch "
                        f"(batch_size={config.batch_size}); lower batch_size or add data.")
    return info


def train_batches(config: ml_collections.ConfigDict, start_step: int,
                  seed: int | None = None) -> Iterator[pipeline.Batch]:
    """Returns the training batches of steps start_step + 1 ... num_train_steps, in the order of
    `seed` (default: the config's)."""
    return pipeline.train_batches(
        config.dataset, global_batch_size=config.batch_size,
        seed=config.seed if seed is None else seed, start_step=start_step,
        num_steps=config.num_train_steps - start_step, augment=config.data.augment,
        max_shift=config.data.max_shift, flip=config.data.flip, split=config.data.train_split,
        **_data_kwargs(config))


def eval_batches(config: ml_collections.ConfigDict) -> Iterator[pipeline.Batch]:
    """Returns one ordered, masked pass over the config's eval split."""
    return pipeline.eval_batches(config.dataset, batch_size=config.eval_batch_size,
                                 split=config.data.eval_split,
                                 train_split=config.data.train_split, **_data_kwargs(config))


def calibration_batches(config: ml_collections.ConfigDict, num_train_examples: int,
                        seed: int | None = None) -> list[np.ndarray] | None:
    """The calibration set of precise BatchNorm statistics (`evaluate.py`), None when
    precise_bn is off: the first precise_bn.num_examples training examples (at most the split)
    in the order of `seed` (default: the config's), preprocessed as evaluation does
    (unaugmented; ImageNet's resize and central crop, not its training crops) and normalised
    as in training, in batches of precise_bn.batch_size (default: all in one); each host's
    slice."""
    if not config.precise_bn.enabled:
        return None
    count = min(config.precise_bn.num_examples, num_train_examples)
    batch_size = config.precise_bn.batch_size or count - count % jax.device_count()
    parallel.check_batch_size(batch_size, "precise_bn.batch_size")
    num_batches = max(1, count // batch_size)
    batches = pipeline.train_batches(
        config.dataset, global_batch_size=batch_size, seed=config.seed if seed is None else seed,
        start_step=0, num_steps=num_batches, augment="none", eval_transform=True,
        split=config.data.train_split, **_data_kwargs(config))
    return [b["image"] for b in itertools.islice(batches, num_batches)]


def checkpoint_metadata(config: ml_collections.ConfigDict, step: int, *, data_seed: int,
                        nonfinite_skipped: int, nonfinite_consecutive: int,
                        train_window: list[dict[str, float]]) -> dict[str, Any]:
    """What a checkpoint records besides the state: the run's config, where its data order
    stands, the batches skipped as non-finite so far (and in a row, up to this step), the
    metrics of the steps since its last train record (which the next record averages) and the
    versions that wrote it."""
    return {"config": config_lib.to_json_dict(config), "step": step,
            "data_position": {"seed": data_seed, "next_step": step},
            "versions": {"fractal_jax": fractal_jax.__version__, "jax": jax.__version__},
            "nonfinite_skipped": nonfinite_skipped,
            "nonfinite_consecutive": nonfinite_consecutive, "train_window": train_window}


def refuse_other_experiment(workdir: str, config: ml_collections.ConfigDict) -> None:
    """Raises WorkdirConflictError if `workdir` holds a sweep or a checkpoint of another
    experiment (decided by process 0 for every process of a multi-host run)."""
    multihost.decide("check the workdir's experiment",
                     lambda: _refuse_other_experiment(workdir, config))


def _refuse_other_experiment(workdir: str, config: ml_collections.ConfigDict) -> None:
    if os.path.exists(os.path.join(workdir, SWEEP_FILE)):
        raise WorkdirConflictError(
            f"Workdir {workdir!r} holds a drop-path sweep, not a single run; its members are "
            f"runs under {os.path.join(workdir, 'members')}. Use another --workdir.")
    metadata = read_metadata(workdir)
    if not metadata:
        return
    diffs = config_lib.experiment_differences(metadata.get("config", {}),
                                              config_lib.to_json_dict(config))
    if diffs:
        raise WorkdirConflictError(
            f"Workdir {workdir!r} holds a checkpoint of a different experiment; it differs in:\n  "
            + "\n  ".join(diffs) + "\nUse another --workdir, or pass --fresh to move the old "
            "run aside and start again.")


def move_aside(workdir: str) -> str | None:
    """Renames an existing workdir to WORKDIR.old-<time> (nothing is deleted); returns the path.

    Raises WorkdirLockError, moving nothing, while a live run holds the workdir.
    """
    if not os.path.exists(workdir):
        return None
    target = f"{workdir.rstrip('/')}.old-{time.strftime('%Y%m%d-%H%M%S')}"
    with workdir_lock(workdir):
        shutil.move(workdir, target)
    return target
