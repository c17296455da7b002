"""Answers the accelerator questions in one run, section by section, each in priority order and
under a time cap, writing its results as each section finishes (a run cut short still leaves
everything measured before):

  (a) devices and versions;
  (b) FractalNet-20 (paper widths) train images/s at batch 100 and 256 in float32 and bfloat16,
      with the share of the chip's peak FLOP/s, and eval images/s;
  (c) vmapped sweeps of 4 and 8 seeds against the same models one after another;
  (d) host-dispatched column programs against one `lax.switch` program and the masked step;
  (e) BatchNorm, convolution, max-pool and dropout implementations side by side;
  (f) two reruns of a short digits run with and without XLA's determinism flag, bit for bit;
  (g) peak device memory.

    make install-gpu                                          # the CUDA build of the pinned jax
    .venv/bin/python experiments/gpu_check.py                 # writes gpu_check/gpu_check.{md,json}
    .venv/bin/python experiments/gpu_check.py --budget 480    # stop starting work after 8 minutes
    .venv/bin/python experiments/gpu_check.py --tiny          # tiny model, a few steps (CI, any CPU)

On a CPU backend it runs the tiny version unless --full is given. Speed rows reuse
experiments/benchmark.py's interleaved rounds (every ratio is a median of per-round ratios).
The determinism rows train the digits default (experiments/configs/digits.py) twice per flag
setting, each run in a child process (XLA reads its flags at process start), and compare
metrics.jsonl and the final train state bit for bit.
"""
import os
import sys

# Run as a script: make the repository importable without installing it.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse  # noqa: E402
import collections  # noqa: E402
import concurrent.futures  # noqa: E402
import dataclasses  # noqa: E402
import importlib.metadata  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from typing import Callable  # noqa: E402

from experiments import benchmark as bench  # noqa: E402
from fractal_jax.runtime import configure_jax  # noqa: E402

DETERMINISM_FLAG = "--xla_gpu_deterministic_ops=true"
# Set explicitly: `configure_jax` turns the flag on by default where a GPU plugin is installed.
NO_DETERMINISM_FLAG = "--xla_gpu_deterministic_ops=false"
MIX = dict(p_local=0.15, p_global=0.5)  # the paper's drop-path rates


@dataclasses.dataclass(frozen=True)
class Plan:
    """What one run measures: the model setup, the batch sizes of (b), the sweep sizes of (c),
    the matmul size of the measured peak, the digits runs' steps and the compile threads."""
    setup: bench.Setup
    batch_sizes: tuple[int, ...]
    sweep_sizes: tuple[int, ...]
    matmul_size: int
    digits_steps: int | None
    workers: int
    tiny: bool


FULL_SETUP = bench.Setup(widths=(64, 128, 256, 512, 512), batch_size=100, steps_per_window=20,
                         windows=5, sweep_models=4)
# Compile time, not run time, dominates on CPU: fewer blocks and columns keep CI's run short.
TINY_SETUP = bench.Setup(widths=(8,), batch_size=4, image_size=8, steps_per_window=2, windows=2,
                         sweep_models=2, model=(("num_blocks", 1), ("num_columns", 2),
                                                ("dropout", (0.1,))))
# Compiles overlap in threads on a GPU host's many cores; one at a time on a 2-core CI machine.
FULL = Plan(FULL_SETUP, batch_sizes=(100, 256), sweep_sizes=(4, 8), matmul_size=8192,
            digits_steps=120, workers=8, tiny=False)
TINY = Plan(TINY_SETUP, batch_sizes=(4,), sweep_sizes=(2,), matmul_size=256, digits_steps=4,
            workers=1, tiny=True)

# (name, title, share of the --budget): the order is the priority order.
SECTIONS = (
    ("devices", "(a) devices and versions", 0.02),
    ("speed", "(b) train and eval images/s, share of peak FLOP/s", 0.35),
    ("sweep", "(c) vmapped sweeps against sequential steps", 0.15),
    ("dispatch", "(d) host-dispatched programs, one lax.switch program, the masked step", 0.1),
    ("layers", "(e) layer implementations side by side (masked step)", 0.15),
    ("determinism", "(f) bit-identical reruns with and without the determinism flag", 0.22),
    ("memory", "(g) peak device memory", 0.01),
)

# Dense (no sparsity) data-sheet peaks in TFLOP/s: (float32 as XLA runs it, bfloat16). XLA's
# default precision runs float32 matmuls and convolutions on TF32 tensor cores where the chip
# has them, so TF32 is the float32 peak there. First substring match of the device kind wins.
PEAK_TFLOPS: tuple[tuple[str, float, float | None], ...] = (
    ("H200 NVL", 417.5, 835.0),
    ("H100 NVL", 417.5, 835.0),
    ("H100 PCIe", 378.0, 756.0),
    ("H200", 494.7, 989.4),
    ("H100", 494.7, 989.4),
    ("A100", 156.0, 312.0),
    ("L40S", 183.0, 362.0),
    ("L4", 60.0, 121.0),
    ("V100", 15.7, None),  # no TF32 or bfloat16 tensor cores: bfloat16 uses the measured matmul
    ("T4", 8.1, None),
)

# One lever at a time against the backend's defaults (`model.*_impl`, config.py).
LAYER_LEVERS = (("bn_impl", ("autodiff", "fused")), ("conv_impl", ("xla", "patches")),
                ("pool_impl", ("windows", "slices", "reduce_window")),
                ("dropout_impl", ("hash", "threefry")))
PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "chex", "numpy", "grain",
            "ml_collections")


def peak_tflops(device_kind: str, dtype: str) -> float | None:
    for name, fp32, bf16 in PEAK_TFLOPS:
        if name.lower() in device_kind.lower():
            return fp32 if dtype == "float32" else bf16
    return None


# ---------------------------------------------------------------------------------------------
# Determinism: digits runs in child processes.

def digits_config(tiny: bool, steps: int | None):
    """The digits default (tiny: 1 block of 2 columns, width 8, a few steps)."""
    from experiments.configs import digits
    c = digits.get_config()
    if tiny:
        c.model.num_blocks, c.model.num_columns, c.model.widths = 1, 2, (8,)
        c.batch_size, c.precise_bn.num_examples = 16, 64
        c.log_every_steps = 2
    if steps is not None:
        c.num_train_steps = steps
    c.log_every_steps = math.gcd(c.log_every_steps, c.num_train_steps)
    c.eval_every_steps = c.checkpoint_every_steps = min(c.eval_every_steps, c.num_train_steps)
    c.progress_bar = False
    return c


def child_train(workdir: str, tiny: bool, steps: int | None) -> None:
    """One digits run in this (child) process; prints its training seconds as JSON."""
    from fractal_jax.training import loop
    start = time.perf_counter()
    loop.train(digits_config(tiny, steps), workdir)
    print(json.dumps({"seconds": time.perf_counter() - start}))


def compare_runs(a: str, b: str) -> dict:
    """Whether two workdirs hold the same bytes of metrics.jsonl and the same final train state
    (parameters, BatchNorm statistics, optimizer state), and where they differ."""
    import jax
    import numpy as np
    from fractal_jax.training import checkpoint, metrics
    lines = [open(os.path.join(w, metrics.METRICS_FILE)).read().splitlines() for w in (a, b)]
    differing_lines = sum(x != y for x, y in zip(*lines)) + abs(len(lines[0]) - len(lines[1]))
    step = checkpoint.saved_steps(a)[-1]
    leaves = [jax.tree.leaves(checkpoint.read_state(w, step)) for w in (a, b)]
    diffs = [float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
             for x, y in zip(*leaves) if np.asarray(x).tobytes() != np.asarray(y).tobytes()]
    return {"identical": differing_lines == 0 and not diffs
            and len(leaves[0]) == len(leaves[1]), "step": step,
            "metrics_lines": len(lines[0]), "metrics_lines_differing": differing_lines,
            "arrays": len(leaves[0]), "arrays_differing": len(diffs),
            "max_abs_diff": max(diffs, default=0.0)}


def determinism_runs(tiny: bool, steps: int | None, folder: str, timeout: float | None
                     ) -> dict[str, tuple[list[str], list[float]]]:
    """Two child-process runs of the digits default per flag setting, all four side by side:
    their workdirs and training seconds, by setting. Off CPU every child compiles (and
    autotunes) afresh: a persistent-cache hit would reuse another run's executable."""
    runs = []  # (label, workdir, environment)
    for i in range(2):
        for label, flags in ((NO_DETERMINISM_FLAG, NO_DETERMINISM_FLAG),
                             (DETERMINISM_FLAG, DETERMINISM_FLAG)):
            env = dict(os.environ, XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} {flags}".strip(),
                       # Children share the device with this process: allocate only what they use.
                       XLA_PYTHON_CLIENT_PREALLOCATE="false")
            if not tiny:
                env["JAX_ENABLE_COMPILATION_CACHE"] = "false"
            runs.append((label, os.path.join(folder, f"{flags.rsplit('=', 1)[1]}{i}"), env))
    processes = [(label, workdir, subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), "--child-train", workdir,
         *(["--tiny"] if tiny else []), *([f"--steps={steps}"] if steps else [])],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        for label, workdir, env in runs]
    seconds: dict[str, float] = {}
    end = None if timeout is None else time.monotonic() + timeout
    try:
        for label, workdir, process in processes:
            left = None if end is None else max(1.0, end - time.monotonic())
            stdout, stderr = process.communicate(timeout=left)
            if process.returncode:
                raise RuntimeError(f"digits run ({label}) failed:\n{stderr[-4000:]}")
            seconds[workdir] = json.loads(stdout.strip().splitlines()[-1])["seconds"]
    finally:
        for _, _, process in processes:
            process.kill()
    return {label: ([w for name, w, _ in runs if name == label],
                    [seconds[w] for name, w, _ in runs if name == label])
            for label in dict.fromkeys(label for label, _, _ in runs)}


def _identity_row(label: str, result: dict) -> tuple[str, str, str]:
    detail = (f"2 runs × {result['step']} steps ({', '.join(f'{s:.1f}' for s in result['seconds'])}"
              f" s, 4 runs side by side): metrics.jsonl {result['metrics_lines_differing']} of "
              f"{result['metrics_lines']} lines differ; final train state "
              f"{result['arrays_differing']} of {result['arrays']} arrays differ")
    if result["arrays_differing"]:
        detail += f" (max |Δ| {result['max_abs_diff']:.3g})"
    return f"bit-identical reruns, {label}", "yes" if result["identical"] else "no", detail


# ---------------------------------------------------------------------------------------------
# Speed rows.

def ratio(rows: dict, a: str, b: str) -> tuple[float, float, float]:
    """Median and spread of the per-round ratios of rows `a` ÷ `b` (rates per round)."""
    values = [x / y for x, y in zip(rows[a]["rates"], rows[b]["rates"])]
    return statistics.median(values), min(values), max(values)


def _ratio_text(rows: dict, a: str, b: str) -> str:
    r = ratio(rows, a, b)
    return f"{r[0]:.2f} ({r[1]:.2f}..{r[2]:.2f})"


def _rate(row: dict) -> tuple[str, str]:
    return (f"{row['images_per_s']:,.1f}",
            f"spread {row['min']:,.1f}..{row['max']:,.1f}; compile {row['compile_s']:.1f} s"
            + ("" if row.get("temp_mb") is None else f"; XLA temp {row['temp_mb']:,.0f} MiB"))


def _flops(compiled) -> float | None:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return None if not cost or "flops" not in cost else float(cost["flops"])


def window_flops(setup: bench.Setup, **overrides) -> float | None:
    """FLOPs of one `train_variant` window (skipping dead work, paper mix) as XLA counts its
    own compiled programs; local steps compute every unit."""
    import numpy as np
    model = bench._model(setup, **overrides)
    modes = bench.window_modes(bench.window_seed(setup), np.arange(1, setup.steps_per_window + 1),
                               model.network_schedule, MIX["p_global"])
    counts = [_flops(bench.PROGRAMS.get((model, mode), None)) for mode in modes]
    return None if None in counts else sum(counts)


class Context:
    """What sections share: the plan, the deadline, the variants built so far (by name) and the
    rows measured so far (by name)."""

    def __init__(self, plan: Plan, budget: float | None):
        self.plan = plan
        self.start = time.monotonic()
        self.end = None if budget is None else self.start + budget
        self.variants: dict[str, bench.Variant] = {}
        self.built: dict[str, list[bench.Variant]] = {}
        self.rows: dict[str, dict] = {}

    def left(self) -> float | None:
        return None if self.end is None else self.end - time.monotonic()

    def build(self, builders: dict[str, Callable[[], bench.Variant | list[bench.Variant]]]
              ) -> list[bench.Variant]:
        """The variants of `builders` (each returns one or a list), built (compiled)
        `plan.workers` at a time; a builder's name built before is not built again."""
        todo = {k: f for k, f in builders.items() if k not in self.built}
        with concurrent.futures.ThreadPoolExecutor(self.plan.workers) as pool:
            futures = {k: pool.submit(f) for k, f in todo.items()}
            for k, future in futures.items():
                result = future.result()
                self.built[k] = result if isinstance(result, list) else [result]
                self.variants.update((v.name, v) for v in self.built[k])
        return [v for k in builders for v in self.built[k]]

    def measure(self, variants: list[bench.Variant], deadline: float | None) -> dict[str, dict]:
        rows = {r["name"]: r for r in bench.measure(variants, self.plan.setup, deadline)}
        for v in variants:
            rows[v.name]["rounds"] = len(rows[v.name]["rates"])
        self.rows.update(rows)
        return rows


def _train(setup: bench.Setup, dtype: str) -> str:
    return f"train {dtype}, batch {setup.batch_size}"


def section_devices(ctx: Context, deadline: float | None) -> list[tuple[str, str, str]]:
    import jax
    devices = jax.devices()
    stats = devices[0].memory_stats() or {}
    kinds = collections.Counter(d.device_kind for d in devices)
    memory = (f"{stats['bytes_limit'] / 2**30:,.1f} GiB usable per device" if "bytes_limit"
              in stats else "memory not reported by this backend")
    rows = [("devices", f"{len(devices)} × {', '.join(kinds)} ({devices[0].platform})", memory)]
    versions = []
    for name in PACKAGES:
        try:
            versions.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            pass
    rows.append(("versions", f"python {sys.version.split()[0]}", ", ".join(versions)))
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
        if smi.returncode == 0:
            rows.append(("driver", smi.stdout.strip().splitlines()[0], "nvidia-smi"))
    except (OSError, subprocess.TimeoutExpired):
        pass
    return rows


def section_speed(ctx: Context, deadline: float | None) -> list[tuple[str, str, str]]:
    """(b): for each batch size, train (paper mix, dead work skipped: one program per plan
    kind) and eval (full network) in float32 and bfloat16, and a large matmul per dtype."""
    plan, builders = ctx.plan, {}
    for batch in plan.batch_sizes:
        s = dataclasses.replace(plan.setup, batch_size=batch)
        for dtype in ("float32", "bfloat16"):
            extra = {} if dtype == "float32" else {"dtype": dtype}
            builders[_train(s, dtype)] = lambda s=s, extra=extra, dtype=dtype: bench.train_variant(
                s, _train(s, dtype), **MIX, skip=True, count_flops=False, **extra)
            builders[f"eval {dtype}, batch {batch}"] = (
                lambda s=s, extra=extra, dtype=dtype: bench.eval_variant(
                    s, f"eval {dtype}, batch {s.batch_size}", **extra))
    for dtype in ("float32", "bfloat16"):
        builders[f"matmul {dtype}"] = lambda dtype=dtype: bench.matmul_variant(
            plan.setup, plan.matmul_size, dtype)
    _prime_models(plan.setup, plan.batch_sizes)
    variants = ctx.build(builders)
    # XLA's count of each train window's FLOPs (the matmul variants carry their own).
    for batch in plan.batch_sizes:
        s = dataclasses.replace(plan.setup, batch_size=batch)
        for dtype in ("float32", "bfloat16"):
            extra = {} if dtype == "float32" else {"dtype": dtype}
            ctx.variants[_train(s, dtype)].flops = window_flops(s, **extra)
    rows = ctx.measure(variants, deadline)
    out = []
    kind = _device_kind()
    for batch in plan.batch_sizes:
        s = dataclasses.replace(plan.setup, batch_size=batch)
        for dtype in ("float32", "bfloat16"):
            name = _train(s, dtype)
            value, detail = _rate(rows[name])
            out.append((f"train images/s, {dtype}, batch {batch}", value,
                        f"paper-mix plans, one program per plan kind; {detail}"))
        out.append((f"train bfloat16 ÷ float32, batch {batch}", _ratio_text(
            rows, _train(s, "bfloat16"), _train(s, "float32")), "median (spread) of rounds"))
        for dtype in ("float32", "bfloat16"):
            value, detail = _rate(rows[f"eval {dtype}, batch {batch}"])
            out.append((f"eval images/s, {dtype}, batch {batch}", value, f"full network; {detail}"))
        for dtype in ("float32", "bfloat16"):
            row = rows[_train(s, dtype)]
            if "gflops_per_s" not in row:
                continue
            achieved = statistics.median(row["gflops_per_s"]) / 1e3
            matmul = next(r for n, r in rows.items()
                          if n.startswith("matmul") and n.endswith(f"({dtype})"))
            measured = statistics.median(matmul["gflops_per_s"]) / 1e3
            peak = peak_tflops(kind, dtype)
            share = "-" if peak is None else f"{100 * achieved / peak:.1f}%"
            out.append((f"share of peak FLOP/s, train {dtype}, batch {batch}", share,
                        f"{achieved:,.2f} TFLOP/s (XLA's FLOP count of the programs); data-sheet "
                        f"dense peak {'-' if peak is None else f'{peak:,.1f}'} TFLOP/s; "
                        f"{100 * achieved / measured:.1f}% of the measured {matmul['name']} "
                        f"({measured:,.1f} TFLOP/s)"))
    return out


def _device_kind() -> str:
    import jax
    return jax.devices()[0].device_kind


def _prime_models(setup: bench.Setup, batch_sizes=(), overrides=({}, {"dtype": "bfloat16"})):
    """Creates the models, their initialisers, the optimizer and the window seeds before
    building in threads: two threads filling one of these caches could each create an object,
    and states made with one would not fit programs compiled for the other."""
    bench._optimizer()
    for batch in batch_sizes or (setup.batch_size,):
        s = dataclasses.replace(setup, batch_size=batch)
        bench.window_seed(s)
        for extra in overrides:
            bench._init(bench._model(s, **extra), s)


def section_sweep(ctx: Context, deadline: float | None) -> list[tuple[str, str, str]]:
    """(c): K models vmapped in one masked step against the same K models' masked steps one
    after another (and against one model's dead-work-skipping step), for each K."""
    plan = ctx.plan
    base = _train(plan.setup, "float32")
    builders = {base: lambda: bench.train_variant(plan.setup, base, **MIX, skip=True,
                                                  count_flops=False)}
    for k in plan.sweep_sizes:
        sk = dataclasses.replace(plan.setup, sweep_models=k)
        _prime_models(sk, overrides=({},))
        builders[f"sweep {k}"] = lambda sk=sk: bench.sweep_variants(sk, patches=False)
    _prime_models(plan.setup, overrides=({},))
    ctx.build(builders)
    names = [base] + [n for k in plan.sweep_sizes for n in _sweep_names(k)]
    rows = ctx.measure([ctx.variants[n] for n in names], deadline)
    out = []
    for k in plan.sweep_sizes:
        seq, vmapped = _sweep_names(k)
        value, detail = _rate(rows[vmapped])
        out.append((f"sweep images/s, {k} models vmapped in one step", value,
                    f"float32, batch {plan.setup.batch_size}, every unit computed; {detail}"))
        value, detail = _rate(rows[seq])
        out.append((f"sweep images/s, {k} models one after another", value,
                    f"one masked step each in turn; {detail}"))
        out.append((f"vmapped ÷ sequential, {k} models", _ratio_text(rows, vmapped, seq),
                    f"÷ one model's dead-work-skipping step: {_ratio_text(rows, vmapped, base)}"))
    return out


def _sweep_names(k: int) -> tuple[str, str]:
    return f"sweep: {k} models sequentially (masked step)", f"sweep: {k} models vmapped in one step"


def section_dispatch(ctx: Context, deadline: float | None) -> list[tuple[str, str, str]]:
    """(d): the paper mix trained by host-dispatched plan programs, one `lax.switch` program
    choosing them on the device, and the masked step computing every unit."""
    plan = ctx.plan
    base = _train(plan.setup, "float32")
    _prime_models(plan.setup, overrides=({},))
    ctx.build({
        base: lambda: bench.train_variant(plan.setup, base, **MIX, skip=True, count_flops=False),
        "switch": lambda: bench.train_variant(plan.setup, "switch", **MIX, skip=False,
                                              every_step="switch", count_flops=False),
        "masked": lambda: bench.train_variant(plan.setup, "masked", **MIX, skip=False,
                                              count_flops=False)})
    rows = ctx.measure([ctx.variants[n] for n in (base, "switch", "masked")], deadline)
    out = [("train images/s, host-dispatched plan programs", *_rate(rows[base]))]
    for check, name in (("train images/s, one lax.switch program", "switch"),
                        ("train images/s, masked step (every unit)", "masked")):
        value, detail = _rate(rows[name])
        out.append((check, value, f"{detail}; ÷ host-dispatched: {_ratio_text(rows, name, base)}"))
    return out


def layer_levers(platform: str) -> list[tuple[str, str]]:
    """(option, value) pairs that differ from what this backend runs by default."""
    from fractal_jax.models import batch_norm
    defaults = {"bn_impl": "fused" if batch_norm.use_fused("auto", platform) else "autodiff",
                # CPU's "auto" mixes both per shape: compare it with each.
                "conv_impl": None if platform == "cpu" else "xla",
                "pool_impl": "windows", "dropout_impl": "hash"}
    return [(option, value) for option, values in LAYER_LEVERS for value in values
            if value != defaults[option]]


def section_layers(ctx: Context, deadline: float | None) -> list[tuple[str, str, str]]:
    """(e): the masked step (every unit, paper-mix plans drawn in the step) with the backend's
    default layer implementations against one implementation changed at a time."""
    import jax
    plan = ctx.plan
    levers = layer_levers(jax.default_backend())
    _prime_models(plan.setup, overrides=({}, *({o: v} for o, v in levers)))
    builders = {"masked": lambda: bench.train_variant(plan.setup, "masked", **MIX, skip=False,
                                                      count_flops=False)}
    for option, value in levers:
        builders[f"masked, {option}={value}"] = lambda o=option, v=value: bench.train_variant(
            plan.setup, f"masked, {o}={v}", **MIX, skip=False, count_flops=False, **{o: v})
    variants = ctx.build(builders)
    rows = ctx.measure(variants, deadline)
    out = [("masked step, default implementations", *_rate(rows["masked"]))]
    for option, value in levers:
        name = f"masked, {option}={value}"
        out.append((f"masked step, {option}={value}", _ratio_text(rows, name, "masked"),
                    f"÷ defaults (median, spread of rounds); {_rate(rows[name])[0]} images/s"))
    return out


def section_determinism(ctx: Context, deadline: float | None) -> list[tuple[str, str, str]]:
    plan, tiny = ctx.plan, ctx.plan.tiny
    timeout = None if deadline is None else max(30.0, deadline - time.monotonic())
    with tempfile.TemporaryDirectory() as folder:
        runs = determinism_runs(tiny, plan.digits_steps, folder, timeout)
        out = []
        for label, (workdirs, seconds) in runs.items():
            result = {**compare_runs(*workdirs), "seconds": seconds}
            out.append(_identity_row(label, result))
    return out


def section_memory(ctx: Context, deadline: float | None) -> list[tuple[str, str, str]]:
    import jax
    stats = jax.devices()[0].memory_stats() or {}
    temps = {k: t for k, t in bench.PROGRAMS.temp_mb.items() if t is not None}
    largest = max(temps.items(), key=lambda kv: kv[1], default=None)
    out = []
    if "peak_bytes_in_use" in stats:
        out.append(("peak device memory", f"{stats['peak_bytes_in_use'] / 2**20:,.1f} MiB",
                    "memory_stats peak_bytes_in_use of this process, every program so far"))
    if largest is not None:
        key = largest[0]
        program = " ".join(map(str, key)) if isinstance(key[0], str) else str(key[-1])
        out.append(("largest XLA temporary memory", f"{largest[1]:,.1f} MiB",
                    f"program {program!r} (XLA memory analysis)"))
    for name, row in ctx.rows.items():
        if name.startswith("train ") and row.get("temp_mb") is not None:
            out.append((f"XLA temp memory, {name}", f"{row['temp_mb']:,.1f} MiB",
                        "largest of the row's programs"))
    return out


RUNNERS = {"devices": section_devices, "speed": section_speed, "sweep": section_sweep,
           "dispatch": section_dispatch, "layers": section_layers,
           "determinism": section_determinism, "memory": section_memory}


# ---------------------------------------------------------------------------------------------

def markdown(mode: str, plan: Plan, env: dict, results: dict) -> str:
    setup = plan.setup
    lines = [f"# GPU check ({mode})", "",
             f"FractalNet-20 shape, widths {setup.widths}"
             + (f", {dict(setup.model)}" if setup.model else "")
             + f", {setup.image_size}×{setup.image_size}×3 inputs, batch sizes {plan.batch_sizes}; "
             f"up to {setup.windows} interleaved rounds of {setup.steps_per_window} steps per row "
             "(`experiments/benchmark.py`); determinism: the digits default "
             f"({plan.digits_steps} steps) trained twice per flag setting, each run in its own "
             "process.", "",
             "Machine: " + ", ".join(f"{k} {v}" for k, v in env.items()), ""]
    for name, title, _ in SECTIONS:
        section = results.get(name)
        if section is None:
            continue
        lines += [f"## {title}", "", f"{section['status']} in {section['seconds']:.0f} s"
                  + (f": {section['error']}" if section.get("error") else ""), ""]
        if section["rows"]:
            lines += ["| check | result | detail |", "|---|---:|---|"]
            lines += [f"| {r['check']} | {r['result']} | {r['detail']} |" for r in section["rows"]]
            lines.append("")
    return "\n".join(lines)


def write(out: str, mode: str, plan: Plan, env: dict, results: dict, ctx: Context) -> dict:
    """Writes gpu_check.md and gpu_check.json (each through a rename, so a reader never sees a
    half-written file) and returns the JSON object."""
    result = {"mode": mode, "plan": dataclasses.asdict(plan), "environment": env,
              "sections": results, "measured": list(ctx.rows.values())}
    os.makedirs(out, exist_ok=True)
    for name, text in (("gpu_check.md", markdown(mode, plan, env, results)),
                       ("gpu_check.json", json.dumps(result, indent=1, default=str))):
        path = os.path.join(out, name)
        with open(path + ".tmp", "w") as f:
            f.write(text)
        os.replace(path + ".tmp", path)
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="gpu_check", help="folder for gpu_check.{md,json}")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--tiny", action="store_true", help="tiny model and runs (any backend)")
    size.add_argument("--full", action="store_true", help="the full check even on a CPU")
    parser.add_argument("--budget", type=float, help="seconds: each section gets its share as a "
                        "time cap, and no section starts after the budget is spent")
    parser.add_argument("--sections", default=",".join(n for n, _, _ in SECTIONS),
                        help="comma-separated sections to run (default: all, in priority order)")
    parser.add_argument("--steps", type=int, help="train steps of each digits run "
                        "(default: 120; 4 with --tiny)")
    parser.add_argument("--child-train", metavar="WORKDIR", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    configure_jax()
    import jax
    tiny = args.tiny or (jax.default_backend() == "cpu" and not args.full)
    plan = TINY if tiny else FULL
    if args.steps is not None:
        plan = dataclasses.replace(plan, digits_steps=args.steps)
    if args.child_train:
        child_train(args.child_train, tiny, plan.digits_steps)
        return {}
    wanted = args.sections.split(",")
    unknown = set(wanted) - set(RUNNERS)
    if unknown:
        parser.error(f"--sections: unknown {sorted(unknown)}; choose from {list(RUNNERS)}")
    ctx = Context(plan, args.budget)
    mode, env, results = "tiny" if tiny else "full", bench.environment(), {}
    # The budget is shared among the sections that run, in proportion to their shares.
    total_share = sum(share for name, _, share in SECTIONS if name in wanted)
    for name, title, share in SECTIONS:
        if name not in wanted:
            continue
        left = ctx.left()
        if left is not None and left <= 0:
            results[name] = {"status": "skipped (budget spent)", "seconds": 0.0, "rows": []}
            write(args.out, mode, plan, env, results, ctx)
            continue
        cap = None if left is None else min(left, share / total_share * args.budget)
        start = time.monotonic()
        deadline = None if cap is None else start + cap
        print(f"== {title} (cap {'none' if cap is None else f'{cap:.0f} s'})", file=sys.stderr,
              flush=True)
        try:
            rows = RUNNERS[name](ctx, deadline)
            status, error = "done", None
        except Exception as e:  # one section's failure must not lose the others' results
            traceback.print_exc()
            rows, status, error = [], "failed", f"{type(e).__name__}: {str(e)[:2000]}"
        results[name] = {"status": status, "seconds": time.monotonic() - start, "error": error,
                         "rows": [dict(zip(("check", "result", "detail"), r)) for r in rows]}
        write(args.out, mode, plan, env, results, ctx)
        print(markdown(mode, plan, env, {name: results[name]}).split("\n## ", 1)[1], flush=True)
    return write(args.out, mode, plan, env, results, ctx)


if __name__ == "__main__":
    main()
