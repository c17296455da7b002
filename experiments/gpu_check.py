"""Answers the GPU questions in one run and one table: devices, bit-identical reruns with and
without XLA's GPU determinism flag, train and eval images/s in float32 and bfloat16, the share
of the GPU's peak FLOP/s, host-dispatched programs against one `lax.switch` program and the
masked step, vmapped sweeps against sequential steps, and peak device memory.

    make install-gpu                                   # the CUDA build of the pinned jax
    .venv/bin/python experiments/gpu_check.py          # writes gpu_check/gpu_check.{md,json}
    .venv/bin/python experiments/gpu_check.py --tiny   # tiny model, a few steps (CI, any CPU)

On a CPU backend it runs the tiny version unless --full is given. Speed rows reuse
experiments/benchmark.py's interleaved rounds (every ratio is a median of per-round ratios)
on the CIFAR FractalNet-20 (widths 64..512, B=5, C=3) at batch 100. The determinism rows train
the digits default (experiments/configs/digits.py) twice per flag setting, each run in a child
process (XLA reads its flags at process start), and compare metrics.jsonl and the final train
state bit for bit.
"""
import os
import sys

# Run as a script: make the repository importable without installing it.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse  # noqa: E402
import collections  # noqa: E402
import concurrent.futures  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

from experiments import benchmark as bench  # noqa: E402
from fractal_jax.runtime import configure_jax  # noqa: E402

DETERMINISM_FLAG = "--xla_gpu_deterministic_ops=true"

FULL = bench.Setup(widths=(64, 128, 256, 512, 512), batch_size=100, steps_per_window=20,
                   windows=5, sweep_models=4)
# Compile time, not run time, dominates on CPU: fewer blocks and columns keep CI's run short.
TINY = bench.Setup(widths=(8,), batch_size=4, image_size=8, steps_per_window=2, windows=2,
                   sweep_models=2, model=(("num_blocks", 1), ("num_columns", 2),
                                          ("dropout", (0.1,))))

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

CHECKS = (
    "devices",
    "bit-identical reruns, XLA defaults",
    f"bit-identical reruns, {DETERMINISM_FLAG}",
    "train images/s, float32",
    "train images/s, bfloat16",
    "eval images/s, float32",
    "eval images/s, bfloat16",
    "share of peak FLOP/s, train float32",
    "share of peak FLOP/s, train bfloat16",
    "train images/s, one lax.switch program",
    "train images/s, masked step (every unit)",
    "sweep images/s, K models vmapped in one step",
    "sweep images/s, K models one after another",
    "peak device memory",
)


def peak_tflops(device_kind: str, dtype: str) -> float | None:
    for name, fp32, bf16 in PEAK_TFLOPS:
        if name.lower() in device_kind.lower():
            return fp32 if dtype == "float32" else bf16
    return None


def digits_config(tiny: bool, steps: int | None):
    """The digits default (tiny: 1 block of 2 columns, width 8, a few steps)."""
    from experiments.configs import digits
    c = digits.get_config()
    if tiny:
        c.model.num_blocks, c.model.num_columns, c.model.widths = 1, 2, (8,)
        c.batch_size, c.num_train_steps, c.precise_bn.num_examples = 16, 4, 64
        c.log_every_steps = 2
    if steps is not None:
        c.num_train_steps = steps
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


def determinism_runs(tiny: bool, steps: int | None, folder: str
                     ) -> dict[str, tuple[list[str], list[float]]]:
    """Two child-process runs of the digits default per flag setting: their workdirs and
    training seconds, by setting.

    Full: one run at a time, each compiling (and autotuning) afresh: a persistent-cache hit
    would reuse the first run's executable. Tiny: the two settings' runs side by side, with
    the cache, to keep CI short."""
    runs = []  # (label, workdir, environment), in the order they start
    for i in range(2):
        for label, flags in (("XLA defaults", ""), (DETERMINISM_FLAG, DETERMINISM_FLAG)):
            env = dict(os.environ, XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} {flags}".strip(),
                       # Children share the GPU with this process: allocate only what they use.
                       XLA_PYTHON_CLIENT_PREALLOCATE="false")
            if not tiny:
                env["JAX_ENABLE_COMPILATION_CACHE"] = "false"
            runs.append((label, os.path.join(folder, f"{'flag' if flags else 'default'}{i}"), env))
    seconds: dict[str, float] = {}
    at_once = 2 if tiny else 1
    for first in range(0, len(runs), at_once):
        batch = [(label, workdir, subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--child-train", workdir,
             *(["--tiny"] if tiny else []), *([f"--steps={steps}"] if steps else [])],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
            for label, workdir, env in runs[first:first + at_once]]
        for label, workdir, process in batch:
            stdout, stderr = process.communicate()
            if process.returncode:
                raise RuntimeError(f"digits run ({label}) failed:\n{stderr[-4000:]}")
            seconds[workdir] = json.loads(stdout.strip().splitlines()[-1])["seconds"]
    return {label: ([w for name, w, _ in runs if name == label],
                    [seconds[w] for name, w, _ in runs if name == label])
            for label in dict.fromkeys(label for label, _, _ in runs)}


def compare_all(runs: dict[str, tuple[list[str], list[float]]]) -> dict[str, dict]:
    """`compare_runs` of each flag setting's two runs, with their training seconds."""
    out = {}
    for label, (workdirs, seconds) in runs.items():
        out[label] = {**compare_runs(*workdirs), "seconds": seconds}
        print(f"determinism, {label}: {out[label]}", file=sys.stderr, flush=True)
    return out


def ratio(rows: dict, a: str, b: str) -> tuple[float, float, float]:
    """Median and spread of the per-round ratios of rows `a` ÷ `b` (rates per round)."""
    values = [x / y for x, y in zip(rows[a]["rates"], rows[b]["rates"])]
    return statistics.median(values), min(values), max(values)


def speed(setup: bench.Setup, matmul_size: int) -> dict[str, dict]:
    """Every timed row, by name, measured in interleaved rounds."""
    mix = dict(p_local=0.15, p_global=0.5)
    variants = [
        bench.train_variant(setup, "train float32", **mix, skip=True),
        bench.train_variant(setup, "train bfloat16", **mix, skip=True, dtype="bfloat16"),
        bench.eval_variant(setup, "eval float32"),
        bench.eval_variant(setup, "eval bfloat16", dtype="bfloat16"),
        bench.train_variant(setup, "switch", **mix, skip=False, every_step="switch",
                            count_flops=False),
        bench.train_variant(setup, "masked", **mix, skip=False, count_flops=False),
        *bench.sweep_variants(setup, patches=False),
        bench.matmul_variant(setup, matmul_size, "float32"),
        bench.matmul_variant(setup, matmul_size, "bfloat16"),
    ]
    return {r["name"]: r for r in bench.measure(variants, setup)}


def _mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def _identity_row(result: dict) -> tuple[str, str]:
    detail = (f"2 runs × {result['step']} steps ({', '.join(f'{s:.1f}' for s in result['seconds'])}"
              f" s): metrics.jsonl {result['metrics_lines_differing']} of "
              f"{result['metrics_lines']} lines differ; final train state "
              f"{result['arrays_differing']} of {result['arrays']} arrays differ")
    if result["arrays_differing"]:
        detail += f" (max |Δ| {result['max_abs_diff']:.3g})"
    return ("yes" if result["identical"] else "no"), detail


def table(setup: bench.Setup, devices: dict, same: dict, rows: dict,
          memory: tuple[float, str]) -> list[dict]:
    """The rows of CHECKS: (check, result, detail)."""
    k = setup.sweep_models
    seq, vmapped = (f"sweep: {k} models sequentially (masked step)",
                    f"sweep: {k} models vmapped in one step")
    out = [("devices", f"{devices['count']} × {devices['kind']} ({devices['platform']})",
            f"memory per device: {devices['memory']}")]
    out += [(f"bit-identical reruns, {label}", *_identity_row(same[label])) for label in same]

    def rate(name: str, what: str) -> tuple[str, str]:
        r = rows[name]
        return f"{r['images_per_s']:,.1f}", f"{what}; spread {r['min']:,.1f}..{r['max']:,.1f}"

    mix = f"paper-mix plans, dead work skipped (one program per plan kind), batch {setup.batch_size}"
    out += [("train images/s, float32", *rate("train float32", mix)),
            ("train images/s, bfloat16", *rate("train bfloat16", mix)),
            ("eval images/s, float32", *rate("eval float32", f"full network, batch "
                                                            f"{setup.batch_size}")),
            ("eval images/s, bfloat16", *rate("eval bfloat16", f"full network, batch "
                                                              f"{setup.batch_size}"))]
    for dtype in ("float32", "bfloat16"):
        achieved = statistics.median(rows[f"train {dtype}"]["gflops_per_s"]) / 1e3
        peak = peak_tflops(devices["kind"], dtype)
        source = f"data-sheet dense peak of {devices['kind']}"
        if peak is None:
            matmul = next(r for n, r in rows.items() if n.startswith("matmul")
                          and n.endswith(f"({dtype})"))
            peak = statistics.median(matmul["gflops_per_s"]) / 1e3
            source = f"measured {matmul['name']} (no data-sheet peak for this device)"
        out.append((f"share of peak FLOP/s, train {dtype}", f"{100 * achieved / peak:.1f}%",
                    f"{achieved:,.3f} of {peak:,.3f} TFLOP/s; peak: {source}"))
    for check, name in (("train images/s, one lax.switch program", "switch"),
                        ("train images/s, masked step (every unit)", "masked")):
        value, detail = rate(name, "paper-mix plans, float32")
        r = ratio(rows, name, "train float32")
        out.append((check, value, f"{detail}; ÷ one program per plan kind: {r[0]:.2f} "
                                  f"({r[1]:.2f}..{r[2]:.2f})"))
    value, detail = rate(vmapped, f"{k} models, float32, every unit computed")
    r, s = ratio(rows, vmapped, seq), ratio(rows, vmapped, "train float32")
    out.append(("sweep images/s, K models vmapped in one step", value,
                f"{detail}; ÷ {k} masked steps one after another: {r[0]:.2f} "
                f"({r[1]:.2f}..{r[2]:.2f}); ÷ one model's dead-work-skipping step: "
                f"{s[0]:.2f} ({s[1]:.2f}..{s[2]:.2f})"))
    out.append(("sweep images/s, K models one after another",
                *rate(seq, f"{k} models, one masked step each in turn")))
    out.append(("peak device memory", _mib(memory[0]), memory[1]))
    return [dict(zip(("check", "result", "detail"), row)) for row in out]


def device_info() -> dict:
    import jax
    devices = jax.devices()
    stats = devices[0].memory_stats() or {}
    kinds = collections.Counter(d.device_kind for d in devices)
    return {"platform": devices[0].platform, "count": len(devices),
            "kind": ", ".join(kinds), "memory": _mib(stats["bytes_limit"])
            if "bytes_limit" in stats else "not reported by this backend"}


def peak_memory() -> tuple[float, str]:
    """Peak device memory of this process (every program measured), or, where the backend keeps
    no statistics, the largest temporary memory XLA's memory analysis gives any program."""
    import jax
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return stats["peak_bytes_in_use"], "device memory_stats peak_bytes_in_use, this process"
    temps = [t for t in bench.PROGRAMS.temp_mb.values() if t is not None]
    return max(temps) * 2**20, ("largest compiled temporary memory of any program (XLA memory "
                                "analysis; this backend reports no memory_stats)")


def markdown(mode: str, setup: bench.Setup, env: dict, rows: list[dict]) -> str:
    lines = [f"# GPU check ({mode})", "",
             f"FractalNet-20 shape, widths {setup.widths}"
             + (f", {dict(setup.model)}" if setup.model else "")
             + f", batch {setup.batch_size}, {setup.image_size}×{setup.image_size}×3 inputs; "
             f"{setup.windows} interleaved rounds of {setup.steps_per_window} steps per row "
             "(`experiments/benchmark.py`); determinism: the digits default trained twice per "
             "flag setting, each run in its own process.", "",
             "Machine: " + ", ".join(f"{k} {v}" for k, v in env.items()), "",
             "| check | result | detail |", "|---|---:|---|"]
    lines += [f"| {r['check']} | {r['result']} | {r['detail']} |" for r in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="gpu_check", help="folder for gpu_check.{md,json}")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--tiny", action="store_true", help="tiny model and runs (any backend)")
    size.add_argument("--full", action="store_true", help="the full check even on a CPU")
    parser.add_argument("--steps", type=int, help="train steps of each digits run "
                        "(default: the config's 1,500; 4 with --tiny)")
    parser.add_argument("--child-train", metavar="WORKDIR", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    configure_jax()
    import jax
    tiny = args.tiny or (jax.default_backend() == "cpu" and not args.full)
    if args.child_train:
        child_train(args.child_train, tiny, args.steps)
        return {}
    setup = TINY if tiny else FULL
    # Large enough to approach the chip's peak on a GPU; small where it would take minutes.
    matmul_size = 256 if tiny else 8192 if jax.default_backend() == "gpu" else 1024
    devices = device_info()
    with tempfile.TemporaryDirectory() as folder:
        if tiny:  # tiny timings are a smoke test: overlap them with the children, for CI
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                runs = pool.submit(determinism_runs, tiny, args.steps, folder)
                rows = speed(setup, matmul_size)
                same = compare_all(runs.result())
        else:  # the children first: they would disturb the timings on the same device
            same = compare_all(determinism_runs(tiny, args.steps, folder))
            rows = speed(setup, matmul_size)
    result_rows = table(setup, devices, same, rows, peak_memory())
    mode = "tiny" if tiny else "full"
    env = bench.environment()
    text = markdown(mode, setup, env, result_rows)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "gpu_check.md"), "w") as f:
        f.write(text)
    result = {"mode": mode, "setup": dataclasses.asdict(setup), "environment": env,
              "devices": devices, "determinism": same, "rows": result_rows,
              "measured": list(rows.values())}
    with open(os.path.join(args.out, "gpu_check.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(text)
    return result


if __name__ == "__main__":
    main()
