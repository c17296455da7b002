"""One run per workdir: an exclusive lock on `WORKDIR/.lock`, held for the whole run.

The lock is `fcntl.flock` on an open file, which the kernel releases however its holder ends,
SIGKILL included, so a killed run never leaves a lock that blocks its restart. The file names the
holder (pid and host) for the error that refuses a second run, and is emptied when the holder
exits cleanly: a non-empty file that nobody locks was left by a run that died.

A sweep whose members train in several processes (shards) holds its workdir's lock *shared*:
the shards run side by side, each holding its members' own (exclusive) locks, while a single
run or `--fresh` (exclusive) is refused until every shard is done.
"""
from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import socket
from typing import Iterator

LOCK_FILE = ".lock"


class WorkdirLockError(RuntimeError):
    """The workdir cannot be locked: another live run holds it, or it is not writable."""


def _read(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    return os.read(fd, 4096).decode(errors="replace").strip()


def _write(fd: int, text: str) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, text.encode(), 0)


@contextlib.contextmanager
def workdir_lock(workdir: str, shared: bool = False) -> Iterator[None]:
    """Holds the lock of `workdir` (which must exist) for the duration of the `with` block;
    with `shared`, alongside other shared holders (which do not name themselves in the file).

    Raises WorkdirLockError, naming the holder, if another process holds it, or if the lock file
    cannot be created; takes over, with a warning, the lock file of a run that was killed.
    """
    path = os.path.join(workdir, LOCK_FILE)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise WorkdirLockError(f"Cannot create the lock file {path} ({e.strerror}); the workdir "
                               "must be writable.") from e
    try:
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read(fd) or ("the shards of a sweep" if not shared else "holder unknown")
            raise WorkdirLockError(
                f"Workdir {workdir!r} is in use by another run ({holder}, lock file {path}). "
                "Wait for it to finish or stop it, or use another --workdir.") from None
        previous = _read(fd)
        if shared:
            if previous:  # left by a killed exclusive holder: no one holds the lock exclusively
                _write(fd, "")
            yield
            return
        if previous:
            logging.warning("taking over the lock of workdir %s from %s, which ended without "
                            "releasing it (killed?)", workdir, previous)
        _write(fd, f"pid {os.getpid()} on host {socket.gethostname()}\n")
        try:
            yield
        finally:
            # An unwritable workdir must not hide the run's own error.
            with contextlib.suppress(OSError):
                _write(fd, "")
    finally:
        os.close(fd)  # releases the lock
