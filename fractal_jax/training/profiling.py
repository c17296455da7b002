"""Profiling a few training steps without editing code: ``--config.profile_steps=A,B``.

Steps A..B (inclusive; ``=A`` for one step) are traced with `jax.profiler` into
``WORKDIR/profile/`` (TensorBoard's profile plugin reads ``plugins/profile/*/*.xplane.pb``;
``perfetto_trace.json.gz`` opens in https://ui.perfetto.dev), each step annotated with its
number. The same steps get a host timeline, logged and written to
``WORKDIR/profile/host_timeline.jsonl``: how long the loop waited for the batch, how long
dispatching the step took, and how long the device then took to finish it. To measure that
last part the profiled steps are waited for one by one, which changes their timing but not their
results. Each process of a multi-process job writes its own ``WORKDIR/profile/process_<i>/``
(process 0 alone prints).
"""
from __future__ import annotations

import contextlib
import json
import os
import time

import jax
import tqdm

PROFILE_DIR = "profile"
TIMELINE_FILE = "host_timeline.jsonl"


class StepProfiler:
    """Traces and times steps `first`..`last` of a loop that resumes at `start` (so a resumed run
    traces what is left of the range)."""

    def __init__(self, steps: tuple[int, ...] | None, directory: str, start: int):
        # Processes of one job on one host would overwrite each other's files.
        self.directory = (directory if jax.process_count() == 1 else
                          os.path.join(directory, f"process_{jax.process_index()}"))
        self._say = tqdm.tqdm.write if jax.process_index() == 0 else (lambda text: None)
        self._first, self._last = (steps[0], steps[-1]) if steps else (0, -1)
        self._first = max(self._first, start + 1)
        self._tracing = False
        self._timeline: list[dict] = []

    def active(self, step: int) -> bool:
        return self._first <= step <= self._last

    def start(self, step: int) -> None:
        """Call before the step's batch is read."""
        if step == self._first and self.active(step):
            os.makedirs(self.directory, exist_ok=True)
            jax.profiler.start_trace(self.directory, create_perfetto_trace=True)
            self._tracing = True

    def annotate(self, step: int) -> contextlib.AbstractContextManager:
        """Marks the step in the trace (TensorBoard's step-time view groups by it)."""
        if not self._tracing:
            return contextlib.nullcontext()
        return jax.profiler.StepTraceAnnotation("train", step_num=step)

    def finish(self, step: int, outputs, data_wait: float, dispatch: float) -> None:
        """Call after the step was dispatched with its outputs and the seconds spent waiting for
        its batch and dispatching it."""
        if not self.active(step):
            return
        began = time.perf_counter()
        jax.block_until_ready(outputs)
        entry = {"step": step, "data_wait_ms": 1e3 * data_wait, "dispatch_ms": 1e3 * dispatch,
                 "device_ms": 1e3 * (time.perf_counter() - began)}
        self._timeline.append(entry)
        self._say(f"profile step {step}: data wait {entry['data_wait_ms']:.1f} ms, "
                        f"dispatch {entry['dispatch_ms']:.1f} ms, device {entry['device_ms']:.1f} ms")
        if step == self._last:
            self.close()

    def close(self) -> None:
        """Stops the trace (also when training ends early) and writes the host timeline."""
        if self._tracing:
            jax.profiler.stop_trace()
            self._tracing = False
            with open(os.path.join(self.directory, TIMELINE_FILE), "w", encoding="utf-8") as f:
                f.writelines(json.dumps(e) + "\n" for e in self._timeline)
            last = self._timeline[-1]["step"] if self._timeline else self._first
            self._say(f"profile of steps {self._first}..{last} written to {self.directory}")
