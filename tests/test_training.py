"""End-to-end training: outputs, bit-identical reruns, 8 devices, and clear errors for bad input.

The fixtures `data_dir` and `reference` (one uninterrupted tiny run) live in conftest.py; the
fault tests (kills, damaged checkpoints, full disks, locks) are in test_faults.py.
"""
import importlib.util
import json
import os
import subprocess
import sys

import chex
import numpy as np
import pytest

from fractal_jax import config as config_lib
from fractal_jax.training import checkpoint, experiment, loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "tests", "tiny_config.py")


def tiny_config(data_dir, **overrides):
    spec = importlib.util.spec_from_file_location("tiny_config", TINY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.data_dir = str(data_dir)
    for key, value in overrides.items():
        target = config
        *path, last = key.split(".")
        for part in path:
            target = target[part]
        target[last] = value
    return config


def final_state(workdir):
    return checkpoint.read_state(workdir, checkpoint.saved_steps(workdir)[-1])


def metrics_text(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return f.read()


def test_training_writes_metrics_checkpoints_and_per_column_accuracy(reference):
    workdir, final = reference
    records = [json.loads(line) for line in metrics_text(workdir).splitlines()]
    train = [r for r in records if r["split"] == "train"]
    evals = [r for r in records if r["split"] == "test"]
    assert [r["step"] for r in train] == [3, 6, 9, 12]
    assert [r["step"] for r in evals] == [6, 12]
    networks = ["", "/column_1", "/column_2"]
    assert set(evals[-1]) == {"step", "split"} | {
        f"{prefix}{metric}{network}" for prefix in ("", "stored_bn/")
        for metric in ("accuracy", "loss") for network in networks}
    for key, value in evals[-1].items():
        if "accuracy" in key:  # a count of the 297 test digits
            assert round(value * 297) == pytest.approx(value * 297, abs=1e-6), key
        elif "loss" in key:
            assert 0 < value < np.inf, key
    assert final == {k: v for k, v in evals[-1].items() if k not in ("step", "split")}
    assert set(os.listdir(os.path.join(workdir, "checkpoints"))) >= {"6", "12"}
    assert os.listdir(os.path.join(workdir, "tensorboard"))


def test_same_config_and_seed_are_bit_identical(reference, tmp_path, data_dir):
    workdir, _ = reference
    loop.train(tiny_config(data_dir), str(tmp_path))
    assert metrics_text(str(tmp_path)) == metrics_text(workdir)
    chex.assert_trees_all_equal(final_state(str(tmp_path)), final_state(workdir))


def test_another_seed_gives_another_run(reference, tmp_path, data_dir):
    loop.train(tiny_config(data_dir, seed=1, num_train_steps=3, checkpoint_every_steps=3,
                           eval_every_steps=3), str(tmp_path))
    first = json.loads(metrics_text(str(tmp_path)).splitlines()[0])
    assert first != json.loads(metrics_text(reference[0]).splitlines()[0])


EIGHT_DEVICES = """
import json, sys
from fractal_jax.runtime import configure_jax
configure_jax()
import jax
from fractal_jax.training import loop
sys.path.insert(0, "tests")
from test_training import tiny_config
assert jax.device_count() == 8
config = tiny_config(sys.argv[1], **json.loads(sys.argv[3]))
loop.train(config, sys.argv[2])
try:
    loop.train(tiny_config(sys.argv[1], batch_size=30), sys.argv[2] + "-odd")
except ValueError as e:
    print("ERROR:", e)
"""


@pytest.mark.slow
def test_eight_devices_match_one_device(tmp_path, data_dir):
    overrides = dict(batch_size=32, eval_batch_size=304, num_train_steps=3, log_every_steps=1,
                     eval_every_steps=3, checkpoint_every_steps=3)
    one = str(tmp_path / "one")
    loop.train(tiny_config(data_dir, **overrides), one)
    eight = str(tmp_path / "eight")
    env = {**os.environ, "XLA_FLAGS": os.environ.get("XLA_FLAGS", "")
           + " --xla_force_host_platform_device_count=8"}
    out = subprocess.run([sys.executable, "-c", EIGHT_DEVICES, str(data_dir), eight,
                          json.dumps(overrides)], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "batch_size=30 cannot be split over 8 devices" in out.stdout

    def losses(workdir):
        return [r["loss"] for r in map(json.loads, metrics_text(workdir).splitlines())
                if r["split"] == "train"]

    np.testing.assert_allclose(losses(eight), losses(one), rtol=2e-5)


# --- bad input -----------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides,match", [
    (dict(dataset="cifar11"), "dataset='cifar11'.*must be one of"),
    (dict(batch_size=0), "batch_size=0.*positive integer"),
    (dict(**{"drop_path.p_local": 1.5}), "drop_path.p_local=1.5"),
    (dict(checkpoint_every_steps=7), "multiple of log_every_steps"),
    (dict(**{"optim.name": "adam"}), "optim.name"),
])
def test_bad_config_values_name_the_key(overrides, match, data_dir):
    with pytest.raises(ValueError, match=match):
        config_lib.validate(tiny_config(data_dir, **overrides))


def test_unknown_config_key_suggests_the_right_one(data_dir):
    config = tiny_config(data_dir)
    with config.unlocked():
        config.batch_sizee = 3
    with pytest.raises(ValueError, match="Did you mean 'batch_size'"):
        config_lib.validate(config)


def test_unknown_model_is_a_clear_error(tmp_path, data_dir):
    with pytest.raises(ValueError, match="Did you mean 'fractalnet20'"):
        loop.train(tiny_config(data_dir, **{"model.name": "fractalnet2O"}), str(tmp_path))


def test_workdir_of_another_experiment_is_refused_and_kept(reference, data_dir):
    workdir, _ = reference
    before = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
    with pytest.raises(experiment.WorkdirConflictError, match=r"(?s)model.widths.*--fresh"):
        loop.train(tiny_config(data_dir, **{"model.widths": (8, 8, 32)}), workdir)
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == before


def test_fresh_moves_the_old_run_aside(tmp_path):
    workdir = tmp_path / "run"
    (workdir / "checkpoints").mkdir(parents=True)
    moved = experiment.move_aside(str(workdir))
    assert not workdir.exists() and os.path.isdir(os.path.join(moved, "checkpoints"))
