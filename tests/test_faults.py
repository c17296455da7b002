"""Fault injection: every promise of the README's "Fault tolerance" section, with the damage done
for real: processes killed with SIGKILL, checkpoint files truncated or deleted, writes that fail,
a second run on a busy workdir, NaN inputs, config mistakes and broken data files."""
import builtins
import errno
import glob
import json
import logging
import os
import pathlib
import random
import shutil
import signal
import subprocess
import sys
import time

import chex
import jax
import numpy as np
import pytest
from PIL import Image

from fractal_jax.data import sources
from fractal_jax.training import checkpoint, experiment, lock, loop, sweep
from test_training import ROOT, TINY, final_state, metrics_text, tiny_config

# Orbax's background writers that a failed save abandons complain when they are collected.
pytestmark = [pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
              pytest.mark.filterwarnings("ignore:coroutine .* was never awaited:RuntimeWarning")]


def main_command(workdir, data_dir, *args):
    return [sys.executable, "-m", "fractal_jax.main", f"--config={TINY}", f"--workdir={workdir}",
            f"--config.data_dir={data_dir}", *args]


def start(command, log):
    """Starts `command` in the repository with its output going to the file `log`."""
    with open(log, "w") as out:
        return subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)


def run_to_end(command, log):
    """Runs `command` to its end; returns (exit status, output)."""
    code = start(command, log).wait(timeout=600)
    return code, log.read_text()


def copy_run(source, target, *, drop_after=None):
    """Copies a workdir; with `drop_after`, as a run killed just after that checkpoint left it."""
    shutil.copytree(source, target)
    if drop_after is not None:
        for step in checkpoint_steps(target):
            if step > drop_after:
                shutil.rmtree(os.path.join(target, "checkpoints", str(step)))
    return target


def checkpoint_steps(workdir):
    """The complete (renamed into place) checkpoint steps on disk."""
    directory = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(directory):
        return []
    return sorted(int(d) for d in os.listdir(directory) if d.isdigit())


def assert_same_run(workdir, reference_dir):
    assert metrics_text(workdir) == metrics_text(reference_dir)
    chex.assert_trees_all_equal(final_state(workdir), final_state(reference_dir))


# ----- killed at any moment --------------------------------------------------------------------

def _wait_for(proc, condition, timeout=300):
    """Polls `condition()` until it holds (True) or the process ends (False)."""
    deadline = time.time() + timeout
    while proc.poll() is None and time.time() < deadline:
        if condition():
            return True
        time.sleep(0.002)
    return False


def _saving(workdir, step):
    """True while Orbax writes checkpoint `step` (its temporary directory exists)."""
    directory = os.path.join(workdir, "checkpoints")
    return os.path.isdir(directory) and any(
        d.startswith(f"{step}.orbax-checkpoint-tmp") for d in os.listdir(directory))


def _kill(proc):
    proc.kill()  # SIGKILL
    proc.wait()


def _holds_lock(workdir, proc):
    path = pathlib.Path(workdir, lock.LOCK_FILE)
    return path.exists() and f"pid {proc.pid} " in path.read_text()


@pytest.mark.slow
def test_killed_at_random_moments_ends_as_the_uninterrupted_run(reference, tmp_path, data_dir):
    """SIGKILL while a checkpoint is written, at a random moment, and while a later checkpoint is
    written; the restart ends bit-identical to the uninterrupted run.

    Checkpoints every 3 steps (a resumable key: the results equal the reference run's) give four
    saves to kill into. The moments come from a fixed seed.
    """
    ref_dir, _ = reference
    workdir = str(tmp_path / "run")
    command = main_command(workdir, data_dir, "--config.checkpoint_every_steps=3")
    rng = random.Random(0)
    newest = 0  # the newest complete checkpoint
    for attempt, moment in enumerate(["saving", "random", "saving"]):
        log = tmp_path / f"attempt{attempt}.log"
        proc = start(command, log)
        try:
            if moment == "saving":
                step = rng.choice([s for s in (3, 6, 9, 12) if s > newest][:2])
                _wait_for(proc, lambda: _saving(workdir, step))
                time.sleep(rng.uniform(0.0, 0.05))
            else:
                assert _wait_for(proc, lambda: _holds_lock(workdir, proc)), log.read_text()
                # A second run on the busy workdir is refused, naming the holder.
                with pytest.raises(lock.WorkdirLockError, match=f"pid {proc.pid} on host"):
                    loop.train(tiny_config(data_dir), workdir)
                time.sleep(rng.uniform(0.0, 0.5))
            assert proc.poll() is None, log.read_text()  # killed before it finished
        finally:
            _kill(proc)
        if attempt:  # the run killed before this one left its lock file behind
            assert "taking over the lock" in log.read_text(), log.read_text()
        # A kill never costs a complete checkpoint: the newest one on disk only moves forward.
        steps = checkpoint_steps(workdir)
        assert (steps[-1] if steps else 0) >= newest, (attempt, steps, log.read_text())
        newest = steps[-1] if steps else 0
    code, out = run_to_end(command, tmp_path / "final.log")
    assert code == 0, out
    assert_same_run(workdir, ref_dir)
    # Run again on the finished workdir: it resumes at the end and changes nothing.
    code, out = run_to_end(command, tmp_path / "again.log")
    assert code == 0 and "full network" in out, out
    assert_same_run(workdir, ref_dir)
    assert os.path.getsize(os.path.join(workdir, "curves.png")) > 1000


SWEEP = sweep.Sweep(seeds=(0, 1), p_local=(0.0, 0.3), p_global=(0.5,))


@pytest.mark.slow
def test_killed_sweep_ends_as_the_uninterrupted_sweep(tmp_path, data_dir):
    """SIGKILL while members' checkpoints are written (all four members train together, so a
    kill between their saves leaves some a checkpoint ahead); the restart ends bit-identical.

    With the CPU's default strategy ("loop"). The vmapped strategy's common-step resume is
    tested in-process (test_sweep.py): its program gave last-digit differences between a pytest
    process and a fresh one, so comparing a subprocess with an in-process reference fails there.
    """
    ref_dir = str(tmp_path / "reference")
    sweep.train_sweep(tiny_config(data_dir), ref_dir, SWEEP)
    workdir = str(tmp_path / "run")
    command = [sys.executable, "experiments/sweep_drop_path.py", f"--config={TINY}",
               f"--workdir={workdir}", f"--config.data_dir={data_dir}",
               "--config.checkpoint_every_steps=3", "--seeds=0,1", "--p_local=0,0.3",
               "--p_global=0.5"]
    members = [sweep.member_dir(workdir, m) for m in SWEEP.members]
    rng = random.Random(0)
    common = 0  # the step every member has a checkpoint of: where a restart resumes
    for attempt, member in enumerate((rng.randrange(0, 2), rng.randrange(2, 4))):
        log = tmp_path / f"attempt{attempt}.log"
        step = rng.choice([s for s in (3, 6, 9, 12) if s > common][:2])
        proc = start(command, log)
        try:
            _wait_for(proc, lambda: _saving(members[member], step))
            time.sleep(rng.uniform(0.0, 0.05))
            assert proc.poll() is None, log.read_text()  # killed before it finished
        finally:
            _kill(proc)
        steps = [checkpoint_steps(m) for m in members]
        assert min(s[-1] if s else 0 for s in steps) >= common, (attempt, steps)
        common = min(s[-1] if s else 0 for s in steps)
    code, out = run_to_end(command, tmp_path / "final.log")
    assert code == 0, out
    for member, reference_member in zip(members, SWEEP.members):
        assert_same_run(member, sweep.member_dir(ref_dir, reference_member))


# ----- damaged checkpoints -----------------------------------------------------------------------

def _truncate_array_data(step_dir):
    for path in glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True):
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)


def _delete_metadata(step_dir):
    os.remove(os.path.join(step_dir, "metadata", "metadata"))


@pytest.mark.parametrize("damage", [_truncate_array_data, _delete_metadata])
def test_damaged_latest_checkpoint_is_named_set_aside_and_the_run_finishes(
        reference, tmp_path, data_dir, caplog, damage):
    ref_dir, _ = reference
    workdir = copy_run(ref_dir, str(tmp_path / "run"))
    damaged = os.path.join(workdir, "checkpoints", "12")
    damage(damaged)
    with caplog.at_level(logging.WARNING):
        loop.train(tiny_config(data_dir), workdir)
    assert f"checkpoint {damaged} is damaged" in caplog.text
    assert_same_run(workdir, ref_dir)  # resumed from step 6
    # The damaged checkpoint was moved aside, not deleted.
    (kept,) = os.listdir(os.path.join(workdir, checkpoint.DAMAGED_DIR))
    assert kept.startswith("12-") and f"to {os.path.join(workdir, checkpoint.DAMAGED_DIR)}" \
        in caplog.text


# ----- writes that fail --------------------------------------------------------------------------

def test_disk_full_while_saving_is_a_clear_error_and_keeps_the_previous_checkpoint(
        reference, tmp_path, data_dir, monkeypatch):
    ref_dir, _ = reference
    workdir = copy_run(ref_dir, str(tmp_path / "run"), drop_after=6)
    checkpoints = os.path.join(workdir, "checkpoints")
    real_open = builtins.open

    def full_disk_open(file, mode="r", *args, **kwargs):
        # Every write under checkpoints/ fails, in whatever thread Orbax makes it.
        if str(file).startswith(checkpoints) and set(mode) & set("wax+"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(file))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", full_disk_open)
    with pytest.raises(checkpoint.CheckpointSaveError) as error:
        loop.train(tiny_config(data_dir), workdir)
    monkeypatch.undo()
    message = str(error.value)
    assert f"checkpoint 12 to {checkpoints} failed" in message
    assert "No space left on device" in message and "steps [6]) are intact" in message
    assert checkpoint_steps(workdir) == [6]
    loop.train(tiny_config(data_dir), workdir)  # once there is space again
    assert_same_run(workdir, ref_dir)


READ_ONLY = """
import ctypes, os, sys
if os.geteuid() == 0 and "--as-root-without-override" not in sys.argv:
    # Root writes where file permissions forbid it: drop that power (CAP_DAC_OVERRIDE,
    # CAP_DAC_READ_SEARCH) from the bounding set and exec this script again without it.
    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (1, 2):
        if libc.prctl(24, capability, 0, 0, 0):  # PR_CAPBSET_DROP
            sys.exit("NO PRCTL")
    os.execv(sys.executable, [sys.executable, *sys.argv, "--as-root-without-override"])

import numpy as np
from fractal_jax.training import checkpoint, lock

workdir = sys.argv[1]
state = {"w": np.arange(1000, dtype=np.float32)}
with checkpoint.Checkpointer(workdir) as c:
    c.save(1, state, metadata={"step": 1})
for d in (os.path.join(workdir, "checkpoints"), workdir):
    os.chmod(d, 0o555)
try:
    open(os.path.join(workdir, "probe"), "w")
    sys.exit("NOT READ-ONLY")
except PermissionError:
    pass
c = checkpoint.Checkpointer(workdir)
try:
    c.save(2, {"w": state["w"] + 1}, metadata={"step": 2})
    c.wait()
except checkpoint.CheckpointSaveError as e:
    print("SAVE ERROR:", e)
try:
    with lock.workdir_lock(workdir):
        pass
except lock.WorkdirLockError as e:
    print("LOCK ERROR:", e)
restored, metadata = c.restore({"w": np.zeros(1000, np.float32)})
print("RESTORED:", metadata["step"], bool((restored["w"] == state["w"]).all()))
"""


@pytest.mark.skipif(sys.platform != "linux", reason="needs Linux (prctl) when run as root")
def test_read_only_workdir_fails_at_once_with_a_clear_error_and_keeps_its_checkpoint(tmp_path):
    workdir = str(tmp_path / "run")
    script = tmp_path / "read_only.py"
    script.write_text(READ_ONLY)
    began = time.time()
    try:
        out = subprocess.run([sys.executable, str(script), workdir], text=True,
                             capture_output=True, timeout=300,
                             env={**os.environ, "PYTHONPATH": ROOT})
    finally:
        for d in (os.path.join(workdir, "checkpoints"), workdir):
            if os.path.isdir(d):
                os.chmod(d, 0o755)
    if "NO PRCTL" in out.stderr or "NOT READ-ONLY" in out.stderr:
        pytest.skip("cannot make a directory read-only here")
    assert out.returncode == 0, out.stderr[-3000:]
    assert time.time() - began < 60  # not Orbax's minutes-long wait for a directory
    checkpoints = os.path.join(workdir, "checkpoints")
    assert f"SAVE ERROR: Writing checkpoint 2 to {checkpoints} failed: PermissionError" \
        in out.stdout and "steps [1]) are intact" in out.stdout
    assert "LOCK ERROR: Cannot create the lock file" in out.stdout
    assert "RESTORED: 1 True" in out.stdout


# ----- non-finite loss ---------------------------------------------------------------------------

def _poison(monkeypatch, bad_step):
    """Makes the images of step `bad_step` NaN, as a corrupt input would."""
    batches = experiment.train_batches

    def poisoned(config, start_step, seed=None):
        for step, batch in enumerate(batches(config, start_step, seed),
                                     start=start_step + 1):
            yield {**batch, "image": batch["image"] * np.nan} if step == bad_step else batch

    monkeypatch.setattr(experiment, "train_batches", poisoned)


def test_nonfinite_loss_stops_at_its_step_and_skip_mode_skips_and_counts(
        tmp_path, data_dir, monkeypatch, caplog):
    workdir = str(tmp_path)
    _poison(monkeypatch, 5)
    stop = tiny_config(data_dir, checkpoint_every_steps=3)
    with pytest.raises(loop.NonFiniteLossError, match=r"At step 5 .*checkpoint \(step 3\)"):
        loop.train(stop, workdir)
    saved = final_state(workdir)
    assert int(saved["step"]) == 3
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(saved["params"]))
    # The remedy the error names: resume with nonfinite=skip. Step 5's batch is skipped, and
    # the count survives a resumption (here after step 6).
    with caplog.at_level(logging.WARNING):
        loop.train(tiny_config(data_dir, checkpoint_every_steps=3, num_train_steps=6,
                               nonfinite="skip"), workdir)
    loop.train(tiny_config(data_dir, checkpoint_every_steps=3, nonfinite="skip"), workdir)
    assert "at step 5: batch skipped (1 so far)" in caplog.text
    train = [r for r in map(json.loads, metrics_text(workdir).splitlines())
             if r["split"] == "train"]
    assert [(r["step"], r.get("nonfinite_skipped")) for r in train] == [
        (3, None), (6, 1), (9, 1), (12, 1)]
    assert all(np.isfinite(r["loss"]) for r in train)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(final_state(workdir)["params"]))


# ----- two runs on one workdir -------------------------------------------------------------------

def test_a_second_run_on_a_busy_workdir_is_refused_and_changes_nothing(tmp_path, data_dir):
    workdir = str(tmp_path)
    with lock.workdir_lock(workdir):
        with pytest.raises(lock.WorkdirLockError, match=f"pid {os.getpid()} on host"):
            loop.train(tiny_config(data_dir), workdir)
        with pytest.raises(lock.WorkdirLockError):
            experiment.move_aside(workdir)  # --fresh must not pull the workdir from under a live run
        assert os.listdir(workdir) == [lock.LOCK_FILE]
    assert (tmp_path / lock.LOCK_FILE).read_text() == ""  # released cleanly


def test_the_lock_of_a_killed_run_does_not_block_a_restart(tmp_path, caplog):
    killed = ("import os, signal, sys\nfrom fractal_jax.training.lock import workdir_lock\n"
              "with workdir_lock(sys.argv[1]):\n    os.kill(os.getpid(), signal.SIGKILL)\n")
    proc = subprocess.run([sys.executable, "-c", killed, str(tmp_path)], cwd=ROOT)
    assert proc.returncode == -signal.SIGKILL
    left = (tmp_path / lock.LOCK_FILE).read_text().strip()
    assert left.startswith("pid ")
    with caplog.at_level(logging.WARNING), lock.workdir_lock(str(tmp_path)):
        assert f"pid {os.getpid()} " in (tmp_path / lock.LOCK_FILE).read_text()
    assert f"from {left}, which ended without releasing it" in caplog.text


# ----- config mistakes ---------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, match", [
    ({"nonfinite": "ignore"}, r"nonfinite='ignore' is invalid: it must be one of 'stop', 'skip'"),
    ({"data.max_shift": -1}, r"data.max_shift=-1 is invalid"),
    ({"eval_batch_size": 0}, r"eval_batch_size=0 is invalid: it must be a positive integer"),
    ({"optim.momentum": 1.5}, r"optim.momentum=1.5 is invalid: it must be in \[0, 1\)"),
    ({"model.widths": (8, 8)}, r"widths has 2 entries but there are 3 blocks"),
])
def test_config_mistakes_are_refused_before_the_workdir_is_touched(
        reference, tmp_path, data_dir, overrides, match):
    new = str(tmp_path / "new")
    with pytest.raises(ValueError, match=match):
        loop.train(tiny_config(data_dir, **overrides), new)
    assert not os.path.exists(new)
    existing = copy_run(reference[0], str(tmp_path / "existing"))

    def snapshot():
        return {p: (os.path.getsize(p), os.path.getmtime(p))
                for p in glob.glob(os.path.join(existing, "**"), recursive=True)}

    before = snapshot()
    with pytest.raises(ValueError, match=match):
        loop.train(tiny_config(data_dir, **overrides), existing)
    assert snapshot() == before


@pytest.mark.slow
@pytest.mark.parametrize("override, message", [
    ("--config.optim.learnin_rate=0.1",
     "error: Unknown config key 'optim.learnin_rate'. Did you mean 'optim.learning_rate'?"),
    ("--config.batch_size=abc", "flag --config.batch_size=abc: invalid literal for int()"),
])
def test_command_line_config_mistakes_are_one_line_errors(tmp_path, data_dir, override, message):
    workdir = tmp_path / "run"
    code, out = run_to_end(main_command(workdir, data_dir, override), tmp_path / "log")
    assert code != 0 and message in out and "Traceback" not in out, out
    assert not workdir.exists()


# ----- bad data ----------------------------------------------------------------------------------

def _digits_npz(path, count, labels=None):
    rng = np.random.default_rng(0)
    labels = np.arange(count) % 10 if labels is None else np.asarray(labels)
    np.savez(path, images=rng.integers(0, 256, (count, 8, 8), dtype=np.uint8), labels=labels,
             class_names=np.array([str(d) for d in range(10)]))
    return str(path)


def _folder_with_broken_image(root):
    for split in ("train", "test"):
        (root / split / "0").mkdir(parents=True)
        for i in range(40):
            Image.fromarray(np.full((8, 8), i, np.uint8)).save(root / split / "0" / f"{i}.png")
    (root / "train" / "0" / "broken.png").write_bytes(b"\x89PNG truncated")
    return str(root)


@pytest.mark.parametrize("dataset, make, match", [
    ("npz", lambda p: _digits_npz(p / "bad.npz", 40, labels=[0] * 7 + [12] + [1] * 32),
     r"bad\.npz: label 12 of example 7 is out of range \(expected 0\.\.9\)"),
    ("npz", lambda p: _digits_npz(p / "empty.npz", 0), r"empty\.npz: the split is empty"),
    ("npz", lambda p: _digits_npz(p / "small.npz", 10),
     r"'train' split of npz has 10 examples, fewer than one batch \(batch_size=30\)"),
    ("image_folder", _folder_with_broken_image, r"train/0/broken\.png: cannot read image"),
])
def test_bad_local_data_is_named_before_the_workdir_is_touched(
        tmp_path, data_dir, dataset, make, match):
    config = tiny_config(data_dir, dataset=dataset, **{"data.path": make(tmp_path)})
    with pytest.raises(sources.DataError, match=match):
        loop.train(config, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()
