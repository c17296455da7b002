"""Speed and memory of FractalNet training on this machine, measured side by side in one run.

    python experiments/benchmark.py            # the CIFAR FractalNet-20 shape (widths 64..512)
    python experiments/benchmark.py --quick    # widths 16..128, on a 2-core CPU
    python experiments/benchmark.py --quick --profile   # plus an op-time breakdown

Measures train images/s with the full, local-only, global-only and paper-mixed drop-path plans,
with skipping dead work on and off (`training/programs.py`), and the full and paper-mixed steps
of the code path before per-shape convolutions, window max-pools, the fused BatchNorm and hashed
dropout ("current code": `conv_impl="xla"`, `pool_impl="reduce_window"`, `bn_impl="autodiff"`,
`dropout_impl="threefry"`); eval images/s; a K-model vmapped sweep step
(XLA's grouped convolutions, or patches + batched matmuls) against K sequential steps; a large
matmul, whose FLOP/s each train row is compared with; the real training loop (`loop.train`)
against the isolated step over the same steps; compile time and memory; the share of local-step
work that extra programs could skip (`models/local_skip.py`); with `--profile` the op time per
category (convolution, BatchNorm, pooling, ...) of a full, a single-column and a local step; and
with `--flags` XLA flag sets, each in its own process.

Variants are timed in interleaved rounds (one window of every variant per round) and every ratio
is the median of its per-round ratios, reported with its spread: on a shared machine the load
changes between windows, and a ratio of windows timed minutes apart moves with it.

Writes OUT/BENCHMARKS.md and OUT/benchmarks.json (hardware, versions, flags, every row). The
last line printed is one JSON object of the ratios, among them ``skip_speedup`` (paper mix,
skipping on ÷ off), ``paper_mix_speedup`` and ``full_speedup`` (default ÷ current code path),
``matmul_fraction`` (paper-mix train FLOP/s ÷ large-matmul FLOP/s), ``vmap_speedup`` (K models
vmapped ÷ K sequential steps, per model) and ``loop_fraction`` (real loop ÷ isolated step).
Absolute numbers depend on the machine and its load; the ratios are what to compare.
"""
import os
import sys

# Run as a script: make the repository importable without installing it.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse  # noqa: E402
import collections  # noqa: E402
import dataclasses  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from typing import Callable  # noqa: E402

from fractal_jax.runtime import configure_jax, with_cpu_flags  # noqa: E402

# XLA flag sets compared with --flags, each in a fresh process (flags are read at start-up).
# "XLA defaults" starts the child without our CPU flags.
FLAG_SETS = {
    "ours": "",
    "XLA defaults": None,
    "YNNPACK conv fusions": "--xla_cpu_experimental_ynn_fusion_type=individual_convolution",
    "oneDNN": "--xla_cpu_use_onednn=true",
    "oneDNN custom calls": "--xla_cpu_experimental_onednn_custom_call=true",
    "XNNPACK": "--xla_cpu_use_xnnpack=true",
    "concurrency scheduler off": "--xla_cpu_enable_concurrency_optimized_scheduler=false",
}


@dataclasses.dataclass(frozen=True)
class Setup:
    widths: tuple[int, ...]
    batch_size: int
    image_size: int = 32
    num_classes: int = 10
    steps_per_window: int = 8
    windows: int = 3
    sweep_models: int = 4
    # Further fractalnet20 arguments as (name, value) pairs, e.g. a smaller B and C for tests.
    model: tuple = ()


QUICK = Setup(widths=(16, 32, 64, 128, 128), batch_size=32, steps_per_window=16)
FULL = Setup(widths=(64, 128, 256, 512, 512), batch_size=32, windows=3)
SETUPS = {"quick": QUICK, "full": FULL}


def _model(setup: Setup, **overrides):
    return _cached_model(setup, tuple(sorted(overrides.items())))


@functools.lru_cache(maxsize=None)
def _cached_model(setup: Setup, overrides: tuple):
    # One instance per variant: compiled programs are specialised to the state's tree metadata,
    # which includes the model's bound `apply`.
    from fractal_jax.models.registry import create_model
    return create_model("fractalnet20", setup.num_classes, widths=tuple(setup.widths),
                        **{**dict(setup.model), **dict(overrides)})


def _batch(setup: Setup, seed: int = 0):
    import jax.numpy as jnp
    import numpy as np
    rng = np.random.default_rng(seed)
    shape = (setup.batch_size, setup.image_size, setup.image_size, 3)
    return {"image": jnp.asarray(rng.normal(size=shape), jnp.float32),
            "label": jnp.asarray(rng.integers(0, setup.num_classes, setup.batch_size)),
            "mask": jnp.ones(setup.batch_size, bool)}


@functools.lru_cache(maxsize=None)
def _optimizer():
    import optax
    return optax.sgd(0.01, momentum=0.9)  # one object, so states of several models can stack


def _state(model, setup: Setup, p_local: float, p_global: float, seed: int = 0):
    import jax
    return _init(model, setup)(jax.random.key(seed), p_local=p_local, p_global=p_global)


@functools.lru_cache(maxsize=None)
def _init(model, setup: Setup):
    # One compiled initialiser per model: seeds and rates are its arguments, not constants.
    import jax
    from fractal_jax.training.state import create_train_state
    shape = (1, setup.image_size, setup.image_size, 3)
    return jax.jit(functools.partial(create_train_state, model, _optimizer(), input_shape=shape))


def _block(tree):
    import jax
    return jax.block_until_ready(tree)


class Programs:
    """Ahead-of-time compiled programs, each compiled once per process and shared by every row
    that runs it; records each program's compile seconds and XLA temporary memory."""

    def __init__(self):
        self._compiled: dict = {}
        self.compile_s: dict = {}
        self.temp_mb: dict = {}

    @staticmethod
    def _identity(key) -> tuple:
        # Flax modules compare equal by their fields, but models of setups that differ only in
        # batch size need programs of their own: a key names its model by identity.
        import flax.linen as nn
        return tuple(("model", id(k)) if isinstance(k, nn.Module) else k for k in key)

    def get(self, key, fn: Callable, *example_args, donate: bool = True):
        key = self._identity(key)
        if key not in self._compiled:
            import jax
            start = time.perf_counter()
            compiled = jax.jit(fn, donate_argnums=0 if donate else ()).lower(
                *example_args).compile()
            self.compile_s[key] = time.perf_counter() - start
            analysis = compiled.memory_analysis()
            # Temporary buffers: mostly the activations kept for the backward pass.
            self.temp_mb[key] = None if analysis is None else analysis.temp_size_in_bytes / 2**20
            self._compiled[key] = compiled
        return self._compiled[key]

    def cost(self, keys) -> dict:
        """compile_s: seconds to compile the programs `keys` (what running that variant from
        scratch costs; shared programs are compiled once); temp_mb: the largest temporary
        memory among them."""
        keys = [self._identity(k) for k in keys]
        temps = [self.temp_mb[k] for k in keys if self.temp_mb[k] is not None]
        return {"compile_s": sum(self.compile_s[k] for k in keys),
                "temp_mb": max(temps) if temps else None}


PROGRAMS = Programs()


@dataclasses.dataclass
class Variant:
    """One measured configuration: `window()` runs `images` images' worth of work (blocking
    until done) and may return the seconds to count, if not all of its time; `flops` is the
    reference FLOP count of one window (see `step_flops`)."""

    name: str
    window: Callable[[], float | None]
    images: int
    cost: dict
    flops: float | None = None


def measure(variants: list[Variant], setup: Setup, deadline: float | None = None) -> list[dict]:
    """Rows of `variants` timed in interleaved rounds (A B C ... A B C ...): one untimed warm-up
    window each, then `setup.windows` rounds of one window of every variant (fewer, but at least
    one, once `time.monotonic()` passes `deadline`). A ratio of two rows is then the median of
    per-round ratios, so a change of machine load between rounds moves both sides of it
    (`ratios`)."""
    for v in variants:
        v.window()
    times: dict[str, list[float]] = {v.name: [] for v in variants}
    for round_ in range(setup.windows):
        if round_ and deadline is not None and time.monotonic() > deadline:
            break
        for v in variants:
            start = time.perf_counter()
            counted = v.window()
            times[v.name].append(time.perf_counter() - start if counted is None else counted)
    rows = [_row(v.name, v.images, times[v.name], **v.cost) for v in variants]
    for row, v in zip(rows, variants):
        if v.flops is not None:
            row["gflops_per_s"] = [v.flops / t / 1e9 for t in times[v.name]]
    return rows


def _row(name: str, images_per_window: int, times: list[float], **extra) -> dict:
    rates = [images_per_window / t for t in times]  # in round order (for per-round ratios)
    ordered = sorted(rates)
    row = {"name": name, "images_per_s": statistics.median(rates), "min": ordered[0],
           "max": ordered[-1], "rates": rates, **extra}
    print(f"{name}: {row['images_per_s']:,.1f} images/s", file=sys.stderr, flush=True)
    return row


@functools.lru_cache(maxsize=None)
def window_seed(setup: Setup, p_global: float = 0.5) -> int:
    """The first run seed whose window of steps has the plan mix of a long run: a fraction
    `p_global` of global steps, spread evenly over the columns (each column within one step of
    its share). Short windows of an arbitrary seed can be far off (seed 0: 6 of 16 global)."""
    import numpy as np
    schedule = _model(setup).network_schedule
    steps = np.arange(1, setup.steps_per_window + 1)
    share = len(steps) * p_global
    for seed in range(10_000):
        modes = window_modes(seed, steps, schedule, p_global)
        counts = [modes.count(c) for c in range(1, schedule.max_columns + 1)]
        if sum(counts) == round(share) and all(
                abs(n - share / len(counts)) < 1 for n in counts):
            return seed
    raise ValueError(f"no seed gives an even plan mix over {len(steps)} steps")


# The code path before per-shape convolutions, window max-pools, the fused BatchNorm and hashed
# dropout: XLA's own ops, autodiff BatchNorm and flax's threefry dropout.
CURRENT = dict(conv_impl="xla", pool_impl="reduce_window", bn_impl="autodiff",
               dropout_impl="threefry")


def train_step(model, mode):
    """The train step of a plan mode (`training/programs.py`): "sample" (the whole plan drawn in
    the step, every unit computed), "local" (the local plan, masked), "switch" (one program
    choosing the local or a column program on the device) or a column alone."""
    from fractal_jax.training import programs
    if mode == "switch":
        return functools.partial(programs.switched_step, model=model)
    if mode == "sample":
        return functools.partial(programs.sampled_step, model=model)
    if mode == "local":
        return functools.partial(programs.sampled_step, model=model, local=True)
    return functools.partial(programs.column_step, model=model, column=mode)


def window_modes(seed: int, steps, schedule, p_global: float) -> list:
    """The plan mode of each of `steps` of a run with `seed`: a column or "local"."""
    from fractal_jax.training import programs
    return ["local" if k is None else k
            for k in programs.plan_kinds(seed, steps, schedule, p_global)]


def step_flops(setup: Setup, modes) -> float:
    """FLOPs of the train steps of `modes` ("sample" or a column), as XLA's cost analysis counts
    them for the current code path's programs (XLA's convolution). One count for every variant,
    so FLOP/s compare work done, whatever an implementation computes on padding."""
    from fractal_jax.training import programs
    model = _model(setup, **CURRENT)
    state, batch = _state(model, setup, 0.15, 0.5), _batch(setup)
    counts = collections.Counter(modes)
    return sum(n * PROGRAMS.get((model, mode), train_step(model, mode), state, batch,
                                programs.step_key(0, 1)).cost_analysis()["flops"]
               for mode, n in counts.items())


def train_variant(setup: Setup, name: str, *, p_local: float, p_global: float, skip: bool,
                  first_step: int = 1, count_flops: bool = True, every_step: str | None = None,
                  **model_overrides) -> Variant:
    """`steps_per_window` train steps (steps first_step, first_step + 1, ... of the window
    seed) with the given plan rates, skipping dead work or not (or running the `train_step`
    mode `every_step` at every step); with `count_flops`, the window's reference FLOPs
    (`step_flops`)."""
    import numpy as np
    from fractal_jax.training import programs
    model = _model(setup, **model_overrides)
    state = _state(model, setup, p_local, p_global)
    batch = _batch(setup)
    seed = window_seed(setup)
    window_steps = range(first_step, first_step + setup.steps_per_window)
    # Skipping runs each step's plan-mode program; otherwise every step draws its whole plan.
    modes = (window_modes(seed, np.asarray(window_steps), model.network_schedule, p_global)
             if skip else [every_step or "sample"] * len(window_steps))
    used = [(model, mode) for mode in dict.fromkeys(modes)]
    compiled = {mode: PROGRAMS.get((model, mode), train_step(model, mode), state, batch,
                                   programs.step_key(seed, 1)) for mode in dict.fromkeys(modes)}
    keys = [programs.step_key(seed, step) for step in window_steps]
    holder = {"state": state}

    def window():
        s = holder["state"]
        for mode, key in zip(modes, keys):
            s, _ = compiled[mode](s, batch, key)
        holder["state"] = _block(s)

    window()
    # A local step's FLOPs are counted as those of the program that computes every unit.
    flops = step_flops(setup, ["sample" if m == "local" else m for m in modes]) \
        if count_flops else None
    return Variant(name, window, setup.batch_size * setup.steps_per_window,
                   PROGRAMS.cost(dict.fromkeys(used)), flops)


def eval_variant(setup: Setup, name: str, **model_overrides) -> Variant:
    from fractal_jax.training import steps
    model = _model(setup, **model_overrides)
    state = _state(model, setup, 0.0, 0.0)
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    batch = _batch(setup)
    key = (model, "eval")
    fn = PROGRAMS.get(key, functools.partial(steps.eval_step, model=model), variables, batch,
                      donate=False)

    def window():
        for _ in range(setup.steps_per_window):
            out = fn(variables, batch)
        _block(out)

    return Variant(name, window, setup.batch_size * setup.steps_per_window,
                   PROGRAMS.cost([key]))


def matmul_variant(setup: Setup, size: int = 1024, dtype: str = "float32") -> Variant:
    """A large matmul: what FLOP/s XLA reaches on this machine under the same load."""
    import jax.numpy as jnp
    a = jnp.ones((size, size), dtype)
    key = ("matmul", size, dtype)
    fn = PROGRAMS.get(key, lambda x: x @ x, a, donate=False)
    repeats = 2 * setup.steps_per_window

    def window():
        for _ in range(repeats):
            out = fn(a)
        _block(out)

    return Variant(f"matmul {size}×{size}×{size} ({dtype})", window, 0, PROGRAMS.cost([key]),
                   flops=repeats * 2.0 * size ** 3)


def sweep_variants(setup: Setup, patches: bool = True) -> list[Variant]:
    """K models in one vmapped step (shared batch, own rates and keys), with XLA's convolution
    and (with `patches`) with every convolution as patches + (batched) matmul, against K
    sequential steps."""
    import jax
    import jax.numpy as jnp
    from fractal_jax.training import programs
    k = setup.sweep_models
    batch = _batch(setup)
    keys = [jnp.stack([programs.step_key(i, step) for i in range(k)])
            for step in range(1, setup.steps_per_window + 1)]
    images = k * setup.batch_size * setup.steps_per_window
    model = _model(setup)
    states = [_state(model, setup, 0.15, 0.5, seed=i) for i in range(k)]
    single_key = (model, "sample")
    single = PROGRAMS.get(single_key, train_step(model, "sample"), states[0], batch,
                          programs.step_key(0, 1))
    holder = {"seq": states}

    def sequential():
        out = []
        for i, s in enumerate(holder["seq"]):
            for step in range(1, setup.steps_per_window + 1):
                s, _ = single(s, batch, programs.step_key(i, step))
            out.append(s)
        holder["seq"] = _block(out)

    variants = [Variant(f"sweep: {k} models sequentially (masked step)", sequential, images,
                        PROGRAMS.cost([single_key]))]
    for label, overrides in (("", {}), (", conv patches", {"conv_impl": "patches"}))[
            :2 if patches else 1]:
        vmodel = _model(setup, **overrides)
        stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[
            _state(vmodel, setup, 0.15, 0.5, seed=i) for i in range(k)])
        vmap_key = (vmodel, f"vmap{k}")
        vmapped = PROGRAMS.get(vmap_key, jax.vmap(train_step(vmodel, "sample"),
                                                  in_axes=(0, None, 0)), stacked, batch, keys[0])
        box = {"state": stacked}

        def together(box=box, vmapped=vmapped):
            s = box["state"]
            for step_keys in keys:
                s, _ = vmapped(s, batch, step_keys)
            box["state"] = _block(s)

        variants.append(Variant(f"sweep: {k} models vmapped in one step{label}", together,
                                images, PROGRAMS.cost([vmap_key])))
    return variants


def compile_seconds(setup: Setup) -> float:
    """Seconds to lower and compile the paper-mixed masked train step in this process."""
    import jax
    from fractal_jax.training import programs
    model = _model(setup)
    state, batch = _state(model, setup, 0.15, 0.5), _batch(setup)
    start = time.perf_counter()
    jax.jit(train_step(model, "sample")).lower(state, batch, programs.step_key(0, 1)).compile()
    return time.perf_counter() - start


def _setup_from_json(text: str) -> Setup:
    fields = json.loads(text)
    model = tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in fields["model"])
    return Setup(**{**fields, "widths": tuple(fields["widths"]), "model": model})


def _child(kind: str, setup: Setup, env: dict, *extra: str) -> dict:
    """Runs this script as a fresh process measuring `kind` ("compile" or "flags")."""
    out = subprocess.run([sys.executable, __file__, "--child", kind, "--setup-json",
                          json.dumps(dataclasses.asdict(setup)), *extra], env=env,
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def multihost_child(setup: Setup) -> dict:
    """Images/s of the paper-mixed masked train step over every device of this job, one process
    or several (joined through the launcher's environment); reported by process 0."""
    import jax
    import numpy as np
    from fractal_jax.training import multihost, parallel, programs
    from fractal_jax.training.state import create_train_state
    if multihost.requested(False):
        multihost.initialize()
    mesh = parallel.create_mesh()
    model = _model(setup)
    shape = (1, setup.image_size, setup.image_size, 3)
    state = jax.jit(functools.partial(create_train_state, model, _optimizer(), input_shape=shape),
                    out_shardings=parallel.replicated(mesh))(jax.random.key(0), p_local=0.15,
                                                             p_global=0.5)
    rng = np.random.default_rng(0)
    n, i, size = jax.process_count(), jax.process_index(), setup.batch_size
    whole = {"image": rng.normal(size=(size, *shape[1:])).astype(np.float32),
             "label": rng.integers(0, setup.num_classes, size),
             "mask": np.ones(size, bool)}
    batch = parallel.to_global({k: v[i * size // n:(i + 1) * size // n]
                                for k, v in whole.items()}, mesh)
    step = parallel.jit_train_step(train_step(model, "sample"), mesh)
    count = setup.steps_per_window * setup.windows
    keys = [programs.step_key(0, s) for s in range(1, count + 3)]
    for key in keys[:2]:  # compile and warm up
        state, _ = step(state, batch, key)
    _block(state)
    start = time.perf_counter()
    for key in keys[2:]:
        state, _ = step(state, batch, key)
    _block(state)
    return {"images_per_s": count * size / (time.perf_counter() - start),
            "processes": n, "devices": jax.device_count()}


def bench_multihost(setup: Setup, rounds: int = 3) -> dict:
    """The same training on 2 CPU devices as 1 process × 2 devices and as 2 processes × 1 device
    (collectives between the processes over gloo on 127.0.0.1), in alternating fresh runs; the
    ratio is the median of per-round ratios (2 processes ÷ 1)."""
    from fractal_jax import launch
    command = [sys.executable, __file__, "--child", "multihost", "--setup-json",
               json.dumps(dataclasses.asdict(setup))]
    rates: dict[str, list[float]] = {"1 process × 2 devices": [], "2 processes × 1 device": []}
    for _ in range(rounds):
        one = dict(os.environ, XLA_FLAGS=with_cpu_flags(
            "--xla_force_host_platform_device_count=2"))
        out = subprocess.run(command, env=one, capture_output=True, text=True, check=True)
        rates["1 process × 2 devices"].append(json.loads(out.stdout.splitlines()[-1])[
            "images_per_s"])
        port = launch.free_port()
        children = [subprocess.Popen(command, env=launch.process_environment(
            p, 2, port, devices_per_process=1, base={**os.environ, "XLA_FLAGS": with_cpu_flags(
                "")}), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for p in range(2)]
        outputs = [c.communicate(timeout=900) for c in children]
        if any(c.returncode for c in children):
            raise RuntimeError(f"2-process benchmark failed:\n{outputs[0][1][-3000:]}")
        rates["2 processes × 1 device"].append(json.loads(
            outputs[0][0].splitlines()[-1])["images_per_s"])
    per_round = [b / a for a, b in zip(*rates.values())]
    return {"rates": rates, "ratio": statistics.median(per_round),
            "ratio_spread": (min(per_round), max(per_round)), "rounds": rounds,
            "setup": dataclasses.asdict(setup)}


def multihost_markdown(result: dict, env: dict) -> str:
    setup = result["setup"]
    lines = [MULTIHOST_SECTION.strip(), "",
             f"`python experiments/benchmark.py --quick --multihost` ({env['date']}, "
             f"{env['cpu_count']} cores, {env['processor']}, jax {env['jax']}): the "
             f"paper-mixed masked train step of FractalNet-20 widths {tuple(setup['widths'])}, "
             f"batch {setup['batch_size']}, over 2 CPU devices, {result['rounds']} alternating "
             "rounds of fresh runs, each timing "
             f"{setup['steps_per_window'] * setup['windows']} steps after 2 warm-up steps.", "",
             "| layout | images/s per round | median |", "|---|---|---:|"]
    for name, values in result["rates"].items():
        lines.append(f"| {name} | {', '.join(f'{v:,.0f}' for v in values)} | "
                     f"{statistics.median(values):,.0f} |")
    low, high = result["ratio_spread"]
    lines += ["", f"2 processes ÷ 1 process: **{result['ratio']:.2f}** (rounds {low:.2f}..{high:.2f})"
              ": the gradient all-reduce between processes (gloo over loopback TCP) against the "
              "same all-reduce inside one process, and, where the machine has few cores, two "
              "XLA:CPU thread pools competing for them. It says nothing about a cluster's "
              "interconnect (NCCL over NVLink or InfiniBand, TPU ICI): measure there with the "
              "same command on the real hosts.", ""]
    return "\n".join(lines)


def _replace_section(text: str, heading: str, section: str) -> str:
    """`text` with its section under `heading` (up to the next "## " heading) replaced by
    `section`, or `section` appended."""
    if heading not in text:
        return text.rstrip("\n") + "\n\n" + section
    start = text.index(heading)
    end = text.find("\n## ", start + len(heading))
    return text[:start] + section + ("" if end < 0 else text[end:])


def bench_compile_cache(setup: Setup) -> dict:
    """Compile time of the paper-mixed masked step in a fresh process: with an empty persistent
    cache, then again from what the first process left in it (as a resumed run sees it)."""
    import tempfile
    times = []
    with tempfile.TemporaryDirectory() as cache:
        for _ in range(2):
            env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=cache)
            times.append(_child("compile", setup, env)["compile_s"])
    return {"name": "compile: train step, cold vs persistent cache", "cold_s": times[0],
            "cached_s": times[1]}


def kernel_shapes(setup: Setup) -> list[tuple[int, int, int]]:
    """(map side, input channels, output channels) of every distinct 3×3 convolution of the
    benchmark's FractalNet: each block's first units read the block input, the rest its width."""
    shapes, cin = [], 3
    for b, width in enumerate(setup.widths):
        side = setup.image_size // 2 ** b
        shapes += [(side, cin, width)] + ([(side, width, width)] if cin != width else [])
        cin = width
    return shapes


def bench_kernels(setup: Setup) -> list[dict]:
    """Forward + backward time of each convolution shape (XLA's convolution vs patches +
    matmul) and each 2×2 max-pool shape (reduce-window vs windows), interleaved per shape."""
    import jax
    import jax.numpy as jnp
    from fractal_jax.models import conv, pool
    rows = []

    def timed(name: str, fns: dict, *args, flops: float | None = None) -> None:
        grads = {k: jax.jit(jax.grad(lambda *a, f=f: jnp.sum(f(*a) ** 2),
                                     argnums=tuple(range(len(args))))) for k, f in fns.items()}
        variants = []
        for k, g in grads.items():
            _block(g(*args))

            def window(g=g) -> None:
                _block([g(*args) for _ in range(10)])

            variants.append(Variant(k, window, 10 * setup.batch_size, {}))
        ms = {r["name"]: [10 * 1e3 * setup.batch_size / x / 10 for x in r["rates"]]
              for r in measure(variants, setup)}
        a, b = ms.values()
        rows.append({"name": name, **{k: statistics.median(v) for k, v in ms.items()},
                     "speedup": statistics.median(x / y for x, y in zip(a, b)),
                     "gflops_per_s": None if flops is None else flops / statistics.median(a) / 1e6})

    key = jax.random.key(0)
    for side, cin, cout in kernel_shapes(setup):
        x = jax.random.normal(key, (setup.batch_size, side, side, cin))
        kernel = jax.random.normal(key, (3, 3, cin, cout))
        pad = ((1, 1), (1, 1))
        timed(f"conv {side}×{side}, {cin}→{cout}", {
            "xla ms": lambda x, k: conv.conv2d(x, k, impl="xla"),
            "patches ms": lambda x, k: conv.patches_conv(x, k, (1, 1), pad)}, x, kernel,
            flops=3 * 2.0 * setup.batch_size * side * side * 9 * cin * cout)
    for b, width in enumerate(setup.widths):
        side = setup.image_size // 2 ** b
        x = jax.random.normal(key, (setup.batch_size, side, side, width))
        timed(f"max-pool {side}×{side}×{width}", {
            "reduce_window ms": lambda x: pool.max_pool_2x2(x, "reduce_window"),
            "windows ms": lambda x: pool.max_pool_2x2(x, "windows")}, x)
    return rows


def local_skip_estimate(setup: Setup, num_plans: int = 4000) -> dict:
    """Share of a local step's convolution FLOPs that local plans (p_local = 0.15) leave dead,
    and that K extra programs could skip (`models/local_skip.py`), for K = 1, 2, 4, 8."""
    import jax
    from fractal_jax.models import local_skip
    schedule = _model(setup).network_schedule
    dead = local_skip.dead_units(jax.random.key(0), schedule, 0.15, num_plans)
    cost = local_skip.unit_flops(schedule, setup.widths, setup.image_size)
    return {"dead": local_skip.dead_fraction(dead, cost),
            "programs": {k: local_skip.saved_fraction(
                dead, cost, local_skip.choose_programs(dead, cost, k, schedule))
                for k in (1, 2, 4, 8)}}


def probe(setup: Setup) -> dict:
    """The rows a flag set is judged by (run in a child process per flag set)."""
    train, evaluation = measure([
        train_variant(setup, "mix", p_local=0.15, p_global=0.5, skip=False),
        eval_variant(setup, "eval")], setup)
    return {"train": train, "eval": evaluation}


def _write_npz_data(folder: str, setup: Setup) -> None:
    """Random uint8 images of the benchmark's shape as an npz dataset (train and test splits)."""
    import numpy as np
    rng = np.random.default_rng(0)
    for split, n in (("train", 16 * setup.batch_size), ("test", 2 * setup.batch_size)):
        np.savez(os.path.join(folder, f"{split}.npz"),
                 images=rng.integers(0, 256, (n, setup.image_size, setup.image_size, 3),
                                     dtype=np.uint8),
                 labels=rng.integers(0, setup.num_classes, n))


def loop_config(setup: Setup, data: str, num_train_steps: int):
    """The CIFAR-10 experiment's loop settings on the benchmark's model and batch shape."""
    from experiments.configs import cifar10
    c = cifar10.get_config()
    c.dataset, c.data.path = "npz", data
    c.model.name, c.model.widths = "fractalnet20", tuple(setup.widths)
    c.seed = window_seed(setup)
    c.batch_size, c.eval_batch_size = setup.batch_size, 2 * setup.batch_size
    c.num_train_steps = num_train_steps
    c.log_every_steps = setup.steps_per_window
    c.eval_every_steps = c.checkpoint_every_steps = num_train_steps
    c.keep_checkpoints, c.progress_bar = 1, False
    return c


def loop_variants(setup: Setup, folder: str) -> list[Variant]:
    """The real training loop (`loop.train` on a fresh workdir, CIFAR-10's settings on random
    npz data, warm compilation cache) against the isolated skipping step over the same steps.

    The loop runs 2W steps (W = steps_per_window); its window is the time between fetching the
    batches of steps W + 1 and 2W (so W - 1 steps in the steady state: data, host dispatch,
    step keys, metrics), which leaves out start-up, the final evaluation and the checkpoint.
    """
    import contextlib
    import io
    from unittest import mock
    from fractal_jax.training import experiment, loop
    w = setup.steps_per_window
    data = os.path.join(folder, "data")
    os.makedirs(data)
    _write_npz_data(data, setup)
    config = loop_config(setup, data, 2 * w)
    original = experiment.train_batches
    runs = iter(range(10**6))

    def real_loop() -> float:
        marks = []

        def timed_batches(config, start_step, seed=None):
            for step, batch in enumerate(original(config, start_step, seed), start_step + 1):
                if step in (w + 1, 2 * w):
                    marks.append(time.perf_counter())
                yield batch

        workdir = os.path.join(folder, f"run{next(runs)}")
        with mock.patch.object(experiment, "train_batches", timed_batches), \
                contextlib.redirect_stdout(io.StringIO()):
            loop.train(config, workdir)
        return marks[1] - marks[0]

    isolated = train_variant(setup, f"train, paper mix, steps {w + 1}..{2 * w}, isolated step",
                             p_local=0.15, p_global=0.5, skip=True, first_step=w + 1,
                             count_flops=False)
    return [Variant("real training loop (same steps)", real_loop, (w - 1) * setup.batch_size,
                    {"compile_s": None, "temp_mb": None}), isolated]


def bench_loop(setup: Setup) -> list[dict]:
    """`loop_variants` measured in a fresh process with its own persistent compilation cache
    (filled by the warm-up window), as a rerun sees it."""
    import tempfile
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=cache)
        return _child("loop", setup, env)["rows"]


def bench_flags(setup: Setup) -> list[dict]:
    rows = []
    for name, flags in FLAG_SETS.items():
        env = dict(os.environ, XLA_FLAGS=flags or "")
        result = _child("flags", setup, env, *(["--xla-defaults"] if flags is None else []))
        shown = "(none)" if flags is None else with_cpu_flags(flags)
        rows.append({"name": name, "flags": shown,
                     "train_images_per_s": result["train"]["images_per_s"],
                     "train_temp_mb": result["train"]["temp_mb"],
                     "eval_images_per_s": result["eval"]["images_per_s"]})
    return rows


# Op categories of the profile, by the JAX name path XLA keeps in each op's metadata.
PROFILE_CATEGORIES = (
    ("max-pool", ("reduce_window", "reduce-window", "select_and_scatter", "_pool")),
    ("convolution", ("conv_general_dilated", "convolution", "/Conv_0/")),
    ("batchnorm", ("BatchNorm",)),
    ("dropout", ("Dropout",)),
    ("head and loss", ("/head/", "log_softmax", "softmax_cross_entropy")),
)


def _hlo_ops(hlo: str) -> dict[str, tuple[str, list[str]]]:
    """Top-level ops of the entry computation: name -> (JAX name path or opcode, users)."""
    import re
    entry = hlo[hlo.index("\nENTRY"):]
    ops: dict[str, tuple[str, list[str]]] = {}
    for line in entry.splitlines()[1:]:
        m = re.match(r"\s+(?:ROOT )?%?([\w.\-]+) = .*?\s([\w\-]+)\((.*)", line)
        if m:
            name, opcode, rest = m.groups()
            path = re.search(r'op_name="([^"]*)"', line)
            ops[name] = (path.group(1) if path else opcode, [])
            for operand in re.findall(r"%([\w.\-]+)", rest.split("metadata=")[0]):
                if operand in ops:
                    ops[operand][1].append(name)
    return ops


def _category(name: str, ops: dict, depth: int = 0) -> str:
    import re
    path, users = ops[name]
    for category, marks in PROFILE_CATEGORIES:
        if any(m in path or m in name for m in marks):
            return category
    if re.search(r"block_\d+/unit_c\d+_p\d+/", path):
        return "relu and unit glue"
    if re.search(r"block_\d+/", path):
        return "joins"
    if "/" not in path and depth < 4:  # XLA-made op (iota, broadcast, copy): its consumer's
        for user in users:
            category = _category(user, ops, depth + 1)
            if category != "other":
                return category
    return "other"


def profile_program(compiled, run: Callable[[], None], steps: int) -> dict[str, float]:
    """Milliseconds per step of each op category of `compiled` while `run()` runs `steps` steps,
    from a `jax.profiler` trace (XLA:CPU's per-op events). Ops on the two threads overlap, so
    the sum exceeds the wall time; the shares are what the table compares."""
    import glob
    import gzip
    import tempfile
    import jax
    ops = _hlo_ops(compiled.as_text())
    totals: collections.Counter = collections.Counter()
    with tempfile.TemporaryDirectory() as folder:
        with jax.profiler.trace(folder, create_perfetto_trace=True):
            run()
        trace, = glob.glob(os.path.join(folder, "**", "perfetto_trace.json.gz"), recursive=True)
        with gzip.open(trace) as f:
            events = json.load(f)["traceEvents"]
    for e in events:
        if e.get("ph") == "X" and e["name"] in ops:
            totals[_category(e["name"], ops)] += e["dur"] / 1e3 / steps
    return dict(totals.most_common())


def bench_profile(setup: Setup) -> list[dict]:
    """Op-category breakdown of the full network (current and new code), column 3 alone and a
    local step (new code)."""
    from fractal_jax.training import programs
    out = []
    for name, mode, overrides in (("full network, current code", "sample", CURRENT),
                                  ("full network", "sample", {}),
                                  ("column 3 alone (global step)", 3, {}),
                                  ("local step", "local", {})):
        model = _model(setup, **overrides)
        p_global = 0.0 if mode == "sample" else 0.5
        state, batch = _state(model, setup, 0.0 if mode == "sample" else 0.15, p_global), \
            _batch(setup)
        compiled = PROGRAMS.get((model, mode), train_step(model, mode), state, batch,
                                programs.step_key(0, 1))
        holder = {"state": compiled(state, batch, programs.step_key(0, 1))[0]}

        def run(compiled=compiled, holder=holder):
            s = holder["state"]
            for step in range(2, 2 + setup.steps_per_window // 2):
                s, _ = compiled(s, batch, programs.step_key(0, step))
            holder["state"] = _block(s)

        run()
        out.append({"name": name,
                    "ms_per_step": profile_program(compiled, run, setup.steps_per_window // 2)})
        print(f"profile {name}: {out[-1]['ms_per_step']}", file=sys.stderr, flush=True)
    return out


def environment() -> dict:
    import flax
    import jax
    import jaxlib
    device = jax.devices()[0]
    return {"platform": device.platform, "device": device.device_kind,
            "devices": jax.device_count(), "cpu_count": os.cpu_count(),
            "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(), "jax": jax.__version__,
            "jaxlib": jaxlib.__version__, "flax": flax.__version__,
            "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "date": time.strftime("%Y-%m-%d")}


def _fmt(value, digits=1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


MATMUL = "matmul 1024×1024×1024 (float32)"
GPU_SECTION = "## GPU\n"
MULTIHOST_SECTION = "## Multi-process\n"
# Sections other commands write (gpu_check.py, --multihost), which a full run keeps.
KEPT_SECTIONS = (MULTIHOST_SECTION, GPU_SECTION)
LOOP, ISOLATED = "real training loop (same steps)", "train, paper mix, steps {}..{}, isolated step"


def _matmul_share(row: dict, by_name: dict) -> float | None:
    """Median over rounds of the row's FLOP/s ÷ the same round's large-matmul FLOP/s."""
    if "gflops_per_s" not in row or MATMUL not in by_name or row["name"] == MATMUL:
        return None
    return statistics.median(a / b for a, b in zip(row["gflops_per_s"],
                                                   by_name[MATMUL]["gflops_per_s"]))


def markdown(mode: str, setup: Setup, env: dict, rows: list[dict], summary: dict,
             spread: dict, cache: dict, flags: list[dict], profile: list[dict],
             local: dict, kernels: list[dict]) -> str:
    by_name = {r["name"]: r for r in rows}
    lines = [f"# Benchmarks ({mode})", "",
             f"FractalNet-20 shape (B=5, C=3), widths {setup.widths}, batch "
             f"{setup.batch_size}, {setup.image_size}×{setup.image_size}×3 inputs; "
             f"{setup.windows} rounds, each timing one window of {setup.steps_per_window} steps "
             "of every variant in turn (A B C ... A B C ...), so that a change of machine load "
             f"falls on all of them: steps 1..{setup.steps_per_window} of run seed "
             f"{window_seed(setup)}, whose plans have a long run's mix (half global, spread "
             "evenly over the columns), the same for every variant. \"current code\" is the code "
             "path before per-shape convolutions, window max-pools, the fused BatchNorm and "
             "hashed dropout (" + ", ".join(f"`{k}=\"{v}\"`" for k, v in CURRENT.items())
             + "); every other row runs the defaults.", "",
             "Machine: " + ", ".join(f"{k} {v}" for k, v in env.items()), "",
             "| variant | images/s (median) | spread (min..max) | % of matmul FLOP/s "
             "| compile s | temp MB |", "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        share = _matmul_share(r, by_name)
        rate = (f"{statistics.median(r['gflops_per_s']):,.1f} GFLOP/s" if r["name"] == MATMUL
                else _fmt(r["images_per_s"]))
        lines.append(f"| {r['name']} | {rate} | {_fmt(r['min'])}..{_fmt(r['max'])} | "
                     f"{_fmt(None if share is None else 100 * share, 0)} | "
                     f"{_fmt(r.get('compile_s'))} | {_fmt(r.get('temp_mb'))} |")
    lines += ["", "Ratios: the median of per-round ratios, with their spread (min..max) over "
              "rounds.", "", "| ratio | value | spread |", "|---|---:|---:|"]
    lines += [f"| {k} | {v:.2f} | {spread[k][0]:.2f}..{spread[k][1]:.2f} |"
              for k, v in summary.items()]
    lines += ["", f"Compile, paper-mixed masked train step: {cache['cold_s']:.1f} s cold, "
              f"{cache['cached_s']:.1f} s from the persistent compilation cache."]
    lines += ["", "Local-step skipping (`models/local_skip.py`, 4,000 sampled local plans at "
              f"p_local = 0.15): dead units hold {100 * local['dead']:.1f}% of a local step's "
              "convolution FLOPs; the share that K extra programs (greedy per-block skip sets) "
              "would skip:", "", "| K programs | " + " | ".join(map(str, local["programs"]))
              + " |", "|---|" + "---:|" * len(local["programs"]),
              "| FLOPs skipped | " + " | ".join(f"{100 * v:.1f}%" for v in
                                                local["programs"].values()) + " |"]
    if profile:
        categories = list(dict.fromkeys(c for p in profile for c in p["ms_per_step"]))
        lines += ["", "Profile (`--profile`): op time per train step by category, from a "
                  "`jax.profiler` trace of XLA:CPU's ops (ms per step, share of all op time; "
                  "ops on the two threads overlap, so the sums exceed the step's wall time):", "",
                  "| category | " + " | ".join(p["name"] for p in profile) + " |",
                  "|---|" + "---:|" * len(profile)]
        for c in categories:
            cells = []
            for p in profile:
                ms, total = p["ms_per_step"].get(c, 0.0), sum(p["ms_per_step"].values())
                cells.append(f"{ms:.1f} ({100 * ms / total:.0f}%)")
            lines.append(f"| {c} | " + " | ".join(cells) + " |")
        lines.append("| all ops | " + " | ".join(
            f"{sum(p['ms_per_step'].values()):.1f}" for p in profile) + " |")
    if kernels:
        lines += ["", "Kernels (`--kernels`): forward + backward of each convolution and max-pool "
                  f"shape, batch {setup.batch_size}, ms per call (medians of interleaved rounds; "
                  "speedup: median of per-round ratios; GFLOP/s of XLA's convolution):", "",
                  "| shape | XLA / reduce-window ms | patches / windows ms | speedup | "
                  "XLA GFLOP/s |", "|---|---:|---:|---:|---:|"]
        for k in kernels:
            first, second = [v for n, v in k.items() if n.endswith(" ms")]
            lines.append(f"| {k['name']} | {first:.2f} | {second:.2f} | {k['speedup']:.2f} | "
                         f"{_fmt(k['gflops_per_s'], 0)} |")
    if flags:
        lines += ["", "XLA flag sets (each in a fresh process; paper-mixed plan, masked step):",
                  "", "| flags | train images/s | train temp MB | eval images/s |",
                  "|---|---:|---:|---:|"]
        lines += [f"| {f['name']}: `{f['flags']}` | {_fmt(f['train_images_per_s'])} | "
                  f"{_fmt(f['train_temp_mb'])} | {_fmt(f['eval_images_per_s'])} |"
                  for f in flags]
    return "\n".join(lines) + "\n"


def _ratio_rounds(rows: list[dict], setup: Setup) -> dict[str, list[float]]:
    """Each ratio's value in every round (> 1: the first is faster); ratios whose rows were
    not measured are left out."""
    by_name = {r["name"]: r for r in rows}
    k, w = setup.sweep_models, setup.steps_per_window
    mix = "train, paper mix, skip on"

    def per_round(fn) -> list[float]:
        rounds = len(next(iter(by_name.values()))["rates"])
        return [fn(lambda name: by_name[name]["rates"][i]) for i in range(rounds)]

    formulas = {
        "skip_speedup": lambda r: r(mix) / r("train, paper mix, skip off"),
        # The long-run mix: half local steps, half global ones (a window has its own mix).
        "skip_speedup_even_mix": lambda r: 1 / (r("train, paper mix, skip off") * (
            0.5 / r("train, local-only plans") + 0.5 / r("train, global-only, skip on"))),
        "global_skip_speedup": lambda r: r("train, global-only, skip on")
        / r("train, global-only, skip off"),
        "paper_mix_speedup": lambda r: r(mix) / r(f"{mix}, current code"),
        "full_speedup": lambda r: r("train, full network (no drop-path)")
        / r("train, full network (no drop-path), current code"),
        "eval_speedup": lambda r: r("eval, full network") / r("eval, full network, current code"),
        "vmap_speedup": lambda r: r(f"sweep: {k} models vmapped in one step")
        / r(f"sweep: {k} models sequentially (masked step)"),
        "vmap_patches_speedup": lambda r: r(f"sweep: {k} models vmapped in one step, conv patches")
        / r(f"sweep: {k} models sequentially (masked step)"),
        "vmap_vs_sequential_skip_on": lambda r: r(f"sweep: {k} models vmapped in one step")
        / r(mix),
        "loop_fraction": lambda r: r(LOOP) / r(ISOLATED.format(w + 1, 2 * w)),
    }
    out = {}
    for key, fn in formulas.items():
        try:
            out[key] = per_round(fn)
        except KeyError:
            continue
    if mix in by_name and MATMUL in by_name:
        out["matmul_fraction"] = [a / b for a, b in zip(by_name[mix]["gflops_per_s"],
                                                        by_name[MATMUL]["gflops_per_s"])]
    return out


def ratios(rows: list[dict], setup: Setup) -> tuple[dict[str, float], dict[str, tuple]]:
    """The side-by-side ratios of the rows (median of per-round ratios) and their spreads."""
    rounds = _ratio_rounds(rows, setup)
    return ({k: statistics.median(v) for k, v in rounds.items()},
            {k: (min(v), max(v)) for k, v in rounds.items()})


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small widths (16..128)")
    parser.add_argument("--out", default=".", help="folder for BENCHMARKS.md and benchmarks.json")
    parser.add_argument("--flags", action="store_true",
                        help="also compare XLA flag sets, one process each")
    parser.add_argument("--profile", action="store_true",
                        help="also break a train step's op time down by category")
    parser.add_argument("--kernels", action="store_true",
                        help="also time each convolution and max-pool shape, both ways")
    parser.add_argument("--multihost", action="store_true",
                        help="only compare 2 processes × 1 device with 1 process × 2 devices "
                        "and rewrite BENCHMARKS.md's Multi-process section")
    parser.add_argument("--widths", type=lambda s: tuple(int(w) for w in s.split(",")),
                        help="override the widths (5 comma-separated ints)")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--windows", type=int)
    parser.add_argument("--steps-per-window", type=int)
    # A child process measuring one thing for the parent (flags are read at process start).
    parser.add_argument("--child", choices=("compile", "flags", "loop", "multihost"),
                        help=argparse.SUPPRESS)
    parser.add_argument("--setup-json", help=argparse.SUPPRESS)
    parser.add_argument("--xla-defaults", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    configure_jax(default_flags=not args.xla_defaults)
    if args.child == "compile":
        print(json.dumps({"compile_s": compile_seconds(_setup_from_json(args.setup_json))}))
        return {}
    if args.child == "multihost":  # compile time is not measured: the cache may serve
        result = multihost_child(_setup_from_json(args.setup_json))
        print(json.dumps(result))
        return result
    if args.child == "loop":  # the loop needs the persistent cache, in a folder of its own
        import tempfile
        setup = _setup_from_json(args.setup_json)
        with tempfile.TemporaryDirectory() as folder:
            print(json.dumps({"rows": measure(loop_variants(setup, folder), setup)}))
        return {}
    import jax
    # Compile times are part of the measurement: no persistent cache except where it is measured.
    jax.config.update("jax_enable_compilation_cache", False)
    if args.child == "flags":
        print(json.dumps(probe(_setup_from_json(args.setup_json))))
        return {}
    mode = "quick" if args.quick else "full"
    setup = dataclasses.replace(SETUPS[mode], **{
        k: v for k, v in dict(widths=args.widths, batch_size=args.batch_size,
                              windows=args.windows,
                              steps_per_window=args.steps_per_window).items() if v is not None})
    for label, value in (("--batch-size", setup.batch_size), ("--windows", setup.windows),
                         ("--steps-per-window", setup.steps_per_window)):
        if value < 1:
            parser.error(f"{label} must be >= 1, got {value}.")
    if len(setup.widths) != 5:
        parser.error(f"--widths needs 5 widths (one per block), got {setup.widths}.")

    path = os.path.join(args.out, "BENCHMARKS.md")
    old = open(path).read() if os.path.exists(path) else ""
    if args.multihost:
        result = bench_multihost(setup)
        os.makedirs(args.out, exist_ok=True)
        with open(path, "w") as f:
            f.write(_replace_section(old, MULTIHOST_SECTION,
                                     multihost_markdown(result, environment())))
        print(json.dumps({"multihost_ratio": round(result["ratio"], 3), **result["rates"]}))
        return result
    # The parts in child processes and the profile first: they fail early if they fail.
    loop_rows = bench_loop(setup)
    profile = bench_profile(setup) if args.profile else []
    kernels = bench_kernels(setup) if args.kernels else []
    mix = dict(p_local=0.15, p_global=0.5)
    full = dict(p_local=0.0, p_global=0.0, skip=False)
    variants = [
        train_variant(setup, "train, full network (no drop-path), current code", **full,
                      **CURRENT),
        train_variant(setup, "train, full network (no drop-path)", **full),
        train_variant(setup, "train, local-only plans", p_local=0.15, p_global=0.0, skip=True),
        train_variant(setup, "train, global-only, skip off", p_local=0.0, p_global=1.0,
                      skip=False),
        train_variant(setup, "train, global-only, skip on", p_local=0.0, p_global=1.0,
                      skip=True),
        train_variant(setup, "train, paper mix, skip off", **mix, skip=False),
        train_variant(setup, "train, paper mix, skip on, current code", **mix, skip=True,
                      **CURRENT),
        train_variant(setup, "train, paper mix, skip on", **mix, skip=True),
        eval_variant(setup, "eval, full network, current code", **CURRENT),
        eval_variant(setup, "eval, full network"),
        *sweep_variants(setup),
        matmul_variant(setup),
    ]
    rows = measure(variants, setup) + loop_rows
    summary, spread = ratios(rows, setup)
    cache = bench_compile_cache(setup)
    flags = bench_flags(setup) if args.flags else []
    local = local_skip_estimate(setup)
    env = environment()
    os.makedirs(args.out, exist_ok=True)
    text = markdown(mode, setup, env, rows, summary, spread, cache, flags, profile, local,
                    kernels)
    for heading in KEPT_SECTIONS:  # written by other commands: keep them
        if heading in old:
            start = old.index(heading)
            end = old.find("\n## ", start + len(heading))
            text = _replace_section(text, heading, old[start:] if end < 0 else old[start:end])
    with open(path, "w") as f:
        f.write(text)
    result = {"mode": mode, "setup": dataclasses.asdict(setup), "environment": env,
              "rows": rows, "compile_cache": cache, "flags": flags, "profile": profile,
              "local_skip": local, "kernels": kernels,
              "spread": spread, **summary}
    with open(os.path.join(args.out, "benchmarks.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(text)
    print(json.dumps({k: round(v, 3) for k, v in summary.items()}))
    return result


if __name__ == "__main__":
    main()
