"""Which compiled program trains step s, in one place.

Every step's key is ``fold_in(key(seed), step)`` (`step_key`), split into a plan key (which
drop-path plan the step trains) and a dropout key. The programs, each a `steps.train_step`
compiled for the device mesh on first use:

- ``column c`` (`column_step`): the network's column c alone, computing only its units.
- ``local`` (`sampled_step`, local=True): the local plan drawn from the plan key; every unit is
  computed and dead join inputs are masked.
- ``sampled`` (`sampled_step`): the whole plan drawn inside the step (global with probability
  p_global, else local; per batch, or per sample), every unit computed. Also every step of a
  model without drop-path.

A FractalNet with per-batch plans and ``drop_path.skip`` (the default; it needs
``drop_path.bn_update="live"``) skips dead work: whether
step s is global, and which column it keeps, is the draw `drop_path.sample` makes from the plan
key; `plan_kinds` makes it on the host ahead of time, and step s runs ``column c`` or ``local``
(`SkippingStep`), training exactly what ``sampled`` trains (tests/test_skipping.py). Otherwise
every step runs ``sampled``. A vmapped sweep trains K members in one ``sampled`` program
vmapped over their stacked states, keys and rates (`vmapped_step`).

Why host dispatch and not `lax.switch` inside one program: on XLA:CPU, convolutions inside
conditional branches lose their fast kernels and the switch ran several times slower than
computing everything (BENCHMARKS.md); separate programs keep every branch a plain program.
`switched_step` is that alternative, kept to measure it on other backends
(experiments/gpu_check.py).
"""
from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fractal_jax.checks import check_choice
from fractal_jax.models import drop_path
from fractal_jax.models.fractal import FractalNet
from fractal_jax.models.schedule import NetworkSchedule
from fractal_jax.training import parallel, steps
from fractal_jax.training.state import TrainState

StepFn = Callable[[TrainState, dict, int], tuple[TrainState, steps.Metrics]]
KINDS_PER_CHUNK = 1024  # steps whose plan kinds are drawn in one host call
STRATEGIES = ("loop", "vmap")


def step_key(seed: int, step: int) -> jax.Array:
    """The key of step `step` (>= 1) of a run with `seed`; step 0's fold is the init key."""
    return jax.random.fold_in(jax.random.key(seed), step)


def sampled_step(state: TrainState, batch: steps.Batch, key: jax.Array, *, model,
                 per_sample: bool = False, local: bool = False, bn_update: str = "live",
                 skip_nonfinite: bool = False) -> tuple[TrainState, steps.Metrics]:
    """`steps.train_step` of the plan drawn from `key` with the state's rates (only the local
    plan with `local`); models without drop-path get only the dropout key."""
    plan_key, dropout_key = jax.random.split(key)
    plan = None
    if isinstance(model, FractalNet):
        schedule, rates = model.network_schedule, state.rates
        if local:
            plan = drop_path.sample_local(plan_key, schedule, rates["p_local"])
        else:
            plan = drop_path.sample(plan_key, schedule, rates["p_local"], rates["p_global"],
                                    batch_size=batch["image"].shape[0] if per_sample else None)
    return steps.train_step(state, batch, dropout_key, model=model, plan=plan,
                            bn_update=bn_update, skip_nonfinite=skip_nonfinite)


def column_step(state: TrainState, batch: steps.Batch, key: jax.Array, *, model: FractalNet,
                column: int, skip_nonfinite: bool = False) -> tuple[TrainState, steps.Metrics]:
    """`steps.train_step` of column `column` alone: what `sampled_step` trains when its plan key
    draws that column's global plan."""
    _, dropout_key = jax.random.split(key)
    return steps.train_step(state, batch, dropout_key, model=model, column=column,
                            skip_nonfinite=skip_nonfinite)


def switched_step(state: TrainState, batch: steps.Batch, key: jax.Array, *, model: FractalNet,
                  skip_nonfinite: bool = False) -> tuple[TrainState, steps.Metrics]:
    """What `SkippingStep` trains, as one program: the plan kind is drawn on the device and
    `lax.switch` runs the ``local`` or ``column c`` step (only the chosen branch executes)."""
    plan_key, _ = jax.random.split(key)  # as in sampled_step
    is_global, column = drop_path.sample_mode(plan_key, model.network_schedule,
                                              state.rates["p_global"])
    branches = [functools.partial(sampled_step, model=model, local=True,
                                  skip_nonfinite=skip_nonfinite)]
    branches += [functools.partial(column_step, model=model, column=c,
                                   skip_nonfinite=skip_nonfinite)
                 for c in range(1, model.network_schedule.max_columns + 1)]
    return jax.lax.switch(jnp.where(is_global, column, 0), branches, state, batch, key)


def vmapped_step(states: TrainState, batches: tuple[steps.Batch, ...], keys: jax.Array, *,
                 data_index: np.ndarray, **kwargs) -> tuple[TrainState, steps.Metrics]:
    """`sampled_step` of K members at once: `states`, `keys` and the metrics are stacked.

    `batches` holds one batch per data seed; member k trains on ``batches[data_index[k]]``.
    """
    batch = jax.tree.map(lambda *xs: jnp.stack(xs)[data_index], *batches)
    return jax.vmap(functools.partial(sampled_step, **kwargs))(states, batch, keys)


@functools.partial(jax.jit, static_argnums=(2,))
def _kinds(run_key: jax.Array, step_numbers: jax.Array, schedule: NetworkSchedule,
           p_global: jax.Array) -> tuple[jax.Array, jax.Array]:
    def one(step):
        plan_key = jax.random.split(jax.random.fold_in(run_key, step))[0]  # as in sampled_step
        return drop_path.sample_mode(plan_key, schedule, p_global)
    return jax.vmap(one)(step_numbers)


def plan_kinds(seed: int, step_numbers: np.ndarray, schedule: NetworkSchedule,
               p_global: float) -> list[int | None]:
    """The kind of plan `sampled_step` draws at each of `step_numbers`: the column a global plan
    keeps, or None for a local plan. Computed on the CPU (keys give the same bits everywhere)."""
    # This process's own CPU device: jax.devices("cpu")[0] is process 0's on a multi-host run.
    with jax.default_device(jax.local_devices(backend="cpu")[0]):
        is_global, column = jax.device_get(_kinds(
            jax.random.key(seed), jnp.asarray(step_numbers, jnp.uint32), schedule,
            jnp.asarray(p_global, jnp.float32)))
    return [int(c) if g else None for g, c in zip(is_global, column)]


class Programs:
    """The compiled train steps of one experiment, each built on first use and shared by every
    run (a single run, or the members of a sweep) that trains with them."""

    def __init__(self, model, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh):
        self.model, self.mesh = model, mesh
        self.per_sample = config.drop_path.per_sample
        self.bn_update = config.drop_path.bn_update
        self.skip_nonfinite = config.nonfinite == "skip"
        self.skips = (config.drop_path.skip and isinstance(model, FractalNet)
                      and not self.per_sample)
        self._compiled: dict = {}

    def _compile(self, name, fn: Callable, **kwargs) -> Callable:
        if name not in self._compiled:
            self._compiled[name] = parallel.jit_train_step(functools.partial(
                fn, model=self.model, skip_nonfinite=self.skip_nonfinite, **kwargs), self.mesh)
        return self._compiled[name]

    def sampled(self) -> Callable:
        return self._compile("sampled", sampled_step, per_sample=self.per_sample,
                             bn_update=self.bn_update)

    def for_kind(self, kind: int | None) -> Callable:
        """``column c`` for a global plan kind c, ``local`` for None."""
        if kind is None:
            return self._compile("local", sampled_step, local=True)
        return self._compile(("column", kind), column_step, column=kind)

    def run_step(self, seed: int, p_global: float) -> StepFn:
        """The ``(state, batch, step)`` step of the run with `seed`: dead work skipped where
        the plans allow it, else the ``sampled`` program."""
        if self.skips:
            return SkippingStep(self, seed, p_global)
        program = self.sampled()
        return lambda state, batch, step: program(state, batch, step_key(seed, step))

    def vmapped(self, data_index: np.ndarray) -> Callable:
        """K members' ``sampled`` steps in one program (`vmapped_step`)."""
        return parallel.jit_train_step(functools.partial(
            vmapped_step, model=self.model, per_sample=self.per_sample, bn_update=self.bn_update,
            skip_nonfinite=self.skip_nonfinite, data_index=data_index), self.mesh)


class SkippingStep:
    """``(state, batch, step) -> (state, metrics)`` running at each step the program of its
    plan kind: ``column c`` for a global plan, ``local`` otherwise."""

    def __init__(self, programs: Programs, seed: int, p_global: float):
        self._programs, self._seed, self._p_global = programs, seed, float(p_global)
        self._kinds: dict[int, int | None] = {}

    def kind(self, step: int) -> int | None:
        if step not in self._kinds:
            first = step - step % KINDS_PER_CHUNK
            step_numbers = np.arange(first, first + KINDS_PER_CHUNK)
            self._kinds = dict(zip(step_numbers.tolist(), plan_kinds(
                self._seed, step_numbers, self._programs.model.network_schedule,
                self._p_global)))
        return self._kinds[step]

    def __call__(self, state: TrainState, batch: dict, step: int):
        program = self._programs.for_kind(self.kind(step))
        return program(state, batch, step_key(self._seed, step))


def _take(state: TrainState, index: jax.Array) -> TrainState:
    return jax.tree.map(lambda x: x[index], state)


def _stack(*states: TrainState) -> TrainState:
    return jax.tree.map(lambda *xs: jnp.stack(xs), *states)


class SequentialRunner:
    """Trains K runs one after another, each through its own `Programs.run_step`, so each
    equals its single run bit for bit. States, and each step's metrics, are lists."""

    def __init__(self, programs: Programs, seeds: Sequence[int], p_globals: Sequence[float],
                 data_index: np.ndarray):
        self._fns = [programs.run_step(s, p) for s, p in zip(seeds, p_globals)]
        self._data_index = data_index

    def combine(self, states: list[TrainState]) -> list[TrainState]:
        return list(states)

    def split(self, states: list[TrainState]) -> list[TrainState]:
        return states

    def step(self, states: list[TrainState], batches: tuple, step: int):
        out = [fn(s, batches[i], step) for fn, s, i in zip(self._fns, states, self._data_index)]
        return [s for s, _ in out], [m for _, m in out]


class VmappedRunner:
    """Trains K runs in one compiled step vmapped over their stacked states (`vmapped_step`):
    every unit is computed, since the runs draw different plans. A run equals its single run
    up to float rounding."""

    def __init__(self, programs: Programs, seeds: Sequence[int], data_index: np.ndarray):
        rep = parallel.replicated(programs.mesh)
        self._fn = programs.vmapped(data_index)
        self._seeds = jnp.asarray(seeds, jnp.int32)
        self._keys = jax.jit(jax.vmap(step_key, in_axes=(0, None)), out_shardings=rep)
        self._take = jax.jit(_take, out_shardings=rep)
        self._stack = jax.jit(_stack, out_shardings=rep)
        self._count = len(seeds)

    def combine(self, states: list[TrainState]) -> TrainState:
        return self._stack(*states)

    def split(self, state: TrainState) -> list[TrainState]:
        return [self._take(state, i) for i in range(self._count)]

    def step(self, state: TrainState, batches: tuple, step: int):
        return self._fn(state, batches, self._keys(self._seeds, step))


def make_runner(programs: Programs, configs: Sequence[ml_collections.ConfigDict],
                data_index: np.ndarray, strategy: str):
    """The runner that trains runs with `configs` together: "loop" (`SequentialRunner`) or
    "vmap" (`VmappedRunner`)."""
    check_choice("strategy", strategy, STRATEGIES)
    seeds = [c.seed for c in configs]
    if strategy == "vmap":
        return VmappedRunner(programs, seeds, data_index)
    return SequentialRunner(programs, seeds, [c.drop_path.p_global for c in configs],
                            data_index)
