"""Starts one multi-process job on this machine: N processes of a command, joined as one JAX job
(one process per GPU of a multi-GPU machine, or a multi-host cluster in miniature on a CPU).

    python -m fractal_jax.launch --num_processes 2 [--devices_per_process 2 | --gpus_per_process 1] \
        -- python -m fractal_jax.main --config experiments/configs/digits.py --workdir runs/digits

Each process gets JAX_COORDINATOR_ADDRESS (127.0.0.1 and a free port, or --port), JAX_NUM_PROCESSES
and JAX_PROCESS_ID, which `fractal_jax.main` and `experiments/sweep_drop_path.py` join by
themselves; with --devices_per_process (CPU) XLA gives each process that many CPU devices, with
--gpus_per_process each process sees its own GPUs (JAX_LOCAL_DEVICE_IDS). SIGTERM and SIGINT are
passed on to every process (they stop after the same step with a checkpoint and exit 75). Once a
process has ended with an error, the others end by themselves (`training/multihost.py`); any still
running --grace_s seconds later are killed.

Exit status: 0 when every process finished, 75 when they all stopped on a signal, otherwise the
status of the first process that failed for a reason of its own (1: an error; a signal's number
+ 128 when it was killed), not the `EXIT_PEER_FAILED` (69) of the processes it took down.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

from absl import app, flags

from fractal_jax.training.multihost import EXIT_PEER_FAILED

flags.DEFINE_integer("num_processes", None, "Number of processes to start.", lower_bound=1)
flags.DEFINE_integer("port", 0, "Coordinator port on 127.0.0.1 (0: a free one).", lower_bound=0)
flags.DEFINE_integer("devices_per_process", None, "CPU devices each process gets (XLA's "
                     "--xla_force_host_platform_device_count); for the CPU backend.", lower_bound=1)
flags.DEFINE_integer("gpus_per_process", None, "GPUs each process gets: process i sees GPUs "
                     "i*G .. i*G+G-1 (JAX_LOCAL_DEVICE_IDS).", lower_bound=1)
flags.DEFINE_float("grace_s", 180.0, "Seconds the other processes get to end by themselves "
                   "after one failed, before they are killed.", lower_bound=0)
flags.mark_flag_as_required("num_processes")
FLAGS = flags.FLAGS


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_environment(process_id: int, num_processes: int, port: int,
                        devices_per_process: int | None = None,
                        gpus_per_process: int | None = None,
                        base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of process `process_id` of a local job."""
    env = dict(os.environ if base is None else base)
    env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(num_processes),
               JAX_PROCESS_ID=str(process_id))
    if devices_per_process is not None:
        env["XLA_FLAGS"] = (f"{env.get('XLA_FLAGS', '')} "
                            f"--xla_force_host_platform_device_count={devices_per_process}").strip()
    if gpus_per_process is not None:
        first = process_id * gpus_per_process
        env["JAX_LOCAL_DEVICE_IDS"] = ",".join(map(str, range(first, first + gpus_per_process)))
    return env


def job_status(codes: list[int], failed_first: list[int]) -> int:
    """The job's exit status from its processes' (see the module docstring); `failed_first`:
    the processes that failed, in the order they ended."""
    if all(c == codes[0] for c in codes):
        return codes[0]
    for p in failed_first:
        if codes[p] not in (0, EXIT_PEER_FAILED):
            return codes[p]
    return max(codes, key=lambda c: c != 0)


def run(command: list[str], num_processes: int, port: int = 0, *,
        devices_per_process: int | None = None, gpus_per_process: int | None = None,
        grace_s: float = 180.0) -> int:
    """Runs `command` as the processes of one job; returns the job's exit status."""
    port = port or free_port()
    processes = [subprocess.Popen(command, env=process_environment(
        i, num_processes, port, devices_per_process, gpus_per_process))
        for i in range(num_processes)]

    def forward(signum, frame) -> None:
        for p in processes:
            if p.poll() is None:
                p.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    failed: list[int] = []
    first_failure = None
    try:
        while any(p.poll() is None for p in processes):
            for i, p in enumerate(processes):
                if p.poll() not in (None, 0) and i not in failed:
                    failed.append(i)
                    first_failure = first_failure or time.monotonic()
            if first_failure is not None and time.monotonic() - first_failure > grace_s:
                for p in processes:
                    if p.poll() is None:
                        p.kill()
            time.sleep(0.2)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    codes = [p.returncode if p.returncode >= 0 else 128 - p.returncode for p in processes]
    failed += [i for i, c in enumerate(codes) if c and i not in failed]
    return job_status(codes, failed)


def main(argv: list[str]) -> None:
    command = argv[1:]
    if not command:
        raise app.UsageError("Give the command to run after --, e.g. -- python -m "
                             "fractal_jax.main --config ... --workdir ...")
    if FLAGS.devices_per_process and FLAGS.gpus_per_process:
        raise app.UsageError("--devices_per_process (CPU) and --gpus_per_process exclude each "
                             "other.")
    sys.exit(run(command, FLAGS.num_processes, FLAGS.port,
                 devices_per_process=FLAGS.devices_per_process,
                 gpus_per_process=FLAGS.gpus_per_process, grace_s=FLAGS.grace_s))


if __name__ == "__main__":
    app.run(main)
