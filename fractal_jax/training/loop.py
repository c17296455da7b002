"""`train(config, workdir)`: resume, train, evaluate every column, log, checkpoint.

Determinism: the step key is ``fold_in(run_key, step)`` and the batch at step s is a pure
function of (seed, s), so a run resumed from a checkpoint at step s continues exactly as an
uninterrupted one; metric records written after that checkpoint are dropped and written again.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import shutil
import sys
import time
from typing import Any, Iterator

import jax
import ml_collections
import numpy as np
import tqdm

import fractal_jax
from fractal_jax import config as config_lib
from fractal_jax.analysis import plots
from fractal_jax.data import pipeline
from fractal_jax.data.sources import DataError
from fractal_jax.models.fractal import FractalNet
from fractal_jax.models.registry import create_model
from fractal_jax.training import optim, parallel, skipping, steps
from fractal_jax.training.checkpoint import Checkpointer, read_metadata
from fractal_jax.training.lock import workdir_lock
from fractal_jax.training.metrics import MetricsWriter, read_metrics, truncate_metrics
from fractal_jax.training.state import TrainState, create_train_state


class NonFiniteLossError(RuntimeError):
    """A NaN or Inf loss or gradient stopped training; the last good checkpoint is untouched."""


class WorkdirConflictError(ValueError):
    """The workdir holds a checkpoint of a different experiment."""


def build_model(config: ml_collections.ConfigDict, num_classes: int):
    kwargs = {k: tuple(v) if isinstance(v, list) else v
              for k, v in config.model.to_dict().items() if k != "name" and v is not None}
    return create_model(config.model.name, num_classes, **kwargs)


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


def train_batches(config: ml_collections.ConfigDict, start_step: int) -> Iterator[pipeline.Batch]:
    """Returns the config's training batches of steps start_step + 1 ... num_train_steps."""
    return pipeline.train_batches(
        config.dataset, global_batch_size=config.batch_size, seed=config.seed,
        start_step=start_step, num_steps=config.num_train_steps - start_step,
        augment=config.data.augment, max_shift=config.data.max_shift, flip=config.data.flip,
        split=config.data.train_split, **_data_kwargs(config))


def eval_batches(config: ml_collections.ConfigDict) -> Iterator[pipeline.Batch]:
    """Returns one ordered, masked pass over the config's eval split, exactly as `train` evaluates."""
    return pipeline.eval_batches(config.dataset, batch_size=config.eval_batch_size,
                                 split=config.data.eval_split,
                                 train_split=config.data.train_split, **_data_kwargs(config))


def eval_columns(model) -> list[int | None]:
    """None (the full network) and, for a FractalNet, every column alone."""
    if isinstance(model, FractalNet):
        return [None] + list(range(1, model.network_schedule.max_columns + 1))
    return [None]


def evaluate(state: TrainState, eval_fns: dict, batches: Iterator, mesh) -> dict[str, float]:
    """Accuracy and mean loss of the full network and of every column over one eval pass."""
    totals: dict[Any, dict[str, float]] = {c: {"loss_sum": 0.0, "correct": 0.0, "count": 0.0}
                                           for c in eval_fns}
    for batch in batches:
        batch = parallel.to_global(batch, mesh)
        for column, fn in eval_fns.items():
            for k, v in jax.device_get(fn(state, batch)).items():
                totals[column][k] += float(v)
    out = {}
    for column, t in totals.items():
        suffix = "" if column is None else f"/column_{column}"
        out[f"accuracy{suffix}"] = t["correct"] / max(t["count"], 1)
        out[f"loss{suffix}"] = t["loss_sum"] / max(t["count"], 1)
    return out


def _refuse_other_experiment(workdir: str, config: ml_collections.ConfigDict) -> None:
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


def checkpoint_metadata(config: ml_collections.ConfigDict, step: int) -> dict[str, Any]:
    return {"config": config_lib.to_json_dict(config), "step": step,
            "data_position": {"seed": config.seed, "next_step": step},
            "versions": {"fractal_jax": fractal_jax.__version__, "jax": jax.__version__}}


def train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Trains (or resumes) the experiment in `workdir`; returns the final eval metrics.

    Config, data and model are checked before the workdir is touched. The run holds the
    workdir's lock throughout (`lock.py`), so a second run on the same workdir is refused.
    """
    config = config_lib.validate(config)
    parallel.check_batch_size(config.batch_size)
    parallel.check_batch_size(config.eval_batch_size, "eval_batch_size")
    info = dataset_info(config)
    model = build_model(config, info.num_classes)
    os.makedirs(workdir, exist_ok=True)
    # Only process 0 locks: the hosts of a multi-host run share one workdir.
    with workdir_lock(workdir) if jax.process_index() == 0 else contextlib.nullcontext():
        _refuse_other_experiment(workdir, config)
        return _train(config, workdir, info, model)


def _train(config: ml_collections.ConfigDict, workdir: str, info: pipeline.DatasetInfo,
           model) -> dict[str, float]:
    steps_per_epoch = max(1, info.num_train_examples // config.batch_size)
    tx = optim.create_optimizer(config.optim, steps_per_epoch=steps_per_epoch,
                                num_train_steps=config.num_train_steps)
    lr_schedule = optim.create_learning_rate_schedule(
        config.optim, steps_per_epoch=steps_per_epoch, num_train_steps=config.num_train_steps)
    mesh = parallel.create_mesh()
    init_key = skipping.step_key(config.seed, 0)  # steps fold in 1, 2, ...
    state = jax.jit(
        functools.partial(create_train_state, model, tx, input_shape=(1, *info.image_shape),
                          p_local=config.drop_path.p_local, p_global=config.drop_path.p_global),
        out_shardings=parallel.replicated(mesh))(init_key)

    checkpointer = Checkpointer(workdir, keep=config.keep_checkpoints)
    restored = checkpointer.restore_latest_good(state)
    skipped = 0  # batches skipped for a non-finite loss or gradient (nonfinite="skip")
    if restored is not None:
        state, metadata, _ = restored
        skipped = metadata.get("nonfinite_skipped", 0)
    start_step = int(state.step)
    truncate_metrics(workdir, start_step)
    writer = MetricsWriter(workdir, purge_step=start_step + 1)
    logging.info("model %s (%s classes), %s, start at step %d of %d", config.model.name,
                 info.num_classes, config.dataset, start_step, config.num_train_steps)

    train_fn = skipping.make_train_fn(
        model, lambda mode: parallel.jit_train_step(functools.partial(
            steps.train_step, model=model, per_sample=config.drop_path.per_sample,
            mode=mode, skip_nonfinite=config.nonfinite == "skip"), mesh),
        seed=config.seed, p_global=config.drop_path.p_global,
        per_sample=config.drop_path.per_sample, skip=config.drop_path.skip)
    eval_fns = {c: parallel.jit_eval_step(functools.partial(steps.eval_step, column=c), mesh)
                for c in eval_columns(model)}

    batches = train_batches(config, start_step)
    bar = tqdm.tqdm(total=config.num_train_steps, initial=start_step, unit="step",
                    disable=not config.progress_bar or jax.process_index() != 0,
                    dynamic_ncols=True, file=sys.stdout)
    window: list[dict[str, np.ndarray]] = []
    eval_metrics: dict[str, float] = {}
    pending = None  # (step, device metrics): fetched after the next step is dispatched
    last_time, last_step = time.perf_counter(), start_step

    def finish(step: int, device_metrics) -> None:
        nonlocal last_time, last_step, skipped
        metrics = jax.device_get(device_metrics)
        # Set (only) with nonfinite="skip": the step left the state as it was.
        if metrics.pop("nonfinite", 0.0):
            skipped += 1
            logging.warning("non-finite loss %s or gradient norm %s at step %d: batch skipped "
                            "(%d so far)", metrics["loss"], metrics["grad_norm"], step, skipped)
        elif not (np.isfinite(metrics["loss"]) and np.isfinite(metrics["grad_norm"])):
            # A finite loss with non-finite gradients would make the next state, and the
            # checkpoint that may follow, non-finite: stop at either.
            raise NonFiniteLossError(
                f"Loss became {float(metrics['loss'])} (gradient norm "
                f"{float(metrics['grad_norm'])}) at step {step}; stopping. The last good "
                f"checkpoint (step {checkpointer.latest_step()}) is intact. Lower "
                "optim.learning_rate or set optim.grad_clip_norm, or skip such batches with "
                "--config.nonfinite=skip.")
        else:
            window.append(metrics)
        if step % config.log_every_steps == 0:
            record = {k: float(np.mean([m[k] for m in window])) for k in (window or [{}])[0]}
            record["learning_rate"] = float(lr_schedule(step - 1))
            if config.nonfinite == "skip":
                record["nonfinite_skipped"] = skipped
            writer.write(step, "train", record)
            window.clear()
            now = time.perf_counter()
            rate = (step - last_step) * config.batch_size / max(now - last_time, 1e-9)
            last_time, last_step = now, step
            bar.set_postfix(loss=f"{record.get('loss', np.nan):.3f}",
                            acc=f"{record.get('accuracy', np.nan):.3f}", img_s=f"{rate:,.0f}")

    try:
        for step in range(start_step + 1, config.num_train_steps + 1):
            batch = parallel.to_global(next(batches), mesh)
            state, device_metrics = train_fn(state, batch, step)
            # At most two steps in flight: unbounded async dispatch can deadlock XLA:CPU's
            # cross-device all-reduce when several CPU devices share two cores.
            if pending is not None:
                finish(*pending)
            pending = (step, device_metrics)
            bar.update(1)
            last = step == config.num_train_steps
            if step % config.eval_every_steps == 0 or step % config.checkpoint_every_steps == 0 \
                    or last:
                finish(*pending)
                pending = None
            if step % config.eval_every_steps == 0 or last:
                eval_metrics = evaluate(state, eval_fns, eval_batches(config), mesh)
                writer.write(step, config.data.eval_split, eval_metrics)
                bar.write(f"step {step}: " + ", ".join(
                    f"{k}={v:.4f}" for k, v in eval_metrics.items() if k.startswith("accuracy")))
            if step % config.checkpoint_every_steps == 0 or last:
                checkpointer.save(step, state, metadata=checkpoint_metadata(config, step)
                                  | {"nonfinite_skipped": skipped},
                                  metrics=eval_metrics if step % config.eval_every_steps == 0
                                  or last else None)
        if pending is not None:
            finish(*pending)
    finally:
        bar.close()
        writer.close()
        checkpointer.wait()
        checkpointer.close()

    if not eval_metrics:  # resumed a finished run: report its last evaluation
        eval_metrics = evaluate(state, eval_fns, eval_batches(config), mesh)
    if jax.process_index() == 0:
        plot_path = plots.plot_learning_curves(read_metrics(workdir),
                                               os.path.join(workdir, "curves.png"))
        print(f"\nFinal evaluation on {config.dataset}/{config.data.eval_split} "
              f"at step {int(state.step)}:\n" + plots.column_accuracy_table(eval_metrics))
        print(f"\nworkdir: {workdir}\n  checkpoints: {os.path.join(workdir, 'checkpoints')} "
              f"(steps {checkpointer.all_steps()})\n  metrics: "
              f"{os.path.join(workdir, 'metrics.jsonl')}\n  curves: {plot_path}")
    return eval_metrics

