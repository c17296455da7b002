"""Multi-process jobs, with real processes on this machine: JAX's distributed runtime over
127.0.0.1 (collectives over gloo), each process with its own CPU devices, started the way srun
or `python -m fractal_jax.launch` starts them. Equivalence with one process holding all the
devices, SIGTERM and SIGKILL of one process, an error on one process, refused mismatched
processes, sweeps, restores under another process count, and the launcher's exit statuses."""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from fractal_jax import launch
from fractal_jax.training import multihost, preemption
from test_faults import _wait_for, assert_same_run, checkpoint_steps
from test_preemption import _stopped_step, _wait_for_train_record
from test_training import ROOT, TINY, final_state, metrics_text

LONG = 24  # steps of the runs that are signalled: time for a signal to land mid-run
TIMEOUT_S = 5  # --config.host_timeout_s of the fault tests
FOUR_DEVICES = ["--config.batch_size=32"]  # splits over 4 devices (the tiny config's 30 does not)


def command(workdir, *args, module="fractal_jax.main", config=TINY):
    return [sys.executable, "-m", module, f"--config={config}", f"--workdir={workdir}", *args]


def slurm_environment(process_id, num_processes, port, devices=1):
    """What srun gives each task of a one-node job (JAX detects the cluster from it), with the
    coordinator port pinned so that parallel jobs cannot collide."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "JAX_NUM",
                                                                    "JAX_PROCESS"))}
    env.update(SLURM_JOB_ID="4242", SLURM_STEP_NODELIST="localhost",
               SLURM_NTASKS=str(num_processes), SLURM_PROCID=str(process_id),
               SLURM_LOCALID=str(process_id), SLURM_STEP_NUM_NODES="1",
               JAX_COORDINATOR_PORT=str(port),
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    return env


def start_job(cmd, num_processes, logs, devices=1, slurm=False, cwds=None, extra=None):
    """Starts the processes of one job; returns them. `extra[i]`: more arguments of process i."""
    port = launch.free_port()
    processes = []
    for i in range(num_processes):
        env = (slurm_environment(i, num_processes, port, devices) if slurm else
               launch.process_environment(i, num_processes, port, devices_per_process=devices))
        env["PYTHONPATH"] = ROOT  # also for a process started in another directory
        with open(logs / f"process{i}.log", "w") as out:
            processes.append(subprocess.Popen(
                cmd + list((extra or {}).get(i, ())), cwd=(cwds or {}).get(i, ROOT), env=env,
                stdout=out, stderr=subprocess.STDOUT))
    return processes


def finish(processes, timeout=600):
    """Waits for every process; returns their exit statuses (killing all on a time-out)."""
    try:
        return [p.wait(timeout=timeout) for p in processes]
    finally:
        for p in processes:
            p.kill()


def run_job(cmd, num_processes, logs, **kwargs):
    logs.mkdir(parents=True, exist_ok=True)
    return finish(start_job(cmd, num_processes, logs, **kwargs))


def one_process(cmd, devices, log):
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    log.write_text(result.stdout + result.stderr)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout + result.stderr


def output(logs, i):
    return (logs / f"process{i}.log").read_text()


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The tiny job of LONG steps as 1 process with 2 CPU devices."""
    workdir = tmp_path_factory.mktemp("single") / "run"
    one_process(command(workdir, f"--config.num_train_steps={LONG}"), 2,
                workdir.parent / "log.txt")
    return workdir


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    """The same job as 2 processes × 1 device, started as srun starts them."""
    root = tmp_path_factory.mktemp("two")
    workdir = root / "run"
    codes = run_job(command(workdir, "--config.distributed=True",
                            f"--config.num_train_steps={LONG}"), 2, root, slurm=True)
    assert codes == [0, 0], output(root, 0) + output(root, 1)
    return workdir, root


@pytest.mark.slow
def test_two_processes_train_exactly_as_one_process_with_both_devices(single, two):
    workdir, logs = two
    assert_same_run(workdir, single)
    # Process 0 alone reports; process 1 says nothing but what gloo prints about its peers.
    assert "Final evaluation" in output(logs, 0) and "accuracy" in output(logs, 0)
    quiet = [line for line in output(logs, 1).splitlines() if line and "Gloo" not in line]
    assert quiet == [], quiet
    records = [json.loads(line) for line in metrics_text(workdir).splitlines()]
    assert [r["step"] for r in records if r["split"] == "train"] == list(range(3, LONG + 1, 3))


@pytest.mark.slow
def test_sigterm_to_one_process_stops_both_after_the_same_step_and_the_rerun_matches(
        two, tmp_path):
    workdir = tmp_path / "run"
    cmd = command(workdir, f"--config.num_train_steps={LONG}")
    processes = start_job(cmd, 2, tmp_path)
    try:
        assert _wait_for_train_record(processes[0], str(workdir), 9), output(tmp_path, 0)
        processes[1].send_signal(signal.SIGTERM)
        codes = finish(processes)
    finally:
        for p in processes:
            p.kill()
    assert codes == [preemption.EXIT_PREEMPTED] * 2, output(tmp_path, 0) + output(tmp_path, 1)
    stopped = _stopped_step(output(tmp_path, 0))
    assert 9 <= stopped < LONG and stopped in checkpoint_steps(str(workdir))
    assert "SIGTERM (on another process)" in output(tmp_path, 0)
    assert "stopped" not in output(tmp_path, 1)  # process 1 stays quiet
    assert run_job(cmd, 2, tmp_path / "rerun") == [0, 0]
    assert_same_run(str(workdir), str(two[0]))


@pytest.mark.slow
def test_a_killed_process_ends_the_other_within_the_timeout_and_the_rerun_resumes(
        two, tmp_path):
    workdir = tmp_path / "run"
    cmd = command(workdir, f"--config.num_train_steps={LONG}",
                  f"--config.host_timeout_s={TIMEOUT_S}")
    processes = start_job(cmd, 2, tmp_path)
    try:
        assert _wait_for_train_record(processes[0], str(workdir), 9), output(tmp_path, 0)
        processes[1].send_signal(signal.SIGKILL)
        killed = time.monotonic()
        code = processes[0].wait(timeout=TIMEOUT_S + 60)
        took = time.monotonic() - killed
    finally:
        for p in processes:
            p.kill()
    text = output(tmp_path, 0)
    assert code == multihost.EXIT_PEER_FAILED, text
    assert f"error: process 1 was lost: no heartbeat for {TIMEOUT_S} s" in text
    assert "Traceback" not in text  # one line says what happened
    assert took < TIMEOUT_S + 30, took
    # The rerun resumes from the last complete checkpoint and ends as if never stopped.
    assert checkpoint_steps(str(workdir))
    assert run_job(cmd, 2, tmp_path / "rerun") == [0, 0]
    assert_same_run(str(workdir), str(two[0]))


@pytest.mark.slow
def test_an_error_on_one_process_ends_every_process_with_that_error(tmp_path):
    """Process 1 cannot read the dataset (a relative path that only process 0's working
    directory holds): it exits 1 with the data error; process 0 names it and exits at once."""
    here, elsewhere = tmp_path / "host0", tmp_path / "host1"
    here.mkdir(), elsewhere.mkdir()
    images = np.random.default_rng(0).integers(0, 255, (120, 8, 8), dtype=np.uint8)
    np.savez(here / "data.npz", images=images, labels=np.arange(120) % 10)
    workdir = tmp_path / "run"
    cmd = command(workdir, "--config.dataset=npz", "--config.data.path=data.npz",
                  f"--config.host_timeout_s={TIMEOUT_S}")
    began = time.monotonic()
    codes = run_job(cmd, 2, tmp_path, cwds={0: here, 1: elsewhere})
    took = time.monotonic() - began
    assert codes == [multihost.EXIT_PEER_FAILED, 1], output(tmp_path, 0) + output(tmp_path, 1)
    assert "error:" in output(tmp_path, 1) and "data.npz" in output(tmp_path, 1)
    assert ("error: another process of this job failed, so this one (process 0) stops: "
            "process 1 failed:") in output(tmp_path, 0)
    assert took < 60, took
    assert not os.path.exists(workdir / "checkpoints")


@pytest.mark.slow
def test_processes_with_different_configs_are_refused_before_any_work(tmp_path):
    workdir = tmp_path / "run"
    codes = run_job(command(workdir), 2, tmp_path, extra={1: ["--config.seed=1"]})
    assert codes == [1, 1]
    assert ("error: The processes of this job differ from process 0: process 1 (host "
            in output(tmp_path, 0)) and "has another config" in output(tmp_path, 0)
    assert "error" not in output(tmp_path, 1)  # the shared error is printed once
    assert not os.path.exists(workdir)


@pytest.mark.slow
def test_a_locked_workdir_is_refused_on_every_process(tmp_path):
    from fractal_jax.training.lock import workdir_lock
    workdir = tmp_path / "run"
    workdir.mkdir()
    with workdir_lock(str(workdir)):
        codes = run_job(command(workdir), 2, tmp_path)
    assert codes == [1, 1]
    assert f"Workdir {str(workdir)!r} is in use by another run" in output(tmp_path, 0)


def metric_differences(a, b):
    """The largest relative difference between two runs' metric values, and between their final
    train states' arrays (both runs must log the same records)."""
    records = [[json.loads(line) for line in metrics_text(w).splitlines()] for w in (a, b)]
    assert [(r["step"], r["split"]) for r in records[0]] == [(r["step"], r["split"])
                                                             for r in records[1]]
    metrics = max(abs(x[k] - y[k]) / max(abs(x[k]), 1e-12)
                  for x, y in zip(*records) for k in x if k not in ("step", "split"))
    states = [jax.tree.leaves(final_state(w)) for w in (a, b)]
    arrays = max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
                 / max(float(np.max(np.abs(np.asarray(x, np.float64)))), 1e-12)
                 for x, y in zip(*states))
    return metrics, arrays


@pytest.mark.slow
def test_four_devices_over_two_or_four_processes_match_one_process_up_to_rounding(tmp_path):
    """2 processes × 2 devices and 4 × 1 against 1 × 4: the gradient all-reduce adds four
    values, which XLA associates differently when some come over gloo from other processes, so
    the runs agree up to float32 rounding only (measured: metrics 1.7e-7 and final parameters
    1e-6 apart, relative, after 12 steps; 6 here). With two devices the sum of two values does not depend
    on the order, and 2 × 1 equals 1 × 2 bit for bit (the tests above)."""
    one, two_by_two, four = tmp_path / "one", tmp_path / "two", tmp_path / "four"
    args = [*FOUR_DEVICES, "--config.num_train_steps=6"]
    one_process(command(one, *args), 4, tmp_path / "one.log")
    assert run_job(command(two_by_two, *args), 2, tmp_path / "a", devices=2) == [0, 0]
    assert run_job(command(four, *args), 4, tmp_path / "b") == [0] * 4, output(tmp_path / "b", 0)
    for workdir in (two_by_two, four):
        metrics, arrays = metric_differences(str(one), str(workdir))
        print(f"{workdir.name}: metrics {metrics:.2e}, final state {arrays:.2e} relative")
        assert metrics < 1e-5 and arrays < 1e-5, (workdir.name, metrics, arrays)


@pytest.mark.slow
def test_a_checkpoint_resumes_under_another_process_count_bit_for_bit(single, two, tmp_path):
    """Written by 2 processes, resumed by 1 (with both devices), and the other way round: each
    ends exactly as the uninterrupted runs."""
    by_two, by_one = tmp_path / "by_two", tmp_path / "by_one"
    half, whole = ["--config.num_train_steps=12"], [f"--config.num_train_steps={LONG}"]
    assert run_job(command(by_two, *half), 2, tmp_path / "a") == [0, 0]
    one_process(command(by_two, *whole), 2, tmp_path / "b.log")  # 2 -> 1
    assert_same_run(str(by_two), str(single))
    one_process(command(by_one, *half), 2, tmp_path / "c.log")
    assert run_job(command(by_one, *whole), 2, tmp_path / "d") == [0, 0]  # 1 -> 2
    assert_same_run(str(by_one), str(two[0]))


@pytest.mark.slow
def test_a_sweep_trains_across_processes_as_in_one(tmp_path):
    sweep_args = ["--seeds=0,1", "--p_local=0.15", "--p_global=0.5"]
    one, multi = tmp_path / "one", tmp_path / "multi"
    sweep_cmd = lambda w: command(w, *sweep_args, module="experiments.sweep_drop_path")  # noqa
    one_process(sweep_cmd(one), 2, tmp_path / "one.log")
    assert run_job(sweep_cmd(multi), 2, tmp_path) == [0, 0], output(tmp_path, 0)
    assert (multi / "sweep_results.csv").read_text() == (one / "sweep_results.csv").read_text()
    for member in sorted(os.listdir(one / "members")):
        assert_same_run(str(multi / "members" / member), str(one / "members" / member))


def test_the_launcher_gives_each_process_its_coordinates_and_devices():
    env = launch.process_environment(1, 4, 1234, devices_per_process=2, base={"XLA_FLAGS": "-x"})
    assert env["JAX_COORDINATOR_ADDRESS"] == "127.0.0.1:1234"
    assert (env["JAX_NUM_PROCESSES"], env["JAX_PROCESS_ID"]) == ("4", "1")
    assert env["XLA_FLAGS"] == "-x --xla_force_host_platform_device_count=2"
    gpus = launch.process_environment(2, 4, 1234, gpus_per_process=2, base={})
    assert gpus["JAX_LOCAL_DEVICE_IDS"] == "4,5"


def test_the_job_status_is_the_root_cause_not_the_processes_it_took_down():
    peer = multihost.EXIT_PEER_FAILED
    assert launch.job_status([0, 0], []) == 0
    assert launch.job_status([75, 75], []) == 75
    assert launch.job_status([peer, 1], [1, 0]) == 1
    assert launch.job_status([peer, 137], [1, 0]) == 137  # killed: 128 + SIGKILL
    assert launch.job_status([0, peer], [1]) == peer


@pytest.mark.slow
def test_the_launcher_runs_a_job_and_returns_its_status(tmp_path):
    workdir = tmp_path / "run"
    launcher = [sys.executable, "-m", "fractal_jax.launch", "--num_processes=2", "--"]
    result = subprocess.run(launcher + command(workdir, "--config.num_train_steps=6"), cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert checkpoint_steps(str(workdir)) == [6]
    # A refused job: its status is the processes' own.
    result = subprocess.run(launcher + command(workdir, "--config.seed=3"), cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 1 and "different experiment" in result.stderr


def test_one_process_decisions_and_gathers_are_plain_calls():
    assert multihost.decide("x", lambda: 3) == 3
    assert multihost.gather("x", {"a": 1}) == [{"a": 1}]
    assert multihost.all_true("x", True) and not multihost.all_true("x", False)
    with pytest.raises(KeyError):  # the original error, not a SharedError
        multihost.decide("x", lambda: {}["missing"])
    assert not multihost.is_multiprocess()
    assert multihost.requested(False) is ("JAX_NUM_PROCESSES" in os.environ)
