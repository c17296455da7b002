"""What the command lines share: `--config.KEY=VALUE` parsing whose mistakes are one-line errors,
quiet library logs, and the errors shown as one line ("error: ...") instead of a traceback.

    app.run(main, flags_parser=cli.parse_flags)      # and inside main(argv):
    cli.start(argv)
    with cli.one_line_errors():
        ...
"""
from __future__ import annotations

import contextlib
import sys
from typing import Iterator

from absl import app, flags, logging
from ml_collections import config_flags

from fractal_jax import config as config_lib
from fractal_jax.runtime import configure_jax

OVERRIDE = "--config."


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, except that an unknown --config.KEY is a one-line error.

    ml_collections rejects an override of a key the config lacks with a traceback; say which
    key instead, with a "did you mean", and exit with status 1.
    """
    try:
        return app.parse_flags_with_usage(argv)
    except (KeyError, AttributeError):
        for arg in argv[1:]:
            if arg.startswith(OVERRIDE):
                try:
                    config_lib.check_key(arg[len(OVERRIDE):].split("=")[0])
                except ValueError as e:
                    sys.exit(f"error: {e}")
        raise


def define_config_flags(workdir_help: str, fresh: bool = False) -> None:
    """Defines the flags every training command line takes: --config (a config file, whose keys
    --config.KEY=VALUE overrides), --workdir and, with `fresh`, --fresh."""
    config_flags.DEFINE_config_file("config", None, "Path to an experiment config file.",
                                    lock_config=True)
    flags.DEFINE_string("workdir", None, workdir_help)
    if fresh:
        flags.DEFINE_bool("fresh", False, "Move an existing workdir aside (WORKDIR.old-<time>) "
                          "and start from scratch instead of resuming.")
    flags.mark_flags_as_required(["config", "workdir"])


def start(argv: list[str]) -> None:
    """Refuses stray arguments, quiets library INFO logs (e.g. every checkpoint step, which
    drown the progress bar; -v brings them back) and configures JAX (`runtime.py`)."""
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    configure_jax()


def prepare_workdir(config, workdir: str, fresh: bool) -> None:
    """Joins a multi-process job if the config or the launcher asks for it (refusing processes
    started with different configs, workdirs or code) and, with `fresh`, moves an existing
    workdir aside (after the config was validated, so a bad value moves nothing)."""
    from fractal_jax.training import experiment, multihost
    if multihost.requested(config.distributed):
        multihost.initialize(config.host_timeout_s)
        multihost.check_same_job(config_lib.to_json_dict(config), workdir)
    if fresh:
        moved = multihost.decide("move the workdir aside",
                                 lambda: experiment.move_aside(workdir))
        if moved:
            logging.info("moved the previous contents of %s to %s", workdir, moved)


def user_errors() -> tuple[type[BaseException], ...]:
    """The errors that name the problem and the fix: a traceback would only hide them."""
    from fractal_jax.training import checkpoint, lock, loop, metrics
    # OSError: a file that cannot be read or written names itself and its cause.
    return (ValueError, OSError, loop.NonFiniteLossError, lock.WorkdirLockError,
            checkpoint.CheckpointError, checkpoint.CheckpointSaveError,
            metrics.MetricsWriteError)


@contextlib.contextmanager
def one_line_errors() -> Iterator[None]:
    """Turns `user_errors` raised inside into ``error: <message>`` and exit status 1, and a stop
    on SIGTERM / SIGINT (after its checkpoint was saved) into ``stopped: <message>`` and exit
    status `preemption.EXIT_PREEMPTED`, on which job scripts requeue, and a diverged run into
    ``error: <message>`` and `loop.EXIT_DIVERGED`.

    On a multi-process job an error every process shares is printed by process 0 (all exit 1);
    any other error ends every process (`multihost.end_job`): this one exits 1 with it, the
    others with `multihost.EXIT_PEER_FAILED`."""
    from fractal_jax.training import loop, multihost, preemption
    try:
        yield
    except preemption.Preempted as e:
        if multihost.is_primary():
            print(f"stopped: {e}", file=sys.stderr)
        raise SystemExit(preemption.EXIT_PREEMPTED) from None
    except loop.NonFiniteLossError as e:
        if multihost.is_primary():  # every process computed the same metrics: one says it
            print(f"error: {e}", file=sys.stderr)
        raise SystemExit(loop.EXIT_DIVERGED) from None
    except multihost.SharedError as e:
        if not multihost.is_primary():
            raise SystemExit(1) from None
        if not e.user_error:
            multihost.print_traceback(e.__cause__ or e)
        raise SystemExit(f"error: {e}") from None
    except Exception as e:
        user_error = isinstance(e, user_errors())
        if multihost.is_multiprocess():
            multihost.end_job(e, f"error: {e}" if user_error else
                              f"error: {type(e).__name__}: {e}", show_traceback=not user_error)
        if user_error:
            raise SystemExit(f"error: {e}") from None
        raise
