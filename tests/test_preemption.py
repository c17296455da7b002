"""Stopping on request: SIGTERM / SIGINT stop a run or a sweep after the step in flight with a
checkpoint of it and exit status 75, a second signal cannot break the save, the same command
resumes bit-identically (also in the middle of a log window), and the SLURM array script
requeues a stopped task. Also `--config.profile_steps` (traces, unchanged results)."""
import glob
import json
import os
import random
import re
import signal
import subprocess
import sys

import chex
import pytest

from fractal_jax.training import loop, preemption, profiling, sweep
from fractal_jax.training.checkpoint import read_metadata
from test_faults import _saving, _wait_for, assert_same_run, checkpoint_steps, main_command
from test_sweep import SWEEP
from test_training import ROOT, TINY, final_state, metrics_text, tiny_config

LONG = 36  # steps of the subprocess runs: time for a signal to land mid-run


def test_stop_request_records_the_first_signal_and_restores_the_handlers():
    before = signal.getsignal(signal.SIGTERM)
    with preemption.StopRequest() as stop:
        assert not stop.should_stop()
        signal.raise_signal(signal.SIGTERM)
        signal.raise_signal(signal.SIGINT)  # while stopping: logged, not a KeyboardInterrupt
        assert stop.should_stop() and stop.signal_name == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_stop_inside_a_log_window_resumes_bit_identically(reference, tmp_path, data_dir,
                                                            monkeypatch):
    """Stopped after step 4 (log windows end at 3, 6, ...; checkpoints at 6, 12): the checkpoint
    of step 4 carries the window's step, and the resumed run ends as the uninterrupted one."""
    workdir = str(tmp_path / "run")
    steps = iter(range(1, 100))
    monkeypatch.setattr(preemption.StopRequest, "should_stop", lambda self: next(steps) == 4)
    with pytest.raises(preemption.Preempted, match="stopped after step 4") as stopped:
        loop.train(tiny_config(data_dir), workdir)
    assert stopped.value.step == 4 and checkpoint_steps(workdir) == [4]
    assert len(read_metadata(workdir)["train_window"]) == 1
    monkeypatch.undo()
    loop.train(tiny_config(data_dir), workdir)
    assert_same_run(workdir, reference[0])


def _wait_for_train_record(proc, workdir, step):
    """Waits until the run's metrics hold a train record of `step` or later."""
    def reached():
        path = os.path.join(workdir, "metrics.jsonl")
        if not os.path.exists(path):
            return False
        with open(path) as f:
            steps = [json.loads(line)["step"] for line in f if line.endswith("\n")]
        return bool(steps) and max(steps) >= step
    return _wait_for(proc, reached)


def _stopped_step(output):
    match = re.search(r"stopped after step (\d+)", output)
    assert match, output
    return int(match[1])


@pytest.fixture(scope="module")
def long_reference(tmp_path_factory, data_dir):
    """The uninterrupted tiny run of LONG steps (in-process, as main would run it)."""
    workdir = str(tmp_path_factory.mktemp("long"))
    loop.train(tiny_config(data_dir, num_train_steps=LONG), workdir)
    return workdir


@pytest.mark.slow
def test_signals_stop_the_run_after_a_checkpoint_and_the_rerun_matches(long_reference,
                                                                       tmp_path, data_dir):
    """SIGTERM at a random step, then SIGINT while that stop's checkpoint is written; then SIGINT
    alone at a later random step. Each stop exits 75 with a checkpoint of the step it names; the
    final rerun ends bit-identical to the uninterrupted run."""
    workdir = str(tmp_path / "run")
    command = main_command(workdir, data_dir, f"--config.num_train_steps={LONG}")
    rng = random.Random(0)
    stopped = 0
    for attempt, signals in enumerate([(signal.SIGTERM, signal.SIGINT), (signal.SIGINT,)]):
        log = tmp_path / f"attempt{attempt}.log"
        with open(log, "w") as out:
            proc = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        try:
            target = rng.randrange(stopped + 3, stopped + 16)
            assert _wait_for_train_record(proc, workdir, target), log.read_text()
            proc.send_signal(signals[0])
            if len(signals) > 1:  # again, while the stop's checkpoint is being written
                assert _wait_for(proc, lambda: any(_saving(workdir, s)
                                                   for s in range(target, LONG)))
                proc.send_signal(signals[1])
            code = proc.wait(timeout=300)
        finally:
            proc.kill()
        output = log.read_text()
        assert code == preemption.EXIT_PREEMPTED, output
        assert f"{signals[0].name} received" in output
        if len(signals) > 1:
            assert f"{signals[1].name} received while stopping" in output
        stopped = _stopped_step(output)
        assert target <= stopped < LONG and stopped in checkpoint_steps(workdir), output
        # The stop's checkpoint is complete and names its step.
        assert read_metadata(workdir, stopped)["step"] == stopped
    code = subprocess.run(command, cwd=ROOT, capture_output=True, timeout=600).returncode
    assert code == 0
    assert_same_run(workdir, long_reference)


# What `srun` does for the tasks of one node: one process per task, with its rank, and SIGTERM
# passed on to each; its status is the largest of theirs.
STAND_IN_SRUN = """#!/bin/bash
pids=()
for ((i = 0; i < SLURM_NTASKS; i++)); do
  SLURM_PROCID=$i SLURM_LOCALID=$i "$@" &
  pids+=($!)
done
trap 'kill -TERM "${pids[@]}" 2>/dev/null' TERM
status=0
for p in "${pids[@]}"; do
  while true; do
    wait "$p"; s=$?
    if [ "$s" -gt 128 ] && kill -0 "$p" 2>/dev/null; then continue; fi
    break
  done
  if [ "$s" -gt "$status" ]; then status=$s; fi
done
exit "$status"
"""


@pytest.mark.slow
@pytest.mark.parametrize("tasks", [1, 2])
def test_sigterm_to_a_slurm_array_task_stops_the_sweep_requeues_it_and_it_resumes(
        loop_sweep, tmp_path, data_dir, tasks):
    """experiments/slurm_sweep.sh as task 0 of an array, with one process or two (started by
    srun, here a stand-in, as one JAX job): SLURM's SIGTERM to the batch shell reaches the
    sweep, which stops after a checkpoint (status 75), and the script requeues its task (a
    stand-in `scontrol` records the call). Rerun, the sweep ends as the uninterrupted one,
    member by member, bit for bit (two processes: it finishes and writes its results)."""
    from fractal_jax.launch import free_port
    workdir = str(tmp_path / "sweep")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    requeued = tmp_path / "requeued"
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {requeued}\n')
    (bin_dir / "srun").write_text(STAND_IN_SRUN)
    for tool in ("scontrol", "srun"):
        (bin_dir / tool).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHON": sys.executable,
           "CONFIG": TINY, "WORKDIR": workdir, "SEEDS": "0,1", "P_LOCAL": "0,0.3",
           "P_GLOBAL": "0.5", "SLURM_ARRAY_JOB_ID": "41", "SLURM_ARRAY_TASK_ID": "0",
           "SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_COUNT": "1"}
    if tasks > 1:
        env.update(SLURM_JOB_ID="43", SLURM_NTASKS=str(tasks), SLURM_STEP_NODELIST="localhost",
                   SLURM_STEP_NUM_NODES="1", JAX_COORDINATOR_PORT=str(free_port()))
    command = ["bash", "experiments/slurm_sweep.sh", f"--config.data_dir={data_dir}"]
    log = tmp_path / "task.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    first = os.path.join(workdir, "members", SWEEP.members[0].name)
    try:
        target = random.Random(1).randrange(3, 9)
        assert _wait_for_train_record(proc, first, target), log.read_text()
        proc.send_signal(signal.SIGTERM)  # to the batch shell only, as --signal=B:TERM does
        code = proc.wait(timeout=300)
    finally:
        proc.kill()
    output = log.read_text()
    assert code == preemption.EXIT_PREEMPTED, output
    assert requeued.read_text() == "requeue 41_0\n"
    assert "still missing" not in output and "results:" not in output
    stopped = _stopped_step(output)
    for member in SWEEP.members:
        assert stopped in checkpoint_steps(os.path.join(workdir, "members", member.name))
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    if tasks > 1:  # another device count than the in-process reference
        assert "results:" in result.stdout
        return
    for member in SWEEP.members:
        assert_same_run(os.path.join(workdir, "members", member.name),
                        os.path.join(loop_sweep[0], "members", member.name))


def test_profile_steps_write_a_trace_and_a_host_timeline_and_change_nothing(
        reference, tmp_path, data_dir):
    workdir = str(tmp_path / "run")
    loop.train(tiny_config(data_dir, profile_steps=(2, 4)), workdir)
    directory = os.path.join(workdir, profiling.PROFILE_DIR)
    assert glob.glob(os.path.join(directory, "plugins", "profile", "*", "*.xplane.pb"))
    assert glob.glob(os.path.join(directory, "plugins", "profile", "*", "perfetto_trace.json.gz"))
    with open(os.path.join(directory, profiling.TIMELINE_FILE)) as f:
        timeline = [json.loads(line) for line in f]
    assert [t["step"] for t in timeline] == [2, 3, 4]
    assert all(t["device_ms"] >= 0 and t["data_wait_ms"] >= 0 for t in timeline)
    assert metrics_text(workdir) == metrics_text(reference[0])
    chex.assert_trees_all_equal(final_state(workdir), final_state(reference[0]))


@pytest.mark.parametrize("steps", [(0, 2), (3, 2), (1, 2, 3), ("a",)])
def test_bad_profile_steps_are_clear_errors(steps, tmp_path, data_dir):
    with pytest.raises(ValueError, match="profile_steps=.* is invalid: it must be A,B"):
        loop.train(tiny_config(data_dir, profile_steps=steps), str(tmp_path))
    assert not os.listdir(tmp_path)


def test_a_signal_between_two_chunks_stops_the_sweep_before_the_next(loop_sweep, tmp_path,
                                                                     data_dir, monkeypatch):
    workdir = str(tmp_path / "sweep")
    train = loop.Trainer.train

    def train_then_signal(self, *args, **kwargs):
        results = train(self, *args, **kwargs)
        signal.raise_signal(signal.SIGTERM)  # after the chunk's own StopRequest has ended
        return results

    monkeypatch.setattr(loop.Trainer, "train", train_then_signal)
    with pytest.raises(preemption.Preempted, match="stopped before training the next members"):
        sweep.train_sweep(tiny_config(data_dir), workdir, SWEEP, chunk=1)
    assert sweep.member_results(tiny_config(data_dir), workdir, SWEEP)[1:] == [None] * 3
    monkeypatch.undo()
    assert sweep.train_sweep(tiny_config(data_dir), workdir, SWEEP, chunk=1) == loop_sweep[1]
