"""Drop-path sweeps: every (seed, p_local, p_global) member trained in one run, either by one
compiled train step vmapped over the members' stacked states, step keys and rates ("vmap"), or
by the members' single-run steps one after another ("loop").

A member trains as the single run of its seed and rates (`loop.train`) would: init key
``fold_in(key(seed), 0)``, step keys ``fold_in(key(seed), step)``, its rates in its state,
`nonfinite` applied to it alone.

Strategies (`resolve_strategy`; "auto" picks per backend):
  - "vmap" (accelerators): one program for the chunk. It computes every unit and masks dead join
    inputs (members draw different plans at each step, so `drop_path.skip` does not apply). A
    member equals its single run up to float rounding (a sweep of one member matched a single
    run with drop_path.skip=False bit for bit); rounding differences grow over a long run, so
    final accuracies then differ about as much as those of different seeds do.
  - "loop" (CPU): each member's step is its single run's (`skipping.make_train_fn`, with dead
    work skipped; the compiled programs are shared by all members), so a member equals its
    single run bit for bit. On XLA:CPU this ran 1.5x faster per model than the vmapped step
    (BENCHMARKS.md: a vmapped step was slower per model than sequential single-model steps).

Data order: "own" gives each member the batches of its own seed, exactly as its single run reads
them; "shared" gives every member the batches of the config's seed (members then differ only in
initialisation, plans and dropout). Batches are read once per data seed and handed to each
member inside the compiled step. Members train `chunk` at a time (default: all at once).

Workdir layout::

    WORKDIR/sweep.json                 the sweep: its config plus {"sweep": seeds, rates, order}
    WORKDIR/.lock                      held while a sweep runs (`lock.py`)
    WORKDIR/members/<member>/          one run per member, e.g. seed_0-p_local_0.15-p_global_0.5:
        checkpoints/                   its own (unstacked) train state and metadata with its own
                                       config (seed and rates), as `loop.train` saves them
        metrics.jsonl, tensorboard/    its train and eval records, as `loop.train` writes them
    WORKDIR/sweep_results.csv/.md/.png mean ± std over seeds per rate pair (analysis/sweep_tables)

So a member's directory is a run like any other (`analysis.runs.load_run` loads it). A sweep
resumes every member from its newest checkpoint, whatever `chunk` it is run again with (members
at different steps train in different chunks), and a finished sweep reports its results
without training.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import os
import sys
from typing import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm

from fractal_jax import config as config_lib
from fractal_jax.analysis import sweep_tables
from fractal_jax.data import pipeline
from fractal_jax.models import drop_path
from fractal_jax.models.fractal import FractalNet
from fractal_jax.training import loop, optim, parallel, skipping, steps
from fractal_jax.training.checkpoint import (Checkpointer, CheckpointError, checkpoint_dir,
                                             read_metadata)
from fractal_jax.training.lock import workdir_lock
from fractal_jax.training.metrics import MetricsWriter, read_metrics, truncate_metrics
from fractal_jax.training.state import TrainState, create_train_state

DATA_ORDERS = ("own", "shared")
STRATEGIES = ("auto", "vmap", "loop")
MEMBERS_DIR = "members"
SWEEP_FILE = "sweep.json"


@dataclasses.dataclass(frozen=True)
class Member:
    """One model of a sweep: its seed and drop-path rates."""

    seed: int
    p_local: float
    p_global: float

    @property
    def name(self) -> str:
        return f"seed_{self.seed}-p_local_{self.p_local}-p_global_{self.p_global}"


@dataclasses.dataclass(frozen=True)
class Sweep:
    """Every seed with every (p_local, p_global), and whose batches the members read."""

    seeds: tuple[int, ...]
    p_local: tuple[float, ...]
    p_global: tuple[float, ...]
    data_order: str = "own"

    def __post_init__(self):
        object.__setattr__(self, "seeds", tuple(self.seeds))
        if not self.seeds:
            raise ValueError("The sweep has no seeds; give at least one, e.g. --seeds 0,1.")
        for seed in self.seeds:
            if not isinstance(seed, int) or isinstance(seed, bool):
                raise ValueError(f"Seeds must be integers, got {seed!r}.")
        for name in ("p_local", "p_global"):
            rates = getattr(self, name)
            if not rates:
                raise ValueError(f"The sweep has no {name} rates; give at least one, "
                                 f"e.g. --{name} 0,0.15.")
            for rate in rates:
                drop_path.check_rate(name, rate)
            object.__setattr__(self, name, tuple(float(r) for r in rates))
        for name in ("seeds", "p_local", "p_global"):
            values = getattr(self, name)
            repeated = sorted({v for v in values if values.count(v) > 1})
            if repeated:
                raise ValueError(f"{name} lists {repeated} more than once; give each value once.")
        if self.data_order not in DATA_ORDERS:
            raise ValueError(f"data_order must be one of {', '.join(DATA_ORDERS)}, "
                             f"got {self.data_order!r}.")

    @property
    def members(self) -> list[Member]:
        """Every (seed, p_local, p_global), seed-major, so members in a chunk share seeds."""
        return [Member(seed, p_local, p_global) for seed in self.seeds
                for p_local in self.p_local for p_global in self.p_global]

    def data_seed(self, member: Member, config_seed: int) -> int:
        """The seed whose batch order `member` trains on."""
        return member.seed if self.data_order == "own" else config_seed


def member_dir(workdir: str, member: Member) -> str:
    """The run directory of `member` inside the sweep's `workdir`."""
    return os.path.join(workdir, MEMBERS_DIR, member.name)


def _with_seed(config: ml_collections.ConfigDict, seed: int, **drop_path_rates: float
               ) -> ml_collections.ConfigDict:
    config = config.copy_and_resolve_references()
    config.seed = seed
    config.drop_path.update(drop_path_rates)
    return config


def member_config(config: ml_collections.ConfigDict, member: Member) -> ml_collections.ConfigDict:
    """The config of `member`'s single run: `config` with its seed and rates."""
    return _with_seed(config, member.seed, p_local=member.p_local, p_global=member.p_global)


def init_states(model: FractalNet, tx: optax.GradientTransformation,
                input_shape: tuple[int, ...], seeds: jax.Array, p_local: jax.Array,
                p_global: jax.Array) -> TrainState:
    """The members' initial states stacked on a leading axis, each as its single run makes it."""
    def one(seed, pl, pg):
        return create_train_state(model, tx, skipping.step_key(seed, 0), input_shape,
                                  p_local=pl, p_global=pg)
    return jax.vmap(one)(seeds, p_local, p_global)


def sweep_step(state: TrainState, batches: tuple[steps.Batch, ...], keys: jax.Array, *,
               model: FractalNet, per_sample: bool, skip_nonfinite: bool,
               data_index: np.ndarray) -> tuple[TrainState, steps.Metrics]:
    """`steps.train_step` of every member at once; `state`, `keys` and the metrics are stacked.

    `batches` holds one batch per data seed; member k trains on ``batches[data_index[k]]``.
    """
    batch = jax.tree.map(lambda *xs: jnp.stack(xs)[data_index], *batches)
    step = functools.partial(steps.train_step, model=model, per_sample=per_sample,
                             skip_nonfinite=skip_nonfinite)
    return jax.vmap(step)(state, batch, keys)


def _take(state: TrainState, index: jax.Array) -> TrainState:
    return jax.tree.map(lambda x: x[index], state)


def _stack(*states: TrainState) -> TrainState:
    return jax.tree.map(lambda *xs: jnp.stack(xs), *states)


def plan_chunks(member_steps: Sequence[int], num_train_steps: int, size: int) -> list[list[int]]:
    """The unfinished members' indices, in order, in chunks of at most `size`.

    A chunk trains from its members' common step (`_initial_states`), so a chunk interrupted
    between its members' saves resumes as the same chunk and computes what it would have
    computed, bit for bit.
    """
    unfinished = [i for i, step in enumerate(member_steps) if step < num_train_steps]
    return [unfinished[i:i + size] for i in range(0, len(unfinished), size)]


def _saved_step(workdir: str) -> int:
    metadata = read_metadata(workdir)
    return 0 if metadata is None else int(metadata["step"])


def _record(config: ml_collections.ConfigDict, sweep: Sweep) -> dict:
    """What makes two sweeps the same experiment, as plain JSON types."""
    return json.loads(json.dumps({**config_lib.to_json_dict(config),
                                  "sweep": dataclasses.asdict(sweep)}))


def _claim_workdir(workdir: str, config: ml_collections.ConfigDict, sweep: Sweep) -> None:
    """Writes WORKDIR/sweep.json, refusing a workdir that holds another sweep or a single run."""
    path = os.path.join(workdir, SWEEP_FILE)
    current = _record(config, sweep)
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            diffs = config_lib.experiment_differences(json.load(f), current)
        if diffs:
            raise loop.WorkdirConflictError(
                f"Workdir {workdir!r} holds a different sweep; it differs in:\n  "
                + "\n  ".join(diffs) + "\nUse another --workdir, or pass --fresh to move the old "
                "sweep aside and start again.")
    elif os.path.isdir(checkpoint_dir(workdir)):
        raise loop.WorkdirConflictError(
            f"Workdir {workdir!r} holds a single training run, not a sweep. Use another "
            "--workdir, or pass --fresh to move it aside.")
    if jax.process_index() == 0:
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            json.dump(current, f, indent=2, sort_keys=True)
        os.replace(path + ".tmp", path)


@dataclasses.dataclass(frozen=True)
class _Trainer:
    """What every chunk of a sweep trains and evaluates with."""

    config: ml_collections.ConfigDict
    sweep: Sweep
    model: FractalNet
    tx: optax.GradientTransformation
    lr_schedule: optax.Schedule
    input_shape: tuple[int, ...]
    mesh: jax.sharding.Mesh
    eval_fns: dict
    strategy: str  # "vmap" or "loop" (see STRATEGIES)
    programs: dict  # the loop strategy's compiled single-model steps, by mode


def _trainer(config: ml_collections.ConfigDict, sweep: Sweep, model: FractalNet,
             info: pipeline.DatasetInfo, strategy: str) -> _Trainer:
    steps_per_epoch = max(1, info.num_train_examples // config.batch_size)
    kwargs = dict(steps_per_epoch=steps_per_epoch, num_train_steps=config.num_train_steps)
    mesh = parallel.create_mesh()
    return _Trainer(
        config=config, sweep=sweep, model=model,
        tx=optim.create_optimizer(config.optim, **kwargs),
        lr_schedule=optim.create_learning_rate_schedule(config.optim, **kwargs),
        input_shape=(1, *info.image_shape), mesh=mesh,
        eval_fns={c: parallel.jit_eval_step(functools.partial(steps.eval_step, column=c), mesh)
                  for c in loop.eval_columns(model)},
        strategy=strategy, programs={})


def _initial_states(t: _Trainer, members: list[Member], checkpointers: list[Checkpointer]
                    ) -> tuple[list[TrainState], int, np.ndarray]:
    """The members' states, each from its newest good checkpoint; their common step; and each
    member's count of batches skipped for non-finite values so far."""
    rep = parallel.replicated(t.mesh)
    take = jax.jit(_take, out_shardings=rep)
    state = jax.jit(functools.partial(init_states, t.model, t.tx, t.input_shape),
                    out_shardings=rep)(
        jnp.asarray([m.seed for m in members], jnp.int32),
        jnp.asarray([m.p_local for m in members], jnp.float32),
        jnp.asarray([m.p_global for m in members], jnp.float32))
    targets = [take(state, i) for i in range(len(members))]
    restored = [c.restore_latest_good(target) for c, target in zip(checkpointers, targets)]
    common = min(0 if r is None else r[2] for r in restored)
    if common == 0:
        return targets, 0, np.zeros(len(members), int)
    # A kill between the members' saves leaves some a checkpoint ahead: they step back to the
    # common step (checkpoints already written are kept, not written again).
    for i, (c, r) in enumerate(zip(checkpointers, restored)):
        if r[2] > common:
            if common not in c.all_steps():
                raise CheckpointError(
                    f"{members[i].name} has no checkpoint at step {common}, where the other "
                    f"members of its chunk resume; run again with --chunk=1 to resume every "
                    "member from its own step.")
            restored[i] = (*c.restore(targets[i], common), common)
    skipped = np.asarray([r[1].get("nonfinite_skipped", 0) for r in restored])
    return [r[0] for r in restored], common, skipped


def _member_metadata(t: _Trainer, member: Member, step: int, skipped: int) -> dict:
    metadata = loop.checkpoint_metadata(member_config(t.config, member), step)
    metadata["data_position"]["seed"] = t.sweep.data_seed(member, t.config.seed)
    return metadata | {"nonfinite_skipped": skipped}


class _VmapRunner:
    """All members of a chunk in one compiled step vmapped over their stacked states."""

    def __init__(self, t: _Trainer, members: list[Member], data_index: np.ndarray):
        rep = parallel.replicated(t.mesh)
        self._fn = parallel.jit_train_step(functools.partial(
            sweep_step, model=t.model, per_sample=t.config.drop_path.per_sample,
            skip_nonfinite=t.config.nonfinite == "skip", data_index=data_index), t.mesh)
        self._seeds = jnp.asarray([m.seed for m in members], jnp.int32)
        self._keys = jax.jit(jax.vmap(skipping.step_key, in_axes=(0, None)), out_shardings=rep)
        self._take = jax.jit(_take, out_shardings=rep)
        self._stack = jax.jit(_stack, out_shardings=rep)
        self._count = len(members)

    def combine(self, states: list[TrainState]) -> TrainState:
        return self._stack(*states)

    def split(self, state: TrainState) -> list[TrainState]:
        return [self._take(state, i) for i in range(self._count)]

    def step(self, state: TrainState, batches: tuple, step: int):
        return self._fn(state, batches, self._keys(self._seeds, step))


class _LoopRunner:
    """The members of a chunk one after another, each through the step of its single run
    (`skipping.make_train_fn`: dead work skipped, programs shared by all members), so each
    equals its single run bit for bit."""

    def __init__(self, t: _Trainer, members: list[Member], data_index: np.ndarray):
        config = t.config

        def build(mode):
            if mode not in t.programs:
                t.programs[mode] = parallel.jit_train_step(functools.partial(
                    steps.train_step, model=t.model, per_sample=config.drop_path.per_sample,
                    mode=mode, skip_nonfinite=config.nonfinite == "skip"), t.mesh)
            return t.programs[mode]

        self._fns = [skipping.make_train_fn(
            t.model, build, seed=m.seed, p_global=m.p_global,
            per_sample=config.drop_path.per_sample, skip=config.drop_path.skip)
            for m in members]
        self._data_index = data_index

    def combine(self, states: list[TrainState]) -> list[TrainState]:
        return list(states)

    def split(self, states: list[TrainState]) -> list[TrainState]:
        return states

    def step(self, states: list[TrainState], batches: tuple, step: int):
        out = [fn(s, batches[i], step) for fn, s, i in zip(self._fns, states, self._data_index)]
        metrics = jax.tree.map(lambda *xs: jnp.stack(xs), *[m for _, m in out])
        return [s for s, _ in out], metrics


def _train_chunk(t: _Trainer, workdir: str, members: list[Member], desc: str) -> None:
    """Trains `members` together from their common checkpointed step to num_train_steps."""
    config, mesh = t.config, t.mesh
    dirs = [member_dir(workdir, m) for m in members]
    checkpointers = [Checkpointer(d, keep=config.keep_checkpoints) for d in dirs]
    states, start_step, skipped = _initial_states(t, members, checkpointers)
    for d in dirs:
        truncate_metrics(d, start_step)
    writers = [MetricsWriter(d, purge_step=start_step + 1) for d in dirs]

    data_seeds = list(dict.fromkeys(t.sweep.data_seed(m, config.seed) for m in members))
    data_index = np.asarray([data_seeds.index(t.sweep.data_seed(m, config.seed))
                             for m in members])
    batches = [loop.train_batches(_with_seed(config, s), start_step) for s in data_seeds]
    runner = (_VmapRunner if t.strategy == "vmap" else _LoopRunner)(t, members, data_index)
    state = runner.combine(states)

    bar = tqdm.tqdm(total=config.num_train_steps, initial=start_step, unit="step", desc=desc,
                    disable=not config.progress_bar or jax.process_index() != 0,
                    dynamic_ncols=True, file=sys.stdout)
    # Each step's metrics (stacked over members) and which members it trained, i.e. did not
    # skip for a non-finite loss or gradient (only with nonfinite="skip").
    window: list[tuple[dict[str, np.ndarray], np.ndarray]] = []
    pending = None  # (step, device metrics): fetched after the next step is dispatched

    def finish(step: int, device_metrics) -> None:
        metrics = jax.device_get(device_metrics)
        flagged = metrics.pop("nonfinite", np.zeros(len(members))) > 0
        skipped[flagged] += 1
        for member in [m for m, f in zip(members, flagged) if f]:
            logging.warning("non-finite loss or gradient norm at step %d of %s: batch skipped",
                            step, member.name)
        finite = np.isfinite(metrics["loss"]) & np.isfinite(metrics["grad_norm"])
        diverged = [m.name for m, bad in zip(members, ~flagged & ~finite) if bad]
        if diverged:
            raise loop.NonFiniteLossError(
                f"Loss or gradient norm became non-finite at step {step} for "
                f"{', '.join(diverged)}; stopping. Every member's last good checkpoint is "
                "intact. Lower optim.learning_rate or set optim.grad_clip_norm, or skip such "
                "batches with --config.nonfinite=skip.")
        window.append((metrics, ~flagged))
        if step % config.log_every_steps == 0:
            learning_rate = float(t.lr_schedule(step - 1))
            for i, writer in enumerate(writers):
                kept = [m for m, trained in window if trained[i]]
                record = {k: float(np.mean([m[k][i] for m in kept])) for k in (kept or [{}])[0]}
                record["learning_rate"] = learning_rate
                if config.nonfinite == "skip":
                    record["nonfinite_skipped"] = int(skipped[i])
                writer.write(step, "train", record)
            bar.set_postfix(mean_loss=f"{np.mean([m['loss'] for m, _ in window]):.3f}")
            window.clear()

    try:
        for step in range(start_step + 1, config.num_train_steps + 1):
            batch = tuple(parallel.to_global(next(b), mesh) for b in batches)
            state, device_metrics = runner.step(state, batch, step)
            # At most two steps in flight, as in loop.train.
            if pending is not None:
                finish(*pending)
            pending = (step, device_metrics)
            bar.update(1)
            last = step == config.num_train_steps
            evaluate = step % config.eval_every_steps == 0 or last
            save = step % config.checkpoint_every_steps == 0 or last
            if not (evaluate or save):
                continue
            finish(*pending)
            pending = None
            states = runner.split(state)
            evals = [None] * len(members)
            if evaluate:
                evals = [loop.evaluate(s, t.eval_fns, loop.eval_batches(config), mesh)
                         for s in states]
                for writer, metrics in zip(writers, evals):
                    writer.write(step, config.data.eval_split, metrics)
                accuracy = [e["accuracy"] for e in evals]
                bar.write(f"step {step}: full-network accuracy of {len(members)} members: mean "
                          f"{np.mean(accuracy):.4f}, min {min(accuracy):.4f}, "
                          f"max {max(accuracy):.4f}")
            if save:
                for i, (checkpointer, member) in enumerate(zip(checkpointers, members)):
                    if step in checkpointer.all_steps():  # written before an interruption
                        continue
                    checkpointer.save(step, states[i], metrics=evals[i], metadata=_member_metadata(
                        t, member, step, int(skipped[i])))
    finally:
        bar.close()
        for writer in writers:
            writer.close()
        for checkpointer in checkpointers:
            checkpointer.close()


def final_eval(workdir: str, split: str) -> dict[str, float]:
    """The last `split` record of a member's metrics, without its step and split."""
    records = [r for r in read_metrics(workdir) if r["split"] == split]
    if not records:
        raise FileNotFoundError(f"no {split!r} evaluation in {workdir}/metrics.jsonl")
    return {k: v for k, v in records[-1].items() if k not in ("step", "split")}


def check_chunk(chunk: int | None) -> None:
    """Rejects a chunk size that is not a positive number of members (None: all at once)."""
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
        raise ValueError(f"chunk must be a positive number of members, got {chunk!r}.")


def resolve_strategy(strategy: str) -> str:
    """"auto" is "loop" on CPU, where a vmapped step ran slower per model than single-model
    steps with dead work skipped (BENCHMARKS.md), and "vmap" on accelerators."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}.")
    if strategy == "auto":
        return "loop" if jax.default_backend() == "cpu" else "vmap"
    return strategy


def train_sweep(config: ml_collections.ConfigDict, workdir: str, sweep: Sweep, *,
                chunk: int | None = None, strategy: str = "auto") -> list[dict[str, float]]:
    """Trains (or resumes) every member of `sweep` in `workdir`, `chunk` at a time (default:
    all), and writes the result tables; returns each member's final eval metrics, in
    `sweep.members` order.

    Config, data and model are checked before the workdir is touched; the sweep holds the
    workdir's lock throughout, as a single run does.
    """
    config = config_lib.validate(config)
    check_chunk(chunk)
    strategy = resolve_strategy(strategy)
    parallel.check_batch_size(config.batch_size)
    parallel.check_batch_size(config.eval_batch_size, "eval_batch_size")
    info = loop.dataset_info(config)
    model = loop.build_model(config, info.num_classes)
    if not isinstance(model, FractalNet):
        raise ValueError(f"model.name={config.model.name!r} has no drop-path to sweep; use a "
                         "FractalNet (e.g. --config.model.name=fractalnet).")
    os.makedirs(workdir, exist_ok=True)
    # Only process 0 locks: the hosts of a multi-host run share one workdir.
    with workdir_lock(workdir) if jax.process_index() == 0 else contextlib.nullcontext():
        _claim_workdir(workdir, config, sweep)
        return _run(config, workdir, sweep, chunk, model, info, strategy)


def _run(config: ml_collections.ConfigDict, workdir: str, sweep: Sweep, chunk: int | None,
         model: FractalNet, info: pipeline.DatasetInfo, strategy: str) -> list[dict[str, float]]:
    members = sweep.members
    chunks = plan_chunks([_saved_step(member_dir(workdir, m)) for m in members],
                         config.num_train_steps, chunk or len(members))
    if chunks:
        trainer = _trainer(config, sweep, model, info, strategy)
        for number, indices in enumerate(chunks, 1):
            _train_chunk(trainer, workdir, [members[i] for i in indices],
                         desc=f"chunk {number}/{len(chunks)} ({len(indices)} members)")
    results = [final_eval(member_dir(workdir, m), config.data.eval_split) for m in members]
    if jax.process_index() == 0:
        sweep_tables.write_results(
            workdir, [{**dataclasses.asdict(m), **r} for m, r in zip(members, results)],
            caption=f"{config.dataset}/{config.data.eval_split} accuracy after "
                    f"{config.num_train_steps} steps, mean ± sample std over seeds "
                    f"{', '.join(map(str, sweep.seeds))} ({sweep.data_order} data order)")
    return results
