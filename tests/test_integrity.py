"""Results that survive bit-rot, divergence and full disks: every checkpoint reader verifies
what it read against the checksums saved with it, no checkpoint ever holds a NaN or an Inf, a
run that keeps diverging under nonfinite=skip stops with its own exit status, and a write that
fails is one clear line."""
import builtins
import errno
import glob
import json
import logging
import os
import random
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from fractal_jax import cli
from fractal_jax.analysis import runs
from fractal_jax.training import checkpoint, experiment, integrity, loop, metrics
from test_faults import assert_same_run, checkpoint_steps, copy_run
from test_training import ROOT, TINY, tiny_config


@pytest.fixture(scope="module")
def target(data_dir):
    """A freshly initialised train state of the tiny config: the restore target."""
    config = tiny_config(data_dir)
    info = experiment.dataset_info(config)
    trainer = loop.Trainer(config, experiment.build_model(config, info.num_classes), info)
    return trainer.init_state(config)


def flip_a_byte(path, rng):
    data = bytearray(open(path, "rb").read())
    position = rng.randrange(len(data))
    data[position] ^= 1 << rng.randrange(8)
    with open(path, "wb") as f:
        f.write(bytes(data))


def same_arrays(a, b):
    a, b = integrity.host_arrays(a), integrity.host_arrays(b)
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_a_flipped_byte_anywhere_in_the_newest_checkpoint_never_restores_wrong_values(
        reference, target, tmp_path, caplog):
    """One byte flipped at a random position (fixed seed) in each file of the newest checkpoint:
    the restore returns exactly what was saved at the step it names, the newest one when the
    file does not matter to it, else the one before, with one warning and no traceback."""
    ref_dir, _ = reference
    newest = checkpoint_steps(ref_dir)[-1]
    saved = {s: checkpoint.read_state(ref_dir, s) for s in checkpoint_steps(ref_dir)}
    files = sorted(os.path.relpath(f, ref_dir) for f in glob.glob(
        os.path.join(ref_dir, "checkpoints", str(newest), "**"), recursive=True)
        if os.path.isfile(f))
    kinds = {os.path.basename(f) if "/d/" not in f else "array data" for f in files}
    assert {"array data", "metadata", "manifest.ocdbt", "_METADATA"} <= kinds
    rng = random.Random(0)
    fell_back = []
    for i, name in enumerate(files):
        workdir = copy_run(ref_dir, str(tmp_path / f"run{i}"))
        flip_a_byte(os.path.join(workdir, name), rng)
        caplog.clear()
        with caplog.at_level(logging.WARNING), checkpoint.Checkpointer(workdir) as saver:
            state, _, step = saver.restore_latest_good(target)
        assert same_arrays(state, saved[step]), name
        if step != newest:
            fell_back.append(name)
            assert f"checkpoints/{newest} is damaged" in caplog.text, name
        assert "Traceback" not in caplog.text
    # The metadata (its own digest) and the state's merged array data are always caught.
    assert f"checkpoints/{newest}/metadata/metadata" in fell_back
    assert any(f.startswith(f"checkpoints/{newest}/state/d/") for f in fell_back)


def test_every_reader_verifies(reference, tmp_path):
    """Analysis reads (state, BatchNorm statistics of the evaluation, metadata) refuse what
    differs from what was saved: a value changed inside an array file, as bit-rot would."""
    ref_dir, _ = reference
    newest = checkpoint_steps(ref_dir)[-1]
    for item, read in (("state", checkpoint.read_state),
                       (checkpoint.EVAL_STATS_ITEM, checkpoint.read_eval_batch_stats)):
        workdir = copy_run(ref_dir, str(tmp_path / item))
        tree = read(workdir, newest)
        # The item rewritten with one value changed under the old metadata: what rot looks like.
        path = os.path.join(workdir, "checkpoints", str(newest), item)
        shutil.rmtree(path)
        flat = integrity.host_arrays(tree)
        last = list(flat)[-1]
        flat[last] = flat[last] + np.asarray(1, flat[last].dtype)
        with ocp.PyTreeCheckpointer() as writer:
            writer.save(path, jax.tree.unflatten(jax.tree.structure(tree), list(flat.values())))
        with pytest.raises(checkpoint.CheckpointError, match=f"{item} differ from what was"):
            read(workdir, newest)
    workdir = copy_run(ref_dir, str(tmp_path / "metadata"))
    path = os.path.join(workdir, "checkpoints", str(newest), "metadata", "metadata")
    with open(path) as f:
        metadata = json.load(f)
    metadata["step"] += 1  # valid JSON, different content
    with open(path, "w") as f:
        json.dump(metadata, f)
    with pytest.raises(checkpoint.CheckpointError, match="metadata does not match"):
        checkpoint.read_metadata(workdir, newest)
    with pytest.raises(checkpoint.CheckpointError):
        runs.load_run(workdir, step=newest)


def test_a_flipped_byte_in_the_newest_checkpoint_resumes_from_the_one_before(
        reference, tmp_path, data_dir, caplog):
    """The run says so, resumes from the previous step and ends equal to an uninterrupted run."""
    ref_dir, _ = reference
    workdir = copy_run(ref_dir, str(tmp_path / "run"))
    newest = checkpoint_steps(ref_dir)[-1]
    (data,) = glob.glob(os.path.join(workdir, "checkpoints", str(newest), "state", "d", "*"))
    flip_a_byte(data, random.Random(1))
    with caplog.at_level(logging.WARNING):
        loop.train(tiny_config(data_dir), workdir)
    assert f"checkpoints/{newest} is damaged" in caplog.text
    assert "falling back to an older checkpoint" in caplog.text
    assert_same_run(workdir, ref_dir)


def test_checkpoints_written_before_checksums_restore_with_a_note(reference, target, tmp_path,
                                                                  caplog):
    ref_dir, _ = reference
    workdir = copy_run(ref_dir, str(tmp_path / "old"))
    for step in checkpoint_steps(workdir):
        path = os.path.join(workdir, "checkpoints", str(step), "metadata", "metadata")
        with open(path) as f:
            metadata = json.load(f)
        for key in (integrity.CHECKSUMS, integrity.METADATA_DIGEST):
            metadata.pop(key)
        with open(path, "w") as f:
            json.dump(metadata, f)
    with caplog.at_level(logging.WARNING), checkpoint.Checkpointer(workdir) as saver:
        state, _, step = saver.restore_latest_good(target)
    assert step == checkpoint_steps(ref_dir)[-1]
    assert same_arrays(state, checkpoint.read_state(ref_dir, step))
    assert "written without checksums" in caplog.text


def test_no_checkpoint_ever_holds_a_nonfinite_value(tmp_path):
    with checkpoint.Checkpointer(str(tmp_path)) as saver:
        saver.save(1, {"w": jnp.ones(3)}, metadata={"step": 1})
        with pytest.raises(checkpoint.CheckpointSaveError,
                           match=r"Refusing to write checkpoint 2 .*non-finite values in w.*"
                                 r"steps \[1\]\) are intact"):
            saver.save(2, {"w": jnp.asarray([1.0, jnp.inf, 0.0])}, metadata={"step": 2})
    assert checkpoint.saved_steps(str(tmp_path)) == [1]


def test_a_diverging_run_that_skips_stops_past_its_bound_with_only_finite_checkpoints(
        tmp_path, data_dir):
    """A learning rate of 1e4 (constant) with nonfinite=skip: the run skips its non-finite steps,
    stops once more than nonfinite_max_consecutive follow each other, and every checkpoint it
    wrote is finite. From the command line it exits with EXIT_DIVERGED."""
    workdir = str(tmp_path / "run")
    args = ["--config.optim.learning_rate=1e4", "--config.optim.schedule=constant",
            "--config.nonfinite=skip", "--config.nonfinite_max_consecutive=3",
            "--config.num_train_steps=40", "--config.checkpoint_every_steps=3"]
    result = subprocess.run([sys.executable, "-m", "fractal_jax.main", f"--config={TINY}",
                             f"--workdir={workdir}", f"--config.data_dir={data_dir}", *args],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == loop.EXIT_DIVERGED, result.stderr
    error = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "4 consecutive steps were non-finite and skipped" in error[0]
    assert "nonfinite_max_consecutive=3" in error[0]
    assert "Traceback" not in result.stderr
    for step in checkpoint_steps(workdir):
        arrays = integrity.host_arrays(checkpoint.read_state(workdir, step))
        assert integrity.nonfinite_arrays(arrays) == [], step


def test_a_nonfinite_state_from_finite_loss_and_gradient_is_caught():
    from fractal_jax.training import steps
    state = {"params": {"w": jnp.asarray([1.0, 2.0])}, "bn": {"var": jnp.asarray([jnp.inf])}}
    assert not bool(steps.all_finite(state))
    assert bool(steps.all_finite({"w": jnp.ones(2), "count": jnp.asarray(3)}))


def test_a_full_disk_while_writing_metrics_is_one_error_line(reference, tmp_path, data_dir,
                                                              monkeypatch, capsys):
    ref_dir, _ = reference
    workdir = copy_run(ref_dir, str(tmp_path / "run"), drop_after=6)
    metrics_file = os.path.join(workdir, metrics.METRICS_FILE)
    real_open = builtins.open

    class FullDisk:
        """A metrics file whose writes fail with ENOSPC, as on a full disk."""

        def __init__(self, f):
            self._f = f

        def write(self, text):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __getattr__(self, name):
            return getattr(self._f, name)

    def full_disk_open(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        return FullDisk(f) if str(file) == metrics_file and "a" in mode else f

    monkeypatch.setattr(builtins, "open", full_disk_open)
    with pytest.raises(SystemExit) as stop, cli.one_line_errors():
        loop.train(tiny_config(data_dir), workdir)
    monkeypatch.undo()
    message = str(stop.value.code)
    assert message.startswith("error: Writing the metrics record of step 9 to "
                              f"{metrics_file} failed: No space left on device.")
    assert "\n" not in message and "Traceback" not in capsys.readouterr().err
    assert checkpoint_steps(workdir) == [6]
    loop.train(tiny_config(data_dir), workdir)  # once there is space again
    assert_same_run(workdir, ref_dir)


def test_damaged_checkpoints_set_aside_are_bounded(tmp_path):
    with checkpoint.Checkpointer(str(tmp_path), keep=10, keep_best=False) as saver:
        for step in range(1, 7):
            saver.save(step, {"w": jnp.full(2, step, jnp.float32)}, metadata={"step": step})
        saver.wait()
        for step in range(6, 1, -1):
            saver._set_aside([step])
    aside = os.listdir(tmp_path / checkpoint.DAMAGED_DIR)
    assert len(aside) == checkpoint.DAMAGED_KEEP
    assert sorted(int(n.split("-")[0]) for n in aside) == [2, 3, 4]  # the newest set aside
    assert checkpoint.saved_steps(str(tmp_path)) == [1]
