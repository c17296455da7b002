"""Process-wide JAX settings, applied once before the first computation."""
from __future__ import annotations

import os

# XLA:CPU sends convolutions to YNNPACK library fusions by default, which parallelise this
# small-batch conv net poorly; turning them off measured +5..25% train and +12..35% eval
# images/s for C=3 FractalNets on a 2-core CPU (BENCHMARKS.md). It only affects the CPU backend.
CPU_XLA_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=",)
# On an H200, two reruns of the digits default differed in 172 of 197 state arrays with XLA's
# defaults and were bit-identical with this flag (BENCHMARKS.md, GPU): reruns must reproduce.
GPU_XLA_FLAGS = ("--xla_gpu_deterministic_ops=true",)
DEFAULT_CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "fractal_jax", "jax")


def _with(flags: str, defaults: tuple[str, ...]) -> str:
    for flag in defaults:
        if flag.split("=")[0] not in flags:
            flags = f"{flags} {flag}".strip()
    return flags


def with_cpu_flags(flags: str) -> str:
    """`flags` (an XLA_FLAGS value) plus each of CPU_XLA_FLAGS that it does not set itself."""
    return _with(flags, CPU_XLA_FLAGS)


def default_xla_flags(flags: str, plugins: set[str]) -> str:
    """`flags` (the user's XLA_FLAGS, which win) plus the defaults for the installed JAX
    plugins: GPU_XLA_FLAGS with a CUDA or ROCm plugin, CPU_XLA_FLAGS with none. The CPU flags
    are left out where any accelerator plugin is installed: XLA refuses to start on a flag its
    build does not know, and an accelerator's jaxlib may be another version than the CPU one
    they were chosen for."""
    if any("cuda" in p or "rocm" in p for p in plugins):
        return _with(flags, GPU_XLA_FLAGS)
    return flags if plugins else with_cpu_flags(flags)


def installed_plugins() -> set[str]:
    """Names of the installed JAX accelerator plugins (e.g. ``xla_cuda13``, ``libtpu``), found
    the way JAX finds them: `jax_plugins` entry points and modules, and libtpu."""
    import importlib.metadata
    import importlib.util
    import pkgutil
    names = {e.name for e in importlib.metadata.entry_points(group="jax_plugins")}
    if importlib.util.find_spec("libtpu") is not None:
        names.add("libtpu")
    try:
        import jax_plugins  # namespace package of plugins that register by module name
    except ImportError:
        return names
    return names | {m.name for m in pkgutil.iter_modules(jax_plugins.__path__)}


def configure_jax(default_flags: bool = True) -> None:
    """Sets default XLA flags for the installed backend (`default_xla_flags`; none with
    `default_flags=False`) and turns on JAX's persistent compilation cache.

    Must run before JAX initialises its backends. Both respect what the user already set:
    XLA_FLAGS entries and JAX_COMPILATION_CACHE_DIR win over these defaults.
    """
    flags = os.environ.get("XLA_FLAGS", "")
    if default_flags:
        flags = default_xla_flags(flags, installed_plugins())
    os.environ["XLA_FLAGS"] = flags

    import jax  # imported late so that XLA_FLAGS is set first

    jax.config.update("jax_compilation_cache_dir",
                      os.environ.get("JAX_COMPILATION_CACHE_DIR", DEFAULT_CACHE_DIR))
    # Cache every program that took noticeable time: a resume or a rerun then skips compiling.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
