"""The module layout's promises (../DESIGN.md): imports flow downward, and loading a config file
costs neither TensorFlow nor JAX."""
import ast
import glob
import os
import subprocess
import sys

from test_training import ROOT

# Each layer may import only the layers after it.
LAYERS = ["analysis", "training", "data|models", "config|checks"]


def _layer(module: str) -> int | None:
    parts = module.split(".")
    if parts[0] != "fractal_jax" or len(parts) < 2:
        return None
    for index, names in enumerate(LAYERS):
        if parts[1] in names.split("|"):
            return index
    return None


def _imports(path: str) -> set[str]:
    tree = ast.parse(open(path, encoding="utf-8").read())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return found


def test_imports_flow_downward():
    upward = []
    for path in glob.glob(os.path.join(ROOT, "fractal_jax", "*", "*.py")) + glob.glob(
            os.path.join(ROOT, "fractal_jax", "*.py")):
        module = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
        own = _layer(module)
        if own is None:
            continue
        for imported in _imports(path):
            layer = _layer(imported)
            if layer is not None and layer < own:
                upward.append(f"{module} imports {imported}")
    assert not upward, upward


def test_loading_a_config_file_imports_neither_tensorflow_nor_jax():
    code = ("import sys, glob, importlib, os\n"
            "for path in sorted(glob.glob('experiments/configs/*.py')):\n"
            "    name = os.path.basename(path)[:-3]\n"
            "    if name != '__init__':\n"
            "        importlib.import_module(f'experiments.configs.{name}').get_config()\n"
            "print(sorted(m for m in ('tensorflow', 'jax') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_default_xla_flags_follow_the_installed_backend_and_yield_to_the_user():
    from fractal_jax import runtime
    cpu = runtime.default_xla_flags("", set())
    assert cpu.split() == list(runtime.CPU_XLA_FLAGS)
    # A GPU install gets the determinism flag and none of the CPU build's flags.
    assert runtime.default_xla_flags("", {"xla_cuda13"}).split() == list(runtime.GPU_XLA_FLAGS)
    assert runtime.default_xla_flags("", {"xla_rocm7"}).split() == list(runtime.GPU_XLA_FLAGS)
    assert runtime.default_xla_flags("--a=1", {"libtpu"}) == "--a=1"
    mine = "--xla_gpu_deterministic_ops=false"
    assert runtime.default_xla_flags(mine, {"xla_cuda12"}) == mine
    # The machine running this test has no accelerator plugin.
    assert runtime.installed_plugins() == set()
