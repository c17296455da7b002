"""Orbax checkpoints that hold everything needed to continue a run bit for bit.

Each save is one step directory `WORKDIR/checkpoints/<step>/` with the items `state` (the train
state pytree: params, batch stats, optimizer state, step, drop-path rates), `metadata` (JSON:
config, data position, versions) and, at steps that were evaluated, `eval_batch_stats` (the
BatchNorm statistics each evaluated network was measured with, by network name: see
`evaluate.py`). This module is the only reader and writer of that layout. Orbax writes a step into a temporary directory and renames it to
`<step>` only once every file is on disk, and it deletes the checkpoints its retention policy
drops only after that rename; so a crash or a failed write mid-save never costs the previous good
checkpoint. A step that cannot be restored is moved to `WORKDIR/damaged_checkpoints/`, never
deleted.
"""
import contextlib
import dataclasses
import hashlib
import json
import logging
import operator
import os
import shutil
import sys
import time
from typing import Any, Callable, Iterator, Mapping, TypeVar

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import checkpoint_managers as policies

from fractal_jax.training import integrity, multihost

PyTree = Any
T = TypeVar("T")

CHECKPOINT_DIR = "checkpoints"
EVAL_STATS_ITEM = "eval_batch_stats"
METADATA_ITEM = "metadata"  # a JSON item: WORKDIR/checkpoints/<step>/metadata/metadata
DAMAGED_DIR = "damaged_checkpoints"
DAMAGED_KEEP = 3
# What Orbax and TensorStore raise for missing, truncated or unparseable files in a step
# directory (JSONDecodeError and TensorStore's DATA_LOSS / NOT_FOUND are ValueErrors; a missing
# item is a KeyError; unreadable array data is a bare Exception), and for a target whose
# structure does not match the saved one.
_RESTORE_ERRORS = (Exception,)


class CheckpointError(RuntimeError):
    """A checkpoint exists but cannot be restored (damaged files or an incompatible target)."""


class CheckpointSaveError(RuntimeError):
    """Writing a checkpoint failed (disk full, read-only directory, ...); older ones are intact."""


def checkpoint_dir(workdir: str) -> str:
    """Returns the directory that holds the step directories of `workdir`."""
    return os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)


def _ignore_reads_after_a_failed_restore() -> None:
    """Silences what a failed restore leaves behind: Orbax closes its event loop at the first
    unreadable array while TensorStore still completes the other reads, and each completion
    reports "Event loop is closed" as an unraisable exception with a traceback (211 of them
    around one warning in a test), and asyncio logs each abandoned read's error ("Future
    exception was never retrieved"). Only those two are dropped."""
    previous = sys.unraisablehook
    if getattr(previous, "_fractal_jax", False):
        return
    logging.getLogger("asyncio").addFilter(
        lambda record: not record.getMessage().startswith("Future exception was never retrieved"))

    def hook(unraisable) -> None:
        if not (isinstance(unraisable.exc_value, RuntimeError)
                and str(unraisable.exc_value) == "Event loop is closed"):
            previous(unraisable)

    hook._fractal_jax = True
    sys.unraisablehook = hook


def _restore_step(manager: ocp.CheckpointManager, step: int, args: ocp.args.Composite) -> ocp.args.Composite:
    """Returns `manager.restore(step, args=args)`, turning file-level failures into CheckpointError."""
    try:
        return manager.restore(step, args=args)
    except _RESTORE_ERRORS as error:
        _ignore_reads_after_a_failed_restore()
        raise CheckpointError(
            f"checkpoint {manager.directory / str(step)} is damaged or incompatible: "
            f"{type(error).__name__}: {error}"
        ) from error


def _newest_readable(directory: str, steps: list[int], read: Callable[[int], T]) -> tuple[T, int] | None:
    """Returns (read(step), step) for the newest step that reads, None if there are no steps.

    Logs a warning for every newer step that fails; raises CheckpointError if all of them fail.
    """
    for step in sorted(steps, reverse=True):
        try:
            return read(step), step
        except CheckpointError as error:
            logging.warning("%s; falling back to an older checkpoint", error)
    if steps:
        raise CheckpointError(f"none of the checkpoints {sorted(steps)} in {directory} can be restored")
    return None


def _open_manager(directory: str, options: ocp.CheckpointManagerOptions) -> ocp.CheckpointManager:
    """Returns a CheckpointManager for `directory`, even if a step's `metrics` file is damaged.

    Orbax reads every step's metrics when it opens a directory (to rank them for retention) and
    fails on a truncated one; we then open it without reading them, so the old steps are kept or
    dropped by recency alone, and the damaged step is dealt with on restore.
    """
    try:
        return ocp.CheckpointManager(directory, options=options)
    except _RESTORE_ERRORS as error:
        logging.warning("cannot read checkpoint metrics under %s (%s: %s); retention of existing "
                        "checkpoints falls back to recency", directory, type(error).__name__, error)
        options = dataclasses.replace(options, lightweight_initialize=True)
        return ocp.CheckpointManager(directory, options=options)


class Checkpointer:
    """Saves and restores (train state, metadata) pairs under `WORKDIR/checkpoints/`.

    Keeps the newest `keep` checkpoints and, with `keep_best`, the one with the highest
    `metrics[best_metric]`, through Orbax's preservation policies. Saves are asynchronous when
    `async_save`: the arrays are copied off the device before `save` returns and written in the
    background; call `wait()` (or `close()`, or use it as a context manager) before exiting.
    """

    def __init__(self, workdir: str, *, keep: int = 3, keep_best: bool = True, best_metric: str = "accuracy",
                 async_save: bool = True):
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.directory = checkpoint_dir(workdir)
        self._best_metric = best_metric if keep_best else None
        best_fn = operator.itemgetter(best_metric) if keep_best else None
        retention = policies.LatestN(n=keep)
        if keep_best:
            retention = policies.AnyPreservationPolicy([
                retention,
                policies.BestN(get_metric_fn=best_fn, n=1, keep_checkpoints_without_metrics=False),
            ])
        options = ocp.CheckpointManagerOptions(
            preservation_policy=retention,
            # Orbax writes a step's metrics to disk (and so can rank old steps after a restart)
            # only when best_fn is set; the preservation policy alone does not make it do so.
            best_fn=best_fn,
            enable_async_checkpointing=async_save,
            # Removes half-written `<step>.orbax-checkpoint-tmp*` directories of a killed run.
            cleanup_tmp_directories=True,
            # Create a step's directories in `save`, so that a read-only or full disk fails there
            # at once; created in the background, Orbax would wait minutes for them first.
            async_options=ocp.AsyncOptions(create_directories_asynchronously=False),
            # Orbax names a multi-process save's barriers by step alone; the runs of a sweep
            # save the same step at once, so each directory gets barriers of its own.
            multiprocessing_options=ocp.options.MultiprocessingOptions(
                barrier_sync_key_prefix=hashlib.sha256(self.directory.encode()).hexdigest()[:12]),
        )
        self._manager = _open_manager(self.directory, options)
        self._saving: int | None = None  # the step of the save in flight, for error messages

    def save(self, step: int, state: PyTree, *, metadata: Mapping[str, Any],
             metrics: Mapping[str, float] | None = None,
             eval_batch_stats: PyTree | None = None, force: bool = False) -> bool:
        """Starts saving `state` and `metadata` as step `step`; returns False if Orbax skipped it.

        A step at or below the latest saved one is skipped unless `force`. `metrics` rank the
        checkpoint for `keep_best`; a checkpoint saved without them is kept by recency only.
        `eval_batch_stats` (the statistics `metrics` were computed with) are saved beside them.
        """
        # Orbax serialises JSON in a background thread, where a bad value would only surface at
        # the next wait; check here so the error points at the caller.
        json.dumps(metadata)
        trees = {"state": state, EVAL_STATS_ITEM: eval_batch_stats}
        try:
            sums = {item: integrity.checksums(tree) for item, tree in trees.items()
                    if tree is not None}
        except integrity.IntegrityError as error:
            raise CheckpointSaveError(
                f"Refusing to write checkpoint {step} to {self.directory}: {error}. The "
                f"complete checkpoints (steps {self.all_steps()}) are intact.") from None
        metadata = integrity.seal(metadata, sums)
        if metrics is not None:
            if self._best_metric is not None and self._best_metric not in metrics:
                raise ValueError(f"metrics lack best_metric {self._best_metric!r}: {sorted(metrics)}")
            metrics = {name: float(value) for name, value in metrics.items()}
        items = dict(state=ocp.args.StandardSave(state), metadata=ocp.args.JsonSave(dict(metadata)))
        if eval_batch_stats is not None:
            items[EVAL_STATS_ITEM] = ocp.args.StandardSave(eval_batch_stats)
        args = ocp.args.Composite(**items)
        self.wait()  # reports a failure of the previous save under its own step
        self._saving = step
        with self._save_errors():
            return self._manager.save(step, args=args, metrics=metrics, force=force)

    @contextlib.contextmanager
    def _save_errors(self) -> Iterator[None]:
        """Turns any failure of the save in flight into a CheckpointSaveError that says what to do.

        Orbax raises the OSError (ENOSPC, EROFS, EACCES, ...) or TensorStore's ValueError of a
        failed write, here or, for a write that failed in the background, at the next wait.
        """
        try:
            yield
        except Exception as error:
            self._manager.reload()  # forget the failed step: list what is complete on disk
            raise CheckpointSaveError(
                f"Writing checkpoint {self._saving} to {self.directory} failed: "
                f"{type(error).__name__}: {error}\nThe complete checkpoints (steps "
                f"{self.all_steps()}) are intact. Free disk space or make the directory "
                "writable, then run the same command again to resume.") from error

    def restore(self, target: PyTree, step: int | None = None) -> tuple[PyTree, dict]:
        """Returns (state, metadata) of `step`, or of the latest step when None.

        `target` is a pytree of the saved structure (e.g. a freshly initialised train state, or
        its `jax.ShapeDtypeStruct`s); its leaves must be arrays or Python scalars (not NumPy
        scalars such as np.int64, which Orbax rejects). The result takes the target's tree
        structure, leaf types, dtypes and shardings: a Python-int leaf comes back as a Python int
        even if an array was saved, so build the target like the state that was saved.
        Raises FileNotFoundError if there is no such step and CheckpointError if its files cannot
        be read.
        """
        self.wait()
        step = self.latest_step() if step is None else step
        if step not in self.all_steps():
            raise FileNotFoundError(f"no checkpoint for step {step} in {self.directory}; "
                                    f"steps: {self.all_steps()}")
        restored = _restore_step(self._manager, step, ocp.args.Composite(
            state=ocp.args.StandardRestore(target), metadata=ocp.args.JsonRestore()))
        _verify(os.path.join(self.directory, str(step)), restored.metadata,
                {"state": restored.state})
        return restored.state, integrity.unsealed(restored.metadata)

    def restore_latest_good(self, target: PyTree) -> tuple[PyTree, dict, int] | None:
        """Returns (state, metadata, step) of the newest checkpoint that restores, None if none exist.

        Damaged newer checkpoints are logged and, once an older one has restored, moved to
        `WORKDIR/damaged_checkpoints/<step>-<time>`: out of Orbax's way (it would refuse to save
        the resumed run's steps up to theirs) but not deleted, since a read can also fail for a
        passing reason. Raises CheckpointError if every checkpoint is damaged (and moves nothing).
        """
        def read(step: int) -> tuple[PyTree, dict]:
            try:
                return self.restore(target, step), None
            except CheckpointError as error:
                return None, error

        def agreed(step: int) -> tuple[PyTree, dict]:
            # Every process of a multi-host run must fall back alike, or their restores and
            # saves would no longer match.
            restored, error = read(step)
            if not multihost.all_true(f"restored {step}", error is None):
                raise error or CheckpointError(f"checkpoint {self.directory}/{step} could not be "
                                               "restored on another process of this job")
            return restored

        found = _newest_readable(self.directory, self.all_steps(), agreed)
        if found is None:
            return None
        (state, metadata), step = found
        damaged = [s for s in self.all_steps() if s > step]
        if damaged:
            self._set_aside(damaged)
        return state, metadata, step

    def _set_aside(self, steps: list[int]) -> None:
        """Moves the step directories `steps` to DAMAGED_DIR, next to the checkpoint directory,
        which keeps the newest DAMAGED_KEEP of them (a disk that keeps failing must not fill
        up with them)."""
        if ocp.multihost.is_primary_host(0):
            aside = os.path.join(os.path.dirname(self.directory), DAMAGED_DIR)
            os.makedirs(aside, exist_ok=True)
            stamp = time.strftime("%Y%m%d-%H%M%S")
            for step in steps:
                source = os.path.join(self.directory, str(step))
                target = os.path.join(aside, f"{step}-{stamp}-{time.time_ns() % 10**9:09d}")
                os.rename(source, target)
                os.utime(target)  # its time is when it was set aside (pruned by it below)
                logging.warning("moved damaged checkpoint %s to %s", source, target)
            kept = sorted(os.listdir(aside), key=lambda n: os.path.getmtime(
                os.path.join(aside, n)), reverse=True)
            for name in kept[DAMAGED_KEEP:]:
                shutil.rmtree(os.path.join(aside, name), ignore_errors=True)
                logging.warning("deleted %s (only the newest %d damaged checkpoints are kept)",
                                os.path.join(aside, name), DAMAGED_KEEP)
        ocp.multihost.sync_global_processes("fractal_jax:checkpoints_set_aside")
        self._manager.reload()

    def latest_step(self) -> int | None:
        """Returns the newest saved step (possibly still being written), None if there is none."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """Returns the retained steps in increasing order."""
        return sorted(self._manager.all_steps())

    def wait(self) -> None:
        """Blocks until pending saves (and the deletions they trigger) are finished.

        Raises CheckpointSaveError if the last save failed.
        """
        with self._save_errors():
            self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases Orbax's background resources, also after a
        failed save (so no abandoned writer is left to race a later run on the directory)."""
        try:
            self.wait()
        except CheckpointSaveError:
            with contextlib.suppress(Exception):  # the failed save's error is the one to report
                self._manager.close()
            raise
        self._manager.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _verify(path: str, metadata: Mapping[str, Any], items: Mapping[str, PyTree]) -> None:
    """Raises CheckpointError unless the metadata and every restored item of the checkpoint
    at `path` are as they were saved (`integrity.py`) and finite."""
    try:
        integrity.verify_metadata(metadata)
        for item, tree in items.items():
            integrity.verify_arrays(tree, metadata, item)
    except integrity.IntegrityError as error:
        raise CheckpointError(f"checkpoint {path} is damaged: {error}") from None
    if not integrity.is_sealed(metadata) and path not in _UNSEALED_NOTED:
        _UNSEALED_NOTED.add(path)
        logging.warning("checkpoint %s was written without checksums (before they were "
                        "recorded): its arrays are restored unverified", path)


_UNSEALED_NOTED: set[str] = set()


def _read_item(workdir: str, step: int, item: str) -> PyTree:
    path = os.path.join(checkpoint_dir(workdir), str(step), item)
    try:
        handler = ocp.PyTreeCheckpointHandler()
        tree = handler.metadata(epath.Path(path)).tree
        # NumPy arrays, whatever devices and processes wrote them: a run trained on several
        # hosts loads in one process (its saved shardings name devices this one lacks).
        args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
        with ocp.Checkpointer(handler) as checkpointer:
            tree = checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=args))
    except _RESTORE_ERRORS as error:
        raise CheckpointError(f"checkpoint {path} cannot be restored: {error}") from error
    _verify(os.path.dirname(path), _read_sealed_metadata(workdir, step), {item: tree})
    return tree


def read_state(workdir: str, step: int) -> PyTree:
    """Returns the train state saved at `step` as it was saved, for analysis of a finished run.
    Raises CheckpointError if its files cannot be read."""
    return _read_item(workdir, step, "state")


def read_eval_batch_stats(workdir: str, step: int) -> PyTree | None:
    """Returns the BatchNorm statistics that the evaluation saved with `step` was computed with,
    by network name, or None if that step was not evaluated (or saved without them)."""
    if not os.path.isdir(os.path.join(checkpoint_dir(workdir), str(step), EVAL_STATS_ITEM)):
        return None
    return _read_item(workdir, step, EVAL_STATS_ITEM)


def saved_steps(workdir: str) -> list[int]:
    """Returns the steps of the complete checkpoints in `workdir`, oldest first."""
    directory = checkpoint_dir(workdir)
    if not os.path.isdir(directory):
        return []
    # A step's directory gets its plain name only once Orbax has written all of it.
    return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


def read_metadata(workdir: str, step: int | None = None) -> dict | None:
    """Returns the metadata saved with `step` (default: the newest readable one), None if no checkpoints.

    Reads only the JSON item, as a plain file: a run can refuse a workdir that holds another
    experiment before building a model, and one process of a multi-host run can read it alone
    (an Orbax manager would wait for the others). Raises CheckpointError if the metadata cannot
    be read or differs from what was saved.
    """
    found = _read_sealed_metadata(workdir, step)
    return None if found is None else integrity.unsealed(found)


def _read_sealed_metadata(workdir: str, step: int | None = None) -> dict | None:
    """`read_metadata`, with the checksums it carries."""
    directory = checkpoint_dir(workdir)

    def read(s: int) -> dict:
        path = os.path.join(directory, str(s), METADATA_ITEM, METADATA_ITEM)
        try:
            with open(path, encoding="utf-8") as f:
                metadata = json.load(f)
            integrity.verify_metadata(metadata)
            return metadata
        except (OSError, ValueError) as error:  # IntegrityError included
            raise CheckpointError(f"checkpoint {os.path.join(directory, str(s))} is damaged or "
                                  f"incompatible: {type(error).__name__}: {error}") from error

    if step is not None:
        return read(step)
    found = _newest_readable(directory, saved_steps(workdir), read)
    return None if found is None else found[0]
