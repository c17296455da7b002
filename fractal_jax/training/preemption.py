"""Stopping cleanly when a scheduler or a person asks: SIGTERM (SLURM, Kubernetes and preemptible
VMs send it some seconds before killing a job) and SIGINT (Ctrl-C).

While training, `StopRequest` replaces both signals' handlers by one that only records the
signal; the loop checks it after every step, finishes that step, saves a checkpoint, waits for
it to be committed and raises `Preempted`, which the command lines turn into exit status
`EXIT_PREEMPTED`. Running the same command again resumes bit-identically. Further signals while
stopping are only logged, so none can interrupt the save (SIGKILL still can, and then the
previous checkpoint is intact, as after any kill).

On a multi-host run a signal may reach some hosts a step before others; `should_stop` makes
every host agree on the step to stop at (one tiny all-gather per step, only with several hosts).
"""
from __future__ import annotations

import logging
import signal
import threading
from types import FrameType

import jax
import numpy as np

# EX_TEMPFAIL of sysexits.h: "a temporary failure; the user is invited to retry". Job scripts
# requeue on it (experiments/slurm_sweep.sh).
EXIT_PREEMPTED = 75
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(Exception):
    """Training stopped on a signal after saving a checkpoint at `step` (None: a sweep between
    two chunks of members); rerun to resume."""

    def __init__(self, signal_name: str, step: int | None, workdirs: list[str]):
        self.signal_name, self.step = signal_name, step
        where = (f"stopped after step {step} and saved a checkpoint of it in" if step is not None
                 else "stopped before training the next members of")
        super().__init__(
            f"{signal_name} received: {where} {', '.join(workdirs)}. Run the same command again "
            f"to resume (exit status {EXIT_PREEMPTED} = stopped on request, resumable).")


class StopRequest:
    """Records SIGTERM / SIGINT while active (a context manager); `signal_name` is the first one
    received, None if none. Outside the main thread (where Python cannot handle signals) it
    changes nothing and never reports a signal."""

    def __init__(self):
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.signal_name is None:
            self.signal_name = name
            logging.warning("%s received: finishing the step in flight, then saving a "
                            "checkpoint and stopping", name)
        else:
            logging.warning("%s received while stopping after %s: still saving the checkpoint "
                            "(SIGKILL aborts it; the previous checkpoint stays intact)",
                            name, self.signal_name)

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for signum in SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def should_stop(self) -> bool:
        """Whether to stop after the current step: on every host alike when any host was
        signalled (every host must call this at the same steps)."""
        local = self.signal_name is not None
        if jax.process_count() == 1:
            return local
        from jax.experimental import multihost_utils
        flags = multihost_utils.process_allgather(np.asarray(local, np.int32))
        if flags.any() and self.signal_name is None:
            self.signal_name = "SIGTERM (on another process)"
        return bool(flags.any())
