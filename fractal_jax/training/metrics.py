"""Metrics records: one JSON line per (step, split) in `WORKDIR/metrics.jsonl`, plus TensorBoard.

The JSON lines file is the record of a run (plots and tables read it); TensorBoard is for watching
a run live. A record is complete exactly when its line ends with a newline: each line is written
in one call and flushed, so a process killed mid-write leaves at most one partial trailing line,
which readers skip and `truncate_metrics` removes.
"""
import json
import logging
import os
import threading
from typing import Any, Mapping

import numpy as np
from tensorboardX import SummaryWriter

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
TENSORBOARD_CLOSE_S = 5.0


class MetricsWriteError(RuntimeError):
    """Writing a metrics record failed (disk full, read-only directory, ...)."""


def _metrics_path(workdir: str) -> str:
    return os.path.join(workdir, METRICS_FILE)


def to_python_number(value: Any) -> int | float:
    """Returns a jnp/np scalar (or Python number) as a plain int or float, for JSON."""
    array = np.asarray(value)
    if array.size != 1:
        raise ValueError(f"metric values must be scalars, got shape {array.shape}")
    return int(array.item()) if array.dtype.kind in "biu" else float(array.item())


def _complete_lines(path: str) -> list[str]:
    """Returns the complete (newline-terminated) lines of `path`, [] if it does not exist."""
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    return lines if not lines or lines[-1].endswith("\n") else lines[:-1]


def _rewrite(path: str, lines: list[str]) -> None:
    """Replaces `path` with `lines` atomically, so a crash leaves either the old or the new file."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(lines)
    os.replace(tmp, path)


def _drop_partial_line(path: str) -> None:
    """Cuts a trailing line without newline, which would otherwise glue itself to the next record."""
    with open(path, "rb+") as f:
        data = f.read()
        if data and not data.endswith(b"\n"):
            f.truncate(data.rfind(b"\n") + 1)


def read_metrics(workdir: str) -> list[dict]:
    """Returns the records of `WORKDIR/metrics.jsonl` in file order ([] if there is none).

    A partial trailing line (from a killed writer) is ignored.
    """
    return [json.loads(line) for line in _complete_lines(_metrics_path(workdir))]


def truncate_metrics(workdir: str, after_step: int) -> None:
    """Drops records with step > `after_step` and any partial trailing line.

    Called on resume from the checkpoint at `after_step`: the records a killed run wrote after that
    checkpoint will be written again, and the surviving lines are kept byte for byte, so the
    resumed run's file equals an uninterrupted run's.
    """
    path = _metrics_path(workdir)
    if os.path.exists(path):
        _rewrite(path, [line for line in _complete_lines(path) if json.loads(line)["step"] <= after_step])


class MetricsWriter:
    """Appends metrics records to `WORKDIR/metrics.jsonl` and, optionally, TensorBoard scalars.

    `purge_step` (for resumed runs) tells TensorBoard to hide the old events at steps >=
    `purge_step` that the resumed run will log again.
    """

    def __init__(self, workdir: str, *, tensorboard: bool = True, purge_step: int | None = None):
        os.makedirs(workdir, exist_ok=True)
        path = _metrics_path(workdir)
        if os.path.exists(path):
            _drop_partial_line(path)
        self._file = open(path, "a", encoding="utf-8")
        self._path, self._failed = path, False
        self._tensorboard = (SummaryWriter(os.path.join(workdir, TENSORBOARD_DIR), purge_step=purge_step)
                             if tensorboard else None)

    def write(self, step: int, split: str, metrics: Mapping[str, Any]) -> None:
        """Appends {"step", "split", **metrics} as one line, and logs "split/name" scalars."""
        reserved = {"step", "split"} & set(metrics)
        if reserved:
            raise ValueError(f"metric names {sorted(reserved)} are reserved")
        step = int(step)
        values = {name: to_python_number(value) for name, value in metrics.items()}
        try:
            self._file.write(json.dumps({"step": step, "split": split, **values}) + "\n")
            self._file.flush()
        except OSError as error:
            self._failed = True
            raise MetricsWriteError(
                f"Writing the metrics record of step {step} to {self._path} failed: "
                f"{error.strerror or error}. The checkpoints are intact; free disk space or make "
                "the workdir writable, then run the same command again to resume.") from None
        if self._tensorboard is not None:
            for name, value in values.items():
                self._tensorboard.add_scalar(f"{split}/{name}", value, step)

    def flush(self) -> None:
        """Pushes buffered TensorBoard events to disk (JSON lines are flushed on every write)."""
        if self._tensorboard is not None:
            self._tensorboard.flush()

    def close(self) -> None:
        """Flushes and closes both outputs. After a failed write, TensorBoard's writer thread
        may have died on the same error (and its queue then blocks): its close gets a few
        seconds in a thread of its own, and its errors are logged, not raised."""
        try:
            self._file.close()
        except OSError:
            if not self._failed:
                raise
        if self._tensorboard is None:
            return
        if not self._failed:
            self._tensorboard.close()
            return
        closing = threading.Thread(target=self._close_tensorboard_quietly, daemon=True)
        closing.start()
        closing.join(TENSORBOARD_CLOSE_S)

    def _close_tensorboard_quietly(self) -> None:
        try:
            self._tensorboard.close()
        except Exception as error:  # the metrics error is the one to report
            logging.warning("TensorBoard events under %s may be incomplete: %s",
                            os.path.dirname(self._path), error)

    def __enter__(self) -> "MetricsWriter":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
