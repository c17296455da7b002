"""Speed and memory of FractalNet training on this machine, measured side by side in one run.

    python experiments/benchmark.py            # the CIFAR FractalNet-20 shape (widths 64..512)
    python experiments/benchmark.py --quick    # widths 16..128: a few minutes on a 2-core CPU

Measures train images/s with the full, local-only, global-only and paper-mixed drop-path plans,
with skipping dead work on and off (`training/programs.py`), the one-program `lax.switch`
alternative, bfloat16 compute and rematerialisation; eval images/s; compile time; memory; a
K-model vmapped sweep step against K sequential steps; and (with `--flags`) XLA flag sets, each
in its own process. Every configuration repeats the same window of steps (so skip on and off
see the same plans) and reports the median images/s and the spread (min..max) over windows.

Writes OUT/BENCHMARKS.md and OUT/benchmarks.json (hardware, versions, flags, every row). The
last line printed is one JSON object with ``skip_speedup`` (paper-mixed plan, skipping on ÷
off) and ``vmap_speedup`` (K models vmapped ÷ K sequential steps, per model).
Absolute numbers depend on the machine and its load; the ratios are what to compare.
"""
import os
import sys

# Run as a script: make the repository importable without installing it.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import argparse  # noqa: E402
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
                        **dict(overrides))


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
    from fractal_jax.training.state import create_train_state
    shape = (1, setup.image_size, setup.image_size, 3)
    return jax.jit(functools.partial(create_train_state, model, _optimizer(), input_shape=shape,
                                     p_local=p_local, p_global=p_global))(jax.random.key(seed))


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

    def get(self, key, fn: Callable, *example_args, donate: bool = True):
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
        keys = list(keys)
        temps = [self.temp_mb[k] for k in keys if self.temp_mb[k] is not None]
        return {"compile_s": sum(self.compile_s[k] for k in keys),
                "temp_mb": max(temps) if temps else None}


PROGRAMS = Programs()


def _time_windows(run_window: Callable[[], None], setup: Setup) -> list[float]:
    """Seconds of each timed window, after one untimed warm-up window."""
    run_window()
    times = []
    for _ in range(setup.windows):
        start = time.perf_counter()
        run_window()
        times.append(time.perf_counter() - start)
    return times


def _row(name: str, images_per_window: int, times: list[float], **extra) -> dict:
    rates = sorted(images_per_window / t for t in times)
    row = {"name": name, "images_per_s": statistics.median(rates), "min": rates[0],
           "max": rates[-1], **extra}
    print(f"{name}: {row['images_per_s']:,.1f} images/s", file=sys.stderr, flush=True)
    return row


@functools.lru_cache(maxsize=None)
def window_seed(setup: Setup, p_global: float = 0.5) -> int:
    """The first run seed whose window of steps has the plan mix of a long run: a fraction
    `p_global` of global steps, spread evenly over the columns (each column within one step of
    its share). Short windows of an arbitrary seed can be far off (seed 0: 6 of 16 global)."""
    import numpy as np
    from fractal_jax.training import programs
    schedule = _model(setup).network_schedule
    steps = np.arange(1, setup.steps_per_window + 1)
    share = len(steps) * p_global
    for seed in range(10_000):
        kinds = programs.plan_kinds(seed, steps, schedule, p_global)
        counts = [kinds.count(c) for c in range(1, schedule.max_columns + 1)]
        if sum(counts) == round(share) and all(
                abs(n - share / len(counts)) < 1 for n in counts):
            return seed
    raise ValueError(f"no seed gives an even plan mix over {len(steps)} steps")


def bench_train(setup: Setup, name: str, *, p_local: float, p_global: float, skip: bool,
                strategy: str = "host", **model_overrides) -> dict:
    """Images/s of `steps_per_window` train steps with the given plan rates and strategy."""
    import jax
    import numpy as np
    from fractal_jax.training import programs
    model = _model(setup, **model_overrides)
    state = _state(model, setup, p_local, p_global)
    batch = _batch(setup)
    seed = window_seed(setup)
    example = (state, batch, programs.step_key(seed, 1))
    kinds = programs.plan_kinds(seed, np.arange(setup.steps_per_window + 1),
                                model.network_schedule, p_global)
    used = []

    def step(kind):
        """The train step of a plan kind (a column, None: local) or of every plan ("sampled")."""
        if kind == "sampled":
            return functools.partial(programs.sampled_step, model=model)
        if kind is None:
            return functools.partial(programs.sampled_step, model=model, local=True)
        return functools.partial(programs.column_step, model=model, column=kind)

    def build(kind):
        used.append((model, kind))
        return PROGRAMS.get(used[-1], step(kind), *example)

    if strategy == "switch":  # one program: lax.switch over the per-kind steps
        branches = [step(k) for k in [None, *range(1, model.network_schedule.max_columns + 1)]]
        used.append((model, "switch"))
        switched = PROGRAMS.get(used[-1], lambda s, b, k, i: jax.lax.switch(i, branches, s, b, k),
                                *example, np.int32(0))

        def step_fn(s, b, n):
            return switched(s, b, programs.step_key(seed, n), np.int32(kinds[n] or 0))
    elif skip:
        def step_fn(s, b, n):
            return build(kinds[n])(s, b, programs.step_key(seed, n))
    else:
        sampled = build("sampled")

        def step_fn(s, b, n):
            return sampled(s, b, programs.step_key(seed, n))
    holder = {"state": state}

    def window():
        s = holder["state"]
        for step in range(1, setup.steps_per_window + 1):
            s, _ = step_fn(s, batch, step)
        holder["state"] = _block(s)

    times = _time_windows(window, setup)
    return _row(name, setup.batch_size * setup.steps_per_window, times,
                **PROGRAMS.cost(dict.fromkeys(used)))


def bench_eval(setup: Setup) -> dict:
    from fractal_jax.training import steps
    model = _model(setup)
    state = _state(model, setup, 0.0, 0.0)
    batch = _batch(setup)
    key = (model, "eval")
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    fn = PROGRAMS.get(key, functools.partial(steps.eval_step, model=model), variables, batch,
                      donate=False)

    def window():
        for _ in range(setup.steps_per_window):
            out = fn(variables, batch)
        _block(out)

    return _row("eval, full network", setup.batch_size * setup.steps_per_window,
                _time_windows(window, setup), **PROGRAMS.cost([key]))


def bench_sweep(setup: Setup) -> tuple[dict, dict]:
    """K models in one vmapped step (shared batch, own rates and keys) vs K sequential steps."""
    import jax
    import jax.numpy as jnp
    from fractal_jax.training import programs
    k = setup.sweep_models
    model = _model(setup)
    batch = _batch(setup)
    states = [_state(model, setup, 0.15, 0.5, seed=i) for i in range(k)]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *states)
    keys = [jnp.stack([programs.step_key(i, step) for i in range(k)])
            for step in range(1, setup.steps_per_window + 1)]
    single_key, vmap_key = (model, "sample"), (model, f"vmap{k}")
    single = PROGRAMS.get(single_key, functools.partial(programs.sampled_step, model=model),
                          states[0], batch, programs.step_key(0, 1))
    vmapped = PROGRAMS.get(vmap_key, jax.vmap(functools.partial(programs.sampled_step, model=model),
                                              in_axes=(0, None, 0)), stacked, batch, keys[0])
    holder = {"seq": states, "vmap": stacked}

    def sequential():
        out = []
        for i, s in enumerate(holder["seq"]):
            for step in range(1, setup.steps_per_window + 1):
                s, _ = single(s, batch, programs.step_key(i, step))
            out.append(s)
        holder["seq"] = _block(out)

    def together():
        s = holder["vmap"]
        for step_keys in keys:
            s, _ = vmapped(s, batch, step_keys)
        holder["vmap"] = _block(s)

    images = k * setup.batch_size * setup.steps_per_window
    seq = _row(f"sweep: {k} models sequentially (masked step)", images,
               _time_windows(sequential, setup), **PROGRAMS.cost([single_key]))
    vm = _row(f"sweep: {k} models vmapped in one step", images, _time_windows(together, setup),
              **PROGRAMS.cost([vmap_key]))
    return seq, vm


def compile_seconds(setup: Setup) -> float:
    """Seconds to lower and compile the paper-mixed masked train step in this process."""
    import jax
    from fractal_jax.training import programs
    model = _model(setup)
    state, batch = _state(model, setup, 0.15, 0.5), _batch(setup)
    start = time.perf_counter()
    jax.jit(functools.partial(programs.sampled_step, model=model)).lower(
        state, batch, programs.step_key(0, 1)).compile()
    return time.perf_counter() - start


def _setup_from_json(text: str) -> Setup:
    fields = json.loads(text)
    return Setup(**{**fields, "widths": tuple(fields["widths"])})


def _child(kind: str, setup: Setup, env: dict, *extra: str) -> dict:
    """Runs this script as a fresh process measuring `kind` ("compile" or "flags")."""
    out = subprocess.run([sys.executable, __file__, "--child", kind, "--setup-json",
                          json.dumps(dataclasses.asdict(setup)), *extra], env=env,
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


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


def probe(setup: Setup) -> dict:
    """The rows a flag set is judged by (run in a child process per flag set)."""
    return {"train": bench_train(setup, "mix", p_local=0.15, p_global=0.5, skip=False),
            "eval": bench_eval(setup)}


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


def markdown(mode: str, setup: Setup, env: dict, rows: list[dict], summary: dict,
             cache: dict, flags: list[dict]) -> str:
    lines = [f"# Benchmarks ({mode})", "",
             f"FractalNet-20 shape (B=5, C=3), widths {setup.widths}, batch "
             f"{setup.batch_size}, {setup.image_size}×{setup.image_size}×3 inputs; "
             f"{setup.windows} windows of {setup.steps_per_window} steps each: steps "
             f"1..{setup.steps_per_window} of run seed {window_seed(setup)}, whose plans have "
             "a long run's mix (half global, spread evenly over the columns), the same for "
             "every variant.", "",
             "Machine: " + ", ".join(f"{k} {v}" for k, v in env.items()), "",
             "| variant | images/s (median) | spread (min..max) | compile s | temp MB |",
             "|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['name']} | {_fmt(r['images_per_s'])} | {_fmt(r['min'])}.."
                     f"{_fmt(r['max'])} | {_fmt(r['compile_s'])} | {_fmt(r.get('temp_mb'))} |")
    lines += ["", "| ratio | value |", "|---|---:|"]
    lines += [f"| {k} | {v:.2f} |" for k, v in summary.items()]
    lines += ["", f"Compile, paper-mixed masked train step: {cache['cold_s']:.1f} s cold, "
              f"{cache['cached_s']:.1f} s from the persistent compilation cache."]
    if flags:
        lines += ["", "XLA flag sets (each in a fresh process; paper-mixed plan, masked step):",
                  "", "| flags | train images/s | train temp MB | eval images/s |",
                  "|---|---:|---:|---:|"]
        lines += [f"| {f['name']}: `{f['flags']}` | {_fmt(f['train_images_per_s'])} | "
                  f"{_fmt(f['train_temp_mb'])} | {_fmt(f['eval_images_per_s'])} |"
                  for f in flags]
    return "\n".join(lines) + "\n"


def ratios(rows: list[dict], sweep_models: int) -> dict[str, float]:
    """The side-by-side ratios of the rows that `main` measures (> 1: the first is faster)."""
    by_name = {r["name"]: r for r in rows}
    rate = lambda name: by_name[name]["images_per_s"]  # noqa: E731
    k = sweep_models
    return {
        "skip_speedup": rate("train, paper mix, skip on") / rate("train, paper mix, skip off"),
        # The long-run mix: half local steps, half global ones (a window has its own mix).
        "skip_speedup_even_mix": 1 / (rate("train, paper mix, skip off") * (
            0.5 / rate("train, local-only plans") + 0.5 / rate("train, global-only, skip on"))),
        "global_skip_speedup": rate("train, global-only, skip on")
        / rate("train, global-only, skip off"),
        "switch_vs_skip_off": rate("train, paper mix, lax.switch (one program)")
        / rate("train, paper mix, skip off"),
        "vmap_speedup": rate(f"sweep: {k} models vmapped in one step")
        / rate(f"sweep: {k} models sequentially (masked step)"),
        "vmap_vs_sequential_skip_on": rate(f"sweep: {k} models vmapped in one step")
        / rate("train, paper mix, skip on"),
        "bfloat16_speedup": rate("train, paper mix, skip on, bfloat16")
        / rate("train, paper mix, skip on"),
        "remat_speed": rate("train, paper mix, skip on, remat") / rate("train, paper mix, skip on"),
        "remat_temp_memory": by_name["train, paper mix, skip on, remat"]["temp_mb"]
        / by_name["train, paper mix, skip on"]["temp_mb"],
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small widths (16..128)")
    parser.add_argument("--out", default=".", help="folder for BENCHMARKS.md and benchmarks.json")
    parser.add_argument("--flags", action="store_true",
                        help="also compare XLA flag sets, one process each")
    parser.add_argument("--widths", type=lambda s: tuple(int(w) for w in s.split(",")),
                        help="override the widths (5 comma-separated ints)")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--windows", type=int)
    parser.add_argument("--steps-per-window", type=int)
    # A child process measuring one thing for the parent (flags are read at process start).
    parser.add_argument("--child", choices=("compile", "flags"), help=argparse.SUPPRESS)
    parser.add_argument("--setup-json", help=argparse.SUPPRESS)
    parser.add_argument("--xla-defaults", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    configure_jax(cpu_flags=not args.xla_defaults)
    if args.child == "compile":
        print(json.dumps({"compile_s": compile_seconds(_setup_from_json(args.setup_json))}))
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

    mix = dict(p_local=0.15, p_global=0.5)
    rows = [
        bench_train(setup, "train, full network (no drop-path)", p_local=0.0, p_global=0.0,
                    skip=False),
        bench_train(setup, "train, local-only plans", p_local=0.15, p_global=0.0, skip=True),
        bench_train(setup, "train, global-only, skip off", p_local=0.0, p_global=1.0,
                    skip=False),
        bench_train(setup, "train, global-only, skip on", p_local=0.0, p_global=1.0, skip=True),
        bench_train(setup, "train, paper mix, skip off", **mix, skip=False),
        bench_train(setup, "train, paper mix, skip on", **mix, skip=True),
        bench_train(setup, "train, paper mix, lax.switch (one program)", **mix, skip=True,
                    strategy="switch"),
        bench_train(setup, "train, paper mix, skip on, bfloat16", **mix, skip=True,
                    dtype="bfloat16"),
        bench_train(setup, "train, paper mix, skip on, remat", **mix, skip=True, remat=True),
        bench_eval(setup),
        *bench_sweep(setup),
    ]
    summary = ratios(rows, setup.sweep_models)
    cache = bench_compile_cache(setup)
    flags = bench_flags(setup) if args.flags else []
    env = environment()
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "BENCHMARKS.md"), "w") as f:
        f.write(markdown(mode, setup, env, rows, summary, cache, flags))
    result = {"mode": mode, "setup": dataclasses.asdict(setup), "environment": env,
              "rows": rows, "compile_cache": cache, "flags": flags, **summary}
    with open(os.path.join(args.out, "benchmarks.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(markdown(mode, setup, env, rows, summary, cache, flags))
    print(json.dumps({k: round(v, 3) for k, v in summary.items()}))
    return result


if __name__ == "__main__":
    main()
