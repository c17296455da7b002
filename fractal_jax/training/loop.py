"""The training loop. `train(config, workdir)` trains (or resumes) one run; `Trainer.train` trains
any number of runs of one experiment together, which is what a sweep does: a single run is a
sweep of one, and every per-step behaviour below serves both.

Determinism: the step key is ``fold_in(key(seed), step)`` and the batch at step s is a pure
function of (seed, s), so a run resumed from a checkpoint at step s continues exactly as an
uninterrupted one; metric records written after that checkpoint are dropped and written again,
and the train steps since the last train record travel in the checkpoint's metadata, so the next
record averages the same steps. SIGTERM / SIGINT stop a run (or sweep) after the step in flight,
with a checkpoint of it (`preemption.py`); `--config.profile_steps` traces steps (`profiling.py`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import sys
import time
from typing import Iterator, Sequence

import jax
import ml_collections
import numpy as np
import tqdm

from fractal_jax import config as config_lib
from fractal_jax.training import (evaluate, experiment, integrity, multihost, optim, parallel,
                                  preemption, profiling, programs)
from fractal_jax.training.checkpoint import Checkpointer, CheckpointError
from fractal_jax.training.lock import workdir_lock
from fractal_jax.training.metrics import MetricsWriter, read_metrics, truncate_metrics
from fractal_jax.training.state import TrainState, create_train_state


# EX_DATAERR of sysexits.h: the run diverged (a rerun would diverge again); not requeued.
EXIT_DIVERGED = 65


class NonFiniteLossError(RuntimeError):
    """A NaN or Inf (loss, gradient or new state) stopped training, or, with nonfinite="skip",
    too many consecutive skipped steps; the last good checkpoint is untouched."""


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One run the loop trains: its directory, its config (seed and drop-path rates) and the
    seed whose batch order it reads."""

    workdir: str
    config: ml_collections.ConfigDict
    data_seed: int
    name: str = "run"


def train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Trains (or resumes) the experiment in `workdir`; returns its final eval metrics.

    Config, data and model are checked before the workdir is touched. The run holds the
    workdir's lock throughout (`lock.py`), so a second run on the same workdir is refused. On a
    multi-host run every process calls this; the workdir must be on a filesystem they all see.
    """
    config = config_lib.validate(config)
    experiment.check_batch_sizes(config)
    info = experiment.dataset_info(config)
    model = experiment.build_model(config, info.num_classes)
    multihost.decide("create the workdir", lambda: os.makedirs(workdir, exist_ok=True))
    multihost.check_shared_directory(workdir)
    with hold_workdir(workdir):
        experiment.refuse_other_experiment(workdir, config)
        return Trainer(config, model, info).train([RunSpec(workdir, config, config.seed)])[0]


@contextlib.contextmanager
def hold_workdir(workdir: str, shared: bool = False) -> Iterator[None]:
    """The workdir's lock (`lock.workdir_lock`), held by process 0 for the hosts of a
    multi-host run; refused on every process alike when another run holds it."""
    with contextlib.ExitStack() as stack:
        def lock() -> None:
            stack.enter_context(workdir_lock(workdir, shared))

        multihost.decide("lock the workdir", lock)
        yield


def final_eval(workdir: str, split: str) -> dict[str, float] | None:
    """The last `split` record of a run's metrics without its step and split, None if none."""
    records = [r for r in read_metrics(workdir) if r["split"] == split]
    return {k: v for k, v in records[-1].items() if k not in ("step", "split")} if records \
        else None


class Trainer:
    """What every run of an experiment trains and evaluates with (model, optimizer, mesh,
    compiled programs, evaluation), built once and shared by the runs of a sweep."""

    def __init__(self, config: ml_collections.ConfigDict, model, info):
        self.config, self.model = config, model
        steps_per_epoch = max(1, info.num_train_examples // config.batch_size)
        self.tx, self.lr_schedule = optim.create_optimizer(
            config.optim, steps_per_epoch=steps_per_epoch, num_train_steps=config.num_train_steps)
        self.mesh = parallel.create_mesh()
        self.programs = programs.Programs(model, config, self.mesh)
        self.evaluator = evaluate.Evaluator(model, self.mesh)
        self._num_train_examples = info.num_train_examples
        self._calibration: dict[int, list[np.ndarray] | None] = {}
        self._init = jax.jit(
            functools.partial(create_train_state, model, self.tx,
                              input_shape=(1, *info.image_shape)),
            out_shardings=parallel.replicated(self.mesh))

    def calibration(self, data_seed: int) -> list[np.ndarray] | None:
        """The calibration set of a run reading the batch order of `data_seed` (read once)."""
        if data_seed not in self._calibration:
            self._calibration[data_seed] = experiment.calibration_batches(
                self.config, self._num_train_examples, seed=data_seed)
        return self._calibration[data_seed]

    def evaluate(self, state: TrainState, run: RunSpec
                 ) -> tuple[dict[str, float], dict | None]:
        """The run's eval metrics and the precise statistics they were computed with."""
        return self.evaluator({"params": state.params, "batch_stats": state.batch_stats},
                              experiment.eval_batches(self.config), self.calibration(run.data_seed))

    def init_state(self, config: ml_collections.ConfigDict) -> TrainState:
        """The initial state of the run with `config`'s seed and rates (steps fold in 1, 2, ...)."""
        return self._init(programs.step_key(config.seed, 0), p_local=config.drop_path.p_local,
                          p_global=config.drop_path.p_global)

    def train(self, runs: Sequence[RunSpec], strategy: str = "loop",
              profile_dir: str | None = None) -> list[dict[str, float]]:
        """Trains `runs` together from their common checkpointed step to num_train_steps
        (`programs.make_runner`'s `strategy`); returns each run's final eval metrics.

        A finished run reports its last evaluation without training. Raises
        `preemption.Preempted` after saving when SIGTERM or SIGINT asked it to stop. Traces of
        `config.profile_steps` go to `profile_dir` (default: the first run's WORKDIR/profile).
        """
        checkpointers = [Checkpointer(r.workdir, keep=self.config.keep_checkpoints)
                         for r in runs]
        try:
            states, start, resumed = self._restore(runs, checkpointers)
            if start < self.config.num_train_steps:
                profile_dir = profile_dir or os.path.join(runs[0].workdir, profiling.PROFILE_DIR)
                profiler = profiling.StepProfiler(self.config.profile_steps, profile_dir, start)
                try:
                    return self._train(runs, checkpointers, states, start, resumed, strategy,
                                       profiler)
                finally:
                    profiler.close()
            split = self.config.data.eval_split
            # Read once: a process that found no record would evaluate (collectives) alone.
            finals = multihost.decide("read the final evaluations",
                                      lambda: [final_eval(r.workdir, split) for r in runs])
            return [final or self.evaluate(s, r)[0] for final, r, s in zip(finals, runs, states)]
        finally:
            for checkpointer in checkpointers:
                checkpointer.close()

    def _restore(self, runs: Sequence[RunSpec], checkpointers: list[Checkpointer]
                 ) -> tuple[list[TrainState], int, list[dict]]:
        """The runs' states, each from its newest good checkpoint; their common step; and each
        run's checkpoint metadata (empty when starting), where its train records stand."""
        targets = [self.init_state(r.config) for r in runs]
        restored = [c.restore_latest_good(t) for c, t in zip(checkpointers, targets)]
        common = min(0 if r is None else r[2] for r in restored)
        if common == 0:
            return targets, 0, [{} for _ in runs]
        # A kill between the runs' saves leaves some a checkpoint ahead: they step back to the
        # common step (checkpoints already written are kept, not written again).
        for i, (c, r) in enumerate(zip(checkpointers, restored)):
            if r[2] > common:
                if common not in c.all_steps():
                    raise CheckpointError(
                        f"{runs[i].name} has no checkpoint at step {common}, where the other "
                        "runs trained with it resume; run again with --chunk=1 to resume every "
                        "member from its own step.")
                restored[i] = (*c.restore(targets[i], common), common)
        return [r[0] for r in restored], common, [r[1] for r in restored]

    def _train(self, runs: Sequence[RunSpec], checkpointers: list[Checkpointer],
               states: list[TrainState], start: int, resumed: list[dict], strategy: str,
               profiler: profiling.StepProfiler) -> list[dict[str, float]]:
        config, mesh = self.config, self.mesh
        # Process 0 alone writes the records (every process computes them alike).
        primary = multihost.is_primary()
        if primary:
            for r in runs:
                truncate_metrics(r.workdir, start)
        writers = [MetricsWriter(r.workdir, purge_step=start + 1) if primary else _NoRecords()
                   for r in runs]
        data_seeds = list(dict.fromkeys(r.data_seed for r in runs))
        data_index = np.asarray([data_seeds.index(r.data_seed) for r in runs])
        batches = [experiment.train_batches(config, start, seed=s) for s in data_seeds]
        runner = programs.make_runner(self.programs, [r.config for r in runs], data_index,
                                      strategy)
        state = runner.combine(states)
        bar = tqdm.tqdm(total=config.num_train_steps, initial=start, unit="step",
                        desc=None if len(runs) == 1 else f"{len(runs)} runs",
                        disable=not config.progress_bar or jax.process_index() != 0,
                        dynamic_ncols=True, file=sys.stdout)
        records = _TrainRecords(runs, writers, resumed, self.lr_schedule, bar, checkpointers,
                                start)
        evals: list[dict[str, float] | None] = [None] * len(runs)
        pending = None  # (step, device metrics): fetched after the next step is dispatched
        try:
            with preemption.StopRequest() as stop:
                for step in range(start + 1, config.num_train_steps + 1):
                    profiler.start(step)
                    began = time.perf_counter()
                    batch = tuple(parallel.to_global(next(b), mesh) for b in batches)
                    dispatched = time.perf_counter()
                    with profiler.annotate(step):
                        state, device_metrics = runner.step(state, batch, step)
                    profiler.finish(step, (state, device_metrics), dispatched - began,
                                    time.perf_counter() - dispatched)
                    # At most two steps in flight: unbounded async dispatch can deadlock
                    # XLA:CPU's cross-device all-reduce when several CPU devices share two cores.
                    if pending is not None:
                        records.add(*pending)
                    pending = (step, device_metrics)
                    bar.update(1)
                    last = step == config.num_train_steps
                    evaluate_now = step % config.eval_every_steps == 0 or last
                    save_now = step % config.checkpoint_every_steps == 0 or last
                    # Every host asks at every step, so all of them stop at the same one.
                    stop_now = stop.should_stop() and not last
                    if not (evaluate_now or save_now or stop_now):
                        continue
                    records.add(*pending)
                    pending = None
                    split_states = runner.split(state)
                    evals = precise = [None] * len(runs)
                    if evaluate_now:  # also when stopping: the record belongs to this step
                        evals, precise = zip(*[self.evaluate(s, r)
                                               for s, r in zip(split_states, runs)])
                        for writer, metrics in zip(writers, evals):
                            writer.write(step, config.data.eval_split, metrics)
                        if primary:
                            bar.write(f"step {step}: {_eval_summary(evals)}")
                    if save_now or stop_now:
                        self._save(step, runs, checkpointers, split_states, records, evals,
                                   precise)
                    if stop_now:
                        for checkpointer in checkpointers:
                            checkpointer.wait()  # committed before we report it
                        raise preemption.Preempted(stop.signal_name, step,
                                                   [r.workdir for r in runs])
            if pending is not None:
                records.add(*pending)
        finally:
            bar.close()
            for writer in writers:
                writer.close()
        return list(evals)

    def _save(self, step: int, runs: Sequence[RunSpec], checkpointers: list[Checkpointer],
              states: list[TrainState], records: "_TrainRecords", evals, precise) -> None:
        """Starts saving every run's checkpoint of `step` (one kept from before an
        interruption is not written again)."""
        for i, (checkpointer, run) in enumerate(zip(checkpointers, runs)):
            if step in checkpointer.all_steps():
                continue
            metadata = experiment.checkpoint_metadata(
                run.config, step, data_seed=run.data_seed, **records.position(i))
            metrics, stats = evals[i], precise[i]
            if stats is not None and integrity.nonfinite_arrays(integrity.host_arrays(stats)):
                # A finite state whose network overflows on the calibration examples (it is
                # diverging): the checkpoint keeps the state, without those statistics.
                logging.warning("%s: the evaluation at step %d gave non-finite BatchNorm "
                                "statistics; its checkpoint is saved without them", run.name,
                                step)
                stats = None
            if metrics is not None and not np.isfinite(list(metrics.values())).all():
                metrics = None  # ranked by recency only
            checkpointer.save(step, states[i], metadata=metadata, metrics=metrics,
                              eval_batch_stats=stats)


class _NoRecords:
    """The metrics writer of processes other than 0."""

    def write(self, step: int, split: str, metrics) -> None:
        pass

    def close(self) -> None:
        pass


def _eval_summary(evals: list[dict[str, float]]) -> str:
    """The accuracies of one run, or the spread of the full networks' over several."""
    if len(evals) == 1:
        stored = {k[len(evaluate.STORED_PREFIX):]: v for k, v in evals[0].items()
                  if k.startswith(evaluate.STORED_PREFIX)}
        return ", ".join(f"{k}={v:.4f}" + (f" (stored BN {stored[k]:.4f})" if k in stored else "")
                         for k, v in evals[0].items() if k.startswith("accuracy"))
    accuracy = [e["accuracy"] for e in evals]
    return (f"full-network accuracy of {len(evals)} runs: mean {np.mean(accuracy):.4f}, "
            f"min {min(accuracy):.4f}, max {max(accuracy):.4f}")


class _TrainRecords:
    """Each run's train records: the mean of its trained steps' metrics over every log window,
    the learning rate, and the batches skipped as non-finite; a run whose loss or gradient
    turns non-finite (with nonfinite="stop") stops training.

    `position(i)` is what run i's checkpoint keeps of them (its skip count and the steps of the
    open window), and `resumed` (each run's checkpoint metadata) restores it.
    """

    def __init__(self, runs: Sequence[RunSpec], writers: list[MetricsWriter],
                 resumed: list[dict], lr_schedule, bar: tqdm.tqdm,
                 checkpointers: list[Checkpointer], start: int):
        self._runs, self._writers = runs, writers
        self._lr_schedule, self._bar, self._checkpointers = lr_schedule, bar, checkpointers
        self._config = runs[0].config
        self._skipped = np.asarray([m.get("nonfinite_skipped", 0) for m in resumed])
        self._consecutive = np.asarray([m.get("nonfinite_consecutive", 0) for m in resumed])
        # Per run, the metrics of the steps it trained (did not skip) since its last record;
        # float32 as the device computed them (JSON keeps float32 values exactly).
        self._window: list[list[dict[str, np.float32]]] = [
            [{k: np.float32(v) for k, v in m.items()} for m in r.get("train_window", [])]
            for r in resumed]
        self._last_time, self._last_step = time.perf_counter(), start

    def position(self, i: int) -> dict:
        return {"nonfinite_skipped": int(self._skipped[i]),
                "nonfinite_consecutive": int(self._consecutive[i]),
                "train_window": [{k: float(v) for k, v in m.items()} for m in self._window[i]]}

    def add(self, step: int, device_metrics) -> None:
        """Takes one step's metrics: stacked over the runs, or a list with one dict per run."""
        metrics = jax.device_get(device_metrics)
        if isinstance(metrics, list):
            metrics = {k: np.stack([m[k] for m in metrics]) for k in metrics[0]}
        flagged = metrics.pop("nonfinite") > 0
        skip = self._config.nonfinite == "skip"
        if skip:
            self._skipped[flagged] += 1
            self._consecutive = np.where(flagged, self._consecutive + 1, 0)
            for i in np.flatnonzero(flagged):
                logging.warning("%s: non-finite loss %s, gradient norm %s or new state at step "
                                "%d: batch skipped (%d so far)", self._runs[i].name,
                                metrics["loss"][i], metrics["grad_norm"][i], step,
                                self._skipped[i])
        limit = self._config.nonfinite_max_consecutive
        stopped = (np.flatnonzero(self._consecutive > limit) if skip
                   else np.flatnonzero(flagged))
        if stopped.size:
            # The state of a stop-mode step was not kept finite: no checkpoint may follow it.
            what = (f"{limit + 1} consecutive steps were non-finite and skipped "
                    f"(nonfinite_max_consecutive={limit}): the run diverged" if skip else
                    "the loss, the gradient or the new state became non-finite")
            raise NonFiniteLossError(
                f"At step {step} {what}; stopping. "
                + "; ".join(f"{self._runs[i].name}: loss {float(metrics['loss'][i])}, gradient "
                            f"norm {float(metrics['grad_norm'][i])}, "
                            + self._last_good(i) for i in stopped)
                + ". Lower optim.learning_rate or set optim.grad_clip_norm"
                + ("." if skip else ", or skip such batches with --config.nonfinite=skip."))
        for i in np.flatnonzero(~flagged):
            self._window[i].append({k: np.float32(v[i]) for k, v in metrics.items()})
        if step % self._config.log_every_steps == 0:
            self._write(step)

    def _last_good(self, i: int) -> str:
        step = self._checkpointers[i].latest_step()
        return ("no checkpoint was written yet" if step is None
                else f"last good checkpoint (step {step}) intact")

    def _write(self, step: int) -> None:
        learning_rate = float(self._lr_schedule(step - 1))
        for i, writer in enumerate(self._writers):
            kept = self._window[i]
            record = {k: float(np.mean([m[k] for m in kept])) for k in (kept or [{}])[0]}
            record["learning_rate"] = learning_rate
            if self._config.nonfinite == "skip":
                record["nonfinite_skipped"] = int(self._skipped[i])
            writer.write(step, "train", record)
        now = time.perf_counter()
        rate = (len(self._runs) * (step - self._last_step) * self._config.batch_size
                / max(now - self._last_time, 1e-9))
        steps = [m for window in self._window for m in window]
        if steps:
            self._bar.set_postfix(loss=f"{np.mean([m['loss'] for m in steps]):.3f}",
                                  acc=f"{np.mean([m['accuracy'] for m in steps]):.3f}",
                                  img_s=f"{rate:,.0f}")
        self._last_time, self._last_step = now, step
        for window in self._window:
            window.clear()
