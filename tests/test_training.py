"""End-to-end training: outputs, bit-identical reruns, exact resume after SIGKILL, 8 devices,
and clear errors for bad input."""
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time

import chex
import numpy as np
import orbax.checkpoint as ocp
import pytest

from fractal_jax import config as config_lib
from fractal_jax.training import loop

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
    steps = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
    path = os.path.join(workdir, "checkpoints", str(steps[-1]), "state")
    return ocp.StandardCheckpointer().restore(path)


def metrics_text(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return f.read()


def run_main(workdir, data_dir, *args, env=None, wait=True):
    cmd = [sys.executable, "-m", "fractal_jax.main", f"--config={TINY}", f"--workdir={workdir}",
           f"--config.data_dir={data_dir}", *args]
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if not wait:
        return proc
    out, _ = proc.communicate(timeout=600)
    return proc.returncode, out


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tfds")


@pytest.fixture(scope="session")
def reference(tmp_path_factory, data_dir):
    """One uninterrupted tiny run: (workdir, final eval metrics)."""
    workdir = str(tmp_path_factory.mktemp("reference"))
    return workdir, loop.train(tiny_config(data_dir), workdir)


def test_training_writes_metrics_checkpoints_and_per_column_accuracy(reference):
    workdir, final = reference
    records = [json.loads(line) for line in metrics_text(workdir).splitlines()]
    train = [r for r in records if r["split"] == "train"]
    evals = [r for r in records if r["split"] == "test"]
    assert [r["step"] for r in train] == [3, 6, 9, 12]
    assert [r["step"] for r in evals] == [6, 12]
    for key in ("accuracy", "loss", "accuracy/column_1", "accuracy/column_2", "loss/column_2"):
        assert 0 <= evals[-1][key] < 10
    assert final["accuracy"] == evals[-1]["accuracy"]
    assert set(os.listdir(os.path.join(workdir, "checkpoints"))) >= {"6", "12"}
    assert os.path.getsize(os.path.join(workdir, "curves.png")) > 1000
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


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_result(reference, tmp_path, data_dir):
    """SIGKILL after the first checkpoint, run again: metrics and parameters as if never stopped."""
    ref_dir, _ = reference
    workdir = str(tmp_path / "run")
    proc = run_main(workdir, data_dir, wait=False)
    first = os.path.join(workdir, "checkpoints", "6")
    deadline = time.time() + 300
    while not os.path.isdir(first) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert os.path.isdir(first), proc.stdout.read()
    code, out = run_main(workdir, data_dir)
    assert code == 0, out
    assert metrics_text(workdir) == metrics_text(ref_dir)
    chex.assert_trees_all_equal(final_state(workdir), final_state(ref_dir))
    # Running again on a finished workdir resumes at the end and changes nothing.
    code, out = run_main(workdir, data_dir)
    assert code == 0 and "full network" in out, out
    assert metrics_text(workdir) == metrics_text(ref_dir)


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
    with pytest.raises(loop.WorkdirConflictError, match=r"(?s)model.widths.*--fresh"):
        loop.train(tiny_config(data_dir, **{"model.widths": (8, 8, 32)}), workdir)
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == before


def test_fresh_moves_the_old_run_aside(tmp_path):
    workdir = tmp_path / "run"
    (workdir / "checkpoints").mkdir(parents=True)
    moved = loop.move_aside(str(workdir))
    assert not workdir.exists() and os.path.isdir(os.path.join(moved, "checkpoints"))


def test_nan_loss_stops_with_the_step_and_keeps_the_checkpoint(tmp_path, data_dir):
    config = tiny_config(data_dir, num_train_steps=60, log_every_steps=1,
                         checkpoint_every_steps=1, eval_every_steps=60,
                         **{"optim.learning_rate": 1e6, "model.dropout": None})
    with pytest.raises(loop.NonFiniteLossError, match=r"at step \d+") as err:
        loop.train(config, str(tmp_path))
    saved = final_state(str(tmp_path))
    assert all(np.isfinite(x).all() for x in __import__("jax").tree.leaves(saved["params"]))
    assert f"step {int(saved['step'])}" in str(err.value)
