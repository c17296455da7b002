"""Skip dead work: run, at each step, a program that computes only what the drop-path plan keeps.

Under a global plan only one column is alive (for C=3, 7/3 of a block's 7 units on average), so
the train step for such a step computes that column alone. The mode of every step (global column
c, or local) is a pure function of (seed, step) — the same draw `drop_path.sample` makes — and is
computed on the host CPU ahead of time, so choosing a program never waits on the accelerator.
One program is compiled per mode that occurs (C columns + local), each on first use.

Why host dispatch and not `lax.switch` inside one program: on XLA:CPU, convolutions inside
conditional branches lose the layouts of its fast kernels, and the switch ran 3.5× *slower* than
computing everything (see BENCHMARKS.md); separate programs keep every branch a plain program.
Per-sample plans mix modes inside a batch and keep the compute-everything step.
"""
from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from fractal_jax.models import drop_path
from fractal_jax.models.fractal import FractalNet
from fractal_jax.models.schedule import NetworkSchedule
from fractal_jax.training.steps import Metrics, Mode
from fractal_jax.training.state import TrainState

StepFn = Callable[[TrainState, dict, int], tuple[TrainState, Metrics]]
MODES_PER_CHUNK = 1024  # steps whose modes are drawn in one host call


def step_key(seed: int, step: int) -> jax.Array:
    """The key of step `step` (>= 1) of a run with `seed`; step 0's fold is the init key."""
    return jax.random.fold_in(jax.random.key(seed), step)


@functools.partial(jax.jit, static_argnums=(2,))
def _modes(run_key: jax.Array, steps: jax.Array, schedule: NetworkSchedule,
           p_global: jax.Array) -> tuple[jax.Array, jax.Array]:
    def one(step):
        plan_key = jax.random.split(jax.random.fold_in(run_key, step))[0]  # as in train_step
        return drop_path.sample_mode(plan_key, schedule, p_global)
    return jax.vmap(one)(steps)


def host_modes(seed: int, steps: np.ndarray, schedule: NetworkSchedule,
               p_global: float) -> list[Mode]:
    """The mode `train_step(mode="sample")` draws at each of `steps`: a column or "local".

    Computed on the CPU backend (keys give the same bits on every backend).
    """
    cpu = jax.devices("cpu")[0]
    with jax.default_device(cpu):
        is_global, column = jax.device_get(_modes(
            jax.random.key(seed), jnp.asarray(steps, jnp.uint32), schedule,
            jnp.asarray(p_global, jnp.float32)))
    return [int(c) if g else "local" for g, c in zip(is_global, column)]


class SkippingTrainStep:
    """``(state, batch, step) -> (state, metrics)``, dispatching each step to the program of its
    drop-path mode: column c alone for a global step, the masked local plan otherwise.

    `build(mode)` returns the compiled ``step(state, batch, key)`` for a mode. Results equal the
    compute-everything step's within float tolerance (tests/test_skipping.py).
    """

    def __init__(self, build: Callable[[Mode], Callable], *, seed: int,
                 schedule: NetworkSchedule, p_global: float):
        self._build, self._seed = build, seed
        self._schedule, self._p_global = schedule, float(p_global)
        self._programs: dict[Mode, Callable] = {}
        self._modes: dict[int, Mode] = {}

    def mode(self, step: int) -> Mode:
        if step not in self._modes:
            first = step - step % MODES_PER_CHUNK
            steps = np.arange(first, first + MODES_PER_CHUNK)
            self._modes = dict(zip(steps.tolist(), host_modes(
                self._seed, steps, self._schedule, self._p_global)))
        return self._modes[step]

    def __call__(self, state: TrainState, batch: dict, step: int):
        mode = self.mode(step)
        if mode not in self._programs:
            self._programs[mode] = self._build(mode)
        return self._programs[mode](state, batch, step_key(self._seed, step))


def make_train_fn(model, build: Callable[[Mode], Callable], *, seed: int, p_global: float,
                  per_sample: bool, skip: bool) -> StepFn:
    """The loop's ``(state, batch, step)`` step: skipping dead work where a plan allows it
    (a FractalNet with per-batch plans and `skip`), else the one compute-everything program."""
    if skip and isinstance(model, FractalNet) and not per_sample:
        return SkippingTrainStep(build, seed=seed, schedule=model.network_schedule,
                                 p_global=p_global)
    program = build("sample")
    return lambda state, batch, step: program(state, batch, step_key(seed, step))
