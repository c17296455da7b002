"""Process-wide JAX settings, applied once before the first computation."""
from __future__ import annotations

import os

# XLA:CPU sends convolutions to YNNPACK library fusions by default, which parallelise this
# small-batch conv net poorly; turning them off measured +5..25% train and +12..35% eval
# images/s for C=3 FractalNets on a 2-core CPU (BENCHMARKS.md). It only affects the CPU backend.
CPU_XLA_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=",)
DEFAULT_CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "fractal_jax", "jax")


def with_cpu_flags(flags: str) -> str:
    """`flags` (an XLA_FLAGS value) plus each of CPU_XLA_FLAGS that it does not set itself."""
    for flag in CPU_XLA_FLAGS:
        if flag.split("=")[0] not in flags:
            flags = f"{flags} {flag}".strip()
    return flags


def configure_jax(cpu_flags: bool = True) -> None:
    """Sets default XLA flags (unless `cpu_flags` is False) and turns on JAX's persistent
    compilation cache.

    Must run before JAX initialises its backends. Both respect what the user already set:
    XLA_FLAGS entries and JAX_COMPILATION_CACHE_DIR win over these defaults.
    """
    flags = os.environ.get("XLA_FLAGS", "")
    os.environ["XLA_FLAGS"] = with_cpu_flags(flags) if cpu_flags else flags

    import jax  # imported late so that XLA_FLAGS is set first

    jax.config.update("jax_compilation_cache_dir",
                      os.environ.get("JAX_COMPILATION_CACHE_DIR", DEFAULT_CACHE_DIR))
    # Cache every program that took noticeable time: a resume or a rerun then skips compiling.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
