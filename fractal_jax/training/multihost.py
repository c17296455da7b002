"""One job, several JAX processes (one per host, or one per GPU), behaving as one.

Joining (`initialize`): `jax.distributed.initialize` with the cluster found in the environment:
SLURM (`srun`), TPU pods and the other clusters JAX detects, or, with no scheduler, the variables
``JAX_COORDINATOR_ADDRESS`` (host:port of process 0), ``JAX_NUM_PROCESSES`` and
``JAX_PROCESS_ID`` (what `python -m fractal_jax.launch` sets for local processes).

Shared decisions. Every process must run the same sequence of collective operations (Orbax's
checkpoint manager, saves, restores, evaluation, the stop agreement). A decision taken from
filesystem state (is there a checkpoint? is the workdir locked?) could come out differently on
two hosts that look at a shared filesystem a moment apart, and the processes would then run
different collectives and hang. So such decisions are taken once, on process 0, and shared
(`decide`); what each process must report for itself is gathered (`gather`). Both go through the
coordination service's key-value store, which needs no compiled program. With one process they
are plain calls.

Ending together. An error on one process must end every process promptly, with that error:
- an error in a shared decision is raised, as a `SharedError`, on every process alike;
- any other error (a host's data read, a bug) is published by the failing process (`end_job`)
  before it exits; a watchdog thread on every process polls for published errors and ends its
  process with `EXIT_PEER_FAILED`, also when its main thread is blocked in a collective that the
  failed process will never join;
- a process that dies without a word (SIGKILL, a crashed host) stops sending heartbeats to the
  watchdog of process 0, which after `timeout_s` publishes it as lost; when process 0 itself is
  lost, the others' watchdogs lose the coordinator and end after `timeout_s`. JAX's own
  heartbeat check is set `JAX_HEARTBEAT_MARGIN_S` later, so it aborts a process (exit 134) only
  where Python could not speak.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import socket
import sys
import threading
import time
import traceback
from typing import Any, Callable, NoReturn

import jax

# EX_UNAVAILABLE of sysexits.h: this process was fine, but another process of the job failed or
# was lost. The failing process itself exits 1 (its error) or is gone.
EXIT_PEER_FAILED = 69
DEFAULT_TIMEOUT_S = 60.0
JAX_HEARTBEAT_MARGIN_S = 30
_KV = "fractal_jax"
_POLL_S = 1.0
_ACK_WAIT_S = 10.0
_COORDINATOR_LINGER_S = 3.0
_DECISION_TIMEOUT_MS = 24 * 3600 * 1000  # process 0 may take long (moving a workdir aside)
# Words of the errors a collective raises when a peer is gone (gloo on CPU, NCCL, the
# coordination service): the main thread then waits for the watchdog's diagnosis.
_PEER_FAILURE_WORDS = ("gloo", "connection closed", "connection reset", "unavailable", "nccl",
                       "deadline_exceeded", "coordination", "heartbeat", "barrier")


class SharedError(RuntimeError):
    """An error every process of the job raises alike (a shared decision that failed on
    process 0, or a check of what all processes reported). `user_error`: it names the problem
    and its fix (no traceback needed)."""

    def __init__(self, message: str, user_error: bool = True):
        super().__init__(message)
        self.user_error = user_error


def requested(distributed: bool) -> bool:
    """Whether to join a multi-process job: `config.distributed`, or started by a launcher
    that set JAX_NUM_PROCESSES."""
    return distributed or "JAX_NUM_PROCESSES" in os.environ


def is_multiprocess() -> bool:
    return _state.client is not None and jax.process_count() > 1


def is_primary() -> bool:
    return jax.process_index() == 0


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} is invalid: it must be an integer.") from None


def initialize(timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    """Joins the job (see the module docstring) and starts the watchdog. `timeout_s`: how long
    a process may go silent before the others end (at least 2 s)."""
    if timeout_s < 2:
        raise ValueError(f"host_timeout_s={timeout_s!r} is invalid: it must be at least 2 "
                         "seconds (the watchdog polls every second).")
    num_processes, process_id = _env_int("JAX_NUM_PROCESSES"), _env_int("JAX_PROCESS_ID")
    if (num_processes is None) != (process_id is None):
        raise ValueError("JAX_NUM_PROCESSES and JAX_PROCESS_ID must be set together (or neither, "
                         "for a cluster JAX detects itself, e.g. SLURM or a TPU pod).")
    jax.distributed.initialize(
        num_processes=num_processes, process_id=process_id,
        heartbeat_timeout_seconds=int(timeout_s) + JAX_HEARTBEAT_MARGIN_S,
        shutdown_timeout_seconds=int(timeout_s) + JAX_HEARTBEAT_MARGIN_S)
    from jax._src import distributed  # the client of the coordination service JAX started
    _state.client = distributed.global_state.client
    _state.address = distributed.global_state.coordinator_address
    if jax.process_count() > 1:
        if not is_primary():  # processes other than 0 stay quiet except for errors
            from absl import logging as absl_logging
            absl_logging.set_verbosity(absl_logging.ERROR)
            logging.getLogger().setLevel(logging.ERROR)
        _state.watchdog = _Watchdog(timeout_s)
        _state.watchdog.start()


class _State:
    client: Any = None
    address: str | None = None
    watchdog: "_Watchdog | None" = None
    sequence = itertools.count()
    lock = threading.Lock()
    ending = False  # this process is ending the job (its own error, or a peer's)


_state = _State()


def _key(*parts: Any) -> str:
    return "/".join((_KV, *map(str, parts)))


def _next_key(kind: str) -> str:
    with _state.lock:
        return _key(kind, next(_state.sequence))


def decide(name: str, fn: Callable[[], Any]) -> Any:
    """`fn()` run on process 0 alone and its result (JSON-serialisable) returned on every
    process; if it raises, every process raises a `SharedError` with its message (process 0's
    carries the original as its cause). Every process must call `decide` in the same order."""
    if not is_multiprocess():
        return fn()
    key = _next_key("decision")
    if is_primary():
        try:
            payload = {"name": name, "value": fn()}
            error = None
        except Exception as e:  # shared below, then raised here too
            payload = {"name": name, "error": str(e), "type": type(e).__name__,
                       "user": not isinstance(e, (AssertionError, TypeError, AttributeError,
                                                  KeyError, IndexError, NameError))}
            error = e
        _state.client.key_value_set(key, json.dumps(payload))
        if error is not None:
            raise SharedError(payload["error"], payload["user"]) from error
        return payload["value"]
    payload = json.loads(_state.client.blocking_key_value_get(key, _DECISION_TIMEOUT_MS))
    if payload["name"] != name:
        raise SharedError(f"process {jax.process_index()} reached decision {name!r} where "
                          f"process 0 took {payload['name']!r}: the processes run different "
                          "code; start every process from the same checkout.", False)
    if "error" in payload:
        raise SharedError(payload["error"], payload["user"])
    return payload["value"]


def gather(name: str, value: Any) -> list[Any]:
    """Every process's `value` (JSON-serialisable), in process order, on every process."""
    if not is_multiprocess():
        return [value]
    key = _next_key(f"gather-{name}")
    _state.client.key_value_set(f"{key}/{jax.process_index()}", json.dumps(value))
    return [json.loads(_state.client.blocking_key_value_get(f"{key}/{p}", _DECISION_TIMEOUT_MS))
            for p in range(jax.process_count())]


def all_true(name: str, value: bool) -> bool:
    """Whether `value` is true on every process (the same answer everywhere)."""
    return all(gather(name, bool(value)))


def code_fingerprint() -> str:
    """A hash of the fractal_jax source files: processes of one job must run the same code."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    digest = hashlib.sha256()
    for folder, _, files in sorted(os.walk(root)):
        for name in sorted(f for f in files if f.endswith(".py")):
            path = os.path.join(folder, name)
            digest.update(os.path.relpath(path, root).encode())
            with open(path, "rb") as f:
                digest.update(f.read())
    return digest.hexdigest()[:16]


def check_same_job(config_json: dict, workdir: str) -> None:
    """Refuses, on every process, a job whose processes were started with different configs,
    workdirs or code (before any work)."""
    if not is_multiprocess():
        return
    mine = {"config": hashlib.sha256(json.dumps(config_json, sort_keys=True).encode())
            .hexdigest()[:16], "workdir": os.path.abspath(workdir), "code": code_fingerprint(),
            "host": socket.gethostname()}
    everyone = gather("job", mine)
    problems = [f"process {p} (host {theirs['host']}) has another {what}"
                + (f" ({theirs[what]!r} vs {everyone[0][what]!r})" if what == "workdir" else "")
                for p, theirs in enumerate(everyone)
                for what in ("config", "workdir", "code") if theirs[what] != everyone[0][what]]
    if problems:
        raise SharedError("The processes of this job differ from process 0: "
                          + "; ".join(problems) + ". Start every process with the same command "
                          "line (config, overrides, --workdir) from the same checkout.")


def check_shared_directory(directory: str) -> None:
    """Refuses, on every process, a `directory` (a workdir) that some process cannot see as
    process 0 does: checkpoints and metrics must live where every host reads them."""
    if not is_multiprocess():
        return

    def write_probe() -> list[str]:
        name = f".shared-check-{os.getpid()}-{time.time_ns()}"
        with open(os.path.join(directory, name), "w") as f:
            f.write(name)
        return [name, socket.gethostname()]

    name, host0 = decide("probe the workdir", write_probe)
    path = os.path.join(directory, name)
    try:
        with open(path) as f:
            seen = f.read() == name
    except OSError:
        seen = False
    everyone = gather("workdir seen", [seen, socket.gethostname()])
    decide("remove the probe", lambda: os.remove(path))
    blind = [f"process {p} on host {host}" for p, (ok, host) in enumerate(everyone) if not ok]
    if blind:
        raise SharedError(
            f"The workdir {os.path.abspath(directory)!r} is not on a filesystem every process "
            f"sees: {', '.join(blind)} cannot read a file that process 0 (host {host0}) wrote "
            "there. Use a shared filesystem (NFS, Lustre, a bucket mounted on every host) for "
            "--workdir, not node-local scratch space.")


def _looks_like_peer_failure(error: BaseException) -> bool:
    text = f"{type(error).__name__} {error}".lower()
    return any(word in text for word in _PEER_FAILURE_WORDS)


def end_job(error: BaseException, message: str, code: int = 1,
            show_traceback: bool = False) -> NoReturn:
    """Ends this process after an error of its own, ending the others too: publishes the error
    (so the other processes' watchdogs end them), waits until they acknowledged (at most
    `_ACK_WAIT_S`), prints `message` (after the traceback, with `show_traceback`) and exits
    with `code`, skipping JAX's shutdown barrier (which would wait for processes that are gone).

    An error that looks like a collective failing because another process is gone first waits
    for the watchdog's diagnosis (which names that process and ends this one itself)."""
    if _state.watchdog is not None and _looks_like_peer_failure(error):
        _state.watchdog.found.wait(_state.watchdog.timeout_s + 3 * _POLL_S)
        time.sleep(3 * _POLL_S)  # the watchdog exits the process once it has diagnosed
    with _state.lock:
        _state.ending = True
    if show_traceback:
        print_traceback(error)
    # Said first: if the coordinator goes before this process exits, JAX aborts it.
    print(message if message.startswith("error:") else f"error: {message}", file=sys.stderr,
          flush=True)
    me = jax.process_index()
    try:
        reason = message[len("error: "):] if message.startswith("error: ") else message
        _state.client.key_value_set(_key("error", me), f"process {me} failed: {reason}",
                                    allow_overwrite=True)
        deadline = time.monotonic() + _ACK_WAIT_S
        others = set(range(jax.process_count())) - {me}
        while time.monotonic() < deadline:
            acked = {int(k.rsplit("/", 1)[1]) for k, _ in
                     _state.client.key_value_dir_get(_key("ack", ""))}
            if others <= acked:
                break
            time.sleep(0.2)
    except Exception:  # the coordinator is gone: nobody left to tell
        pass
    sys.stdout.flush()
    os._exit(code)


def _exit(message: str, code: int) -> NoReturn:
    print(message, file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(code)


class _Watchdog(threading.Thread):
    """Heartbeats of this process, and the end of it when another process failed or was lost
    (see the module docstring). `found` is set once it has a diagnosis."""

    def __init__(self, timeout_s: float):
        super().__init__(name="fractal_jax-watchdog", daemon=True)
        self.timeout_s = timeout_s
        self.found = threading.Event()
        self._me, self._count = jax.process_index(), jax.process_count()
        self._seen: dict[int, tuple[str, float]] = {}  # process: (last beat, when it changed)

    def run(self) -> None:
        client, beat, unreachable_since = _state.client, 0, None
        while True:
            try:
                beat += 1
                client.key_value_set(_key("alive", self._me), str(beat), allow_overwrite=True)
                errors = client.key_value_dir_get(_key("error", ""))
                alive = dict(client.key_value_dir_get(_key("alive", ""))) \
                    if self._me == 0 else {}
                unreachable_since = None
            except Exception as e:  # the coordination service (process 0) does not answer
                now = time.monotonic()
                unreachable_since = unreachable_since or now
                if now - unreachable_since >= self.timeout_s:
                    self._end(f"error: lost process 0 (the coordinator, {_state.address}): no "
                              f"answer for {now - unreachable_since:.0f} s ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}). Rerun the job to "
                              "resume from its last complete checkpoint.")
                time.sleep(_POLL_S)
                continue
            foreign = sorted(v for k, v in errors if not k.endswith(f"/{self._me}"))
            if foreign and not _state.ending:
                with _state.lock:
                    _state.ending = True
                try:
                    client.key_value_set(_key("ack", self._me), "1", allow_overwrite=True)
                except Exception:
                    pass
                if self._me == 0:  # the coordinator: let the failed process exit first
                    time.sleep(_COORDINATOR_LINGER_S)
                self._end(f"error: another process of this job failed, so this one (process "
                          f"{self._me}) stops: {foreign[0]}")
            if self._me == 0:
                self._check_heartbeats(alive)
            time.sleep(_POLL_S)

    def _check_heartbeats(self, alive: dict[str, str]) -> None:
        now = time.monotonic()
        for p in range(1, self._count):
            value = alive.get(_key("alive", p))
            last = self._seen.get(p)
            if last is None or last[0] != value:
                self._seen[p] = (value, now)
            elif now - last[1] >= self.timeout_s and not _state.ending:
                message = (f"process {p} was lost: no heartbeat for {now - last[1]:.0f} s "
                           "(killed, crashed or its host is down). Rerun the job to resume from "
                           "its last complete checkpoint.")
                with _state.lock:
                    _state.ending = True
                try:
                    _state.client.key_value_set(_key("error", p), message, allow_overwrite=True)
                    time.sleep(2 * _POLL_S)  # let the others read it before the coordinator goes
                except Exception:
                    pass
                self._end(f"error: {message}")

    def _end(self, message: str) -> NoReturn:
        self.found.set()
        _exit(message, EXIT_PEER_FAILED)


def print_traceback(error: BaseException) -> None:
    traceback.print_exception(type(error), error, error.__traceback__, file=sys.stderr)
