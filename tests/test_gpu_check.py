"""experiments/gpu_check.py: its tiny run writes every row, reruns compare bit for bit, and a
difference is found (its GPU numbers are measured by running it, never asserted here)."""
import json

import jax.numpy as jnp
import pytest

from experiments import gpu_check
from fractal_jax import config as config_lib
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


def test_digits_runs_of_any_length_are_valid_configs():
    # 100 steps once failed on a GPU: checkpoints must fall on log-window boundaries.
    for steps in (4, 100, 120, 1500):
        config = config_lib.validate(gpu_check.digits_config(tiny=False, steps=steps))
        assert config.num_train_steps == steps
        assert config.checkpoint_every_steps % config.log_every_steps == 0


def test_the_budget_is_shared_in_priority_order(tmp_path):
    # A spent budget skips every section after the first, and each still gets its entry.
    result = gpu_check.main(["--tiny", "--budget", "0.001", "--sections", "devices,memory",
                             "--out", str(tmp_path)])
    statuses = {k: v["status"] for k, v in result["sections"].items()}
    assert statuses["devices"] == "done" or statuses["devices"].startswith("skipped")
    assert statuses["memory"] == "skipped (budget spent)"
    assert "## (g) peak device memory" in (tmp_path / "gpu_check.md").read_text()


@pytest.mark.slow
def test_the_tiny_check_runs_every_section_and_reruns_are_bit_identical(tmp_path):
    result = gpu_check.main(["--tiny", "--out", str(tmp_path)])
    assert result["mode"] == "tiny"
    sections = result["sections"]
    assert list(sections) == [name for name, _, _ in gpu_check.SECTIONS]
    assert all(s["status"] == "done" and s["rows"] for s in sections.values()), sections
    assert json.loads((tmp_path / "gpu_check.json").read_text())["sections"] == sections
    text = (tmp_path / "gpu_check.md").read_text()
    checks = {r["check"]: r for s in sections.values() for r in s["rows"]}
    assert all(f"| {check} |" in text for check in checks)
    for flag in (gpu_check.NO_DETERMINISM_FLAG, gpu_check.DETERMINISM_FLAG):
        row = checks[f"bit-identical reruns, {flag}"]
        assert row["result"] == "yes" and "0 of 35 arrays differ" in row["detail"], row
    # Every layer lever that differs from this backend's defaults has its ratio row.
    for option, value in gpu_check.layer_levers("cpu"):
        assert f"masked step, {option}={value}" in checks
    for k in gpu_check.TINY.sweep_sizes:
        assert f"vmapped ÷ sequential, {k} models" in checks
    assert "train images/s, one lax.switch program" in checks
    assert "largest XLA temporary memory" in checks  # CPUs report no device memory peak
