"""experiments/gpu_check.py: its tiny run writes every row, reruns compare bit for bit, and a
difference is found (its GPU numbers are measured by running it, never asserted here)."""
import json

import jax.numpy as jnp
import pytest

from experiments import gpu_check
from fractal_jax.training import checkpoint
from fractal_jax.training.metrics import METRICS_FILE


def test_peak_table_takes_the_most_specific_device_kind():
    assert gpu_check.peak_tflops("NVIDIA H100 PCIe", "bfloat16") == 756.0
    assert gpu_check.peak_tflops("NVIDIA H200", "float32") == 494.7
    assert gpu_check.peak_tflops("NVIDIA L40S", "bfloat16") == 362.0  # not the L4's
    assert gpu_check.peak_tflops("Tesla V100-SXM2-16GB", "bfloat16") is None  # measured instead
    assert gpu_check.peak_tflops("cpu", "float32") is None


def _run(workdir, kernel: float, loss: float) -> str:
    with checkpoint.Checkpointer(str(workdir)) as saver:
        saver.save(4, {"params": {"kernel": jnp.full(3, kernel)}, "step": jnp.asarray(4)},
                   metadata={"step": 4, "config": {"seed": 0}})
    (workdir / METRICS_FILE).write_text(json.dumps({"step": 4, "loss": loss}) + "\n")
    return str(workdir)


def test_runs_that_differ_in_one_bit_are_not_identical(tmp_path):
    a = _run(tmp_path / "a", 1.0, 0.5)
    assert gpu_check.compare_runs(a, _run(tmp_path / "b", 1.0, 0.5))["identical"]
    other = gpu_check.compare_runs(a, _run(tmp_path / "c", float(jnp.nextafter(1.0, 2.0)), 0.5))
    assert not other["identical"] and other["arrays_differing"] == 1
    assert 0 < other["max_abs_diff"] < 1e-6 and other["metrics_lines_differing"] == 0
    assert gpu_check.compare_runs(a, _run(tmp_path / "d", 1.0, 0.25))["metrics_lines_differing"] == 1


@pytest.mark.slow
def test_the_tiny_check_has_every_row_and_bit_identical_reruns(tmp_path):
    result = gpu_check.main(["--tiny", "--out", str(tmp_path)])
    assert result["mode"] == "tiny"
    assert [r["check"] for r in result["rows"]] == list(gpu_check.CHECKS)
    text = (tmp_path / "gpu_check.md").read_text()
    assert all(f"| {check} |" in text for check in gpu_check.CHECKS)
    assert json.loads((tmp_path / "gpu_check.json").read_text())["rows"] == result["rows"]
    assert set(result["determinism"]) == {"XLA defaults", gpu_check.DETERMINISM_FLAG}
    for label, same in result["determinism"].items():
        assert same["identical"] and same["arrays"] > 0 and same["metrics_lines"] > 0, label
    rows = {r["check"]: r["result"] for r in result["rows"]}
    assert rows["bit-identical reruns, XLA defaults"] == "yes"
    assert rows[f"bit-identical reruns, {gpu_check.DETERMINISM_FLAG}"] == "yes"
