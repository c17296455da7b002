"""Test-wide set-up: quiet TF, CPU-only, and JAX's persistent compilation cache.

The cache lives in the repo (ignored by git) so that subprocess tests and reruns
reuse compiled programs instead of paying XLA:CPU's compile time again.
"""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
_CACHE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".jax_cache")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _CACHE)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import pytest  # noqa: E402

# The same process-wide settings as the main command, so in-process runs match subprocess runs.
from fractal_jax.runtime import configure_jax  # noqa: E402

configure_jax()


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """A TFDS data_dir, shared by the session's runs (digits needs none: it is read from memory)."""
    return tmp_path_factory.mktemp("tfds")


@pytest.fixture(scope="session")
def reference(tmp_path_factory, data_dir):
    """One uninterrupted run of tests/tiny_config.py: (workdir, final eval metrics)."""
    from fractal_jax.training import loop
    from test_training import tiny_config

    workdir = str(tmp_path_factory.mktemp("reference"))
    return workdir, loop.train(tiny_config(data_dir), workdir)


@pytest.fixture(scope="session")
def loop_sweep(tmp_path_factory, data_dir):
    """The 4-member sweep of test_sweep.SWEEP on the tiny config, trained whole in-process with
    the "loop" strategy (a member = its single run, bit for bit), and its result tables."""
    from test_sweep import train_and_tabulate
    from test_training import tiny_config

    workdir = str(tmp_path_factory.mktemp("loop_sweep"))
    return workdir, train_and_tabulate(tiny_config(data_dir), workdir, strategy="loop")
