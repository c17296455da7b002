"""Trains a model from a config file:

    python -m fractal_jax.main --config experiments/configs/digits.py --workdir runs/digits \
        [--config.KEY=VALUE ...] [--fresh]

Running the same command on the same workdir resumes from its newest good checkpoint.
"""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from fractal_jax.runtime import configure_jax  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to an experiment config file.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and plots.")
flags.DEFINE_bool("fresh", False, "Move an existing workdir aside (WORKDIR.old-<time>) and "
                  "start from scratch instead of resuming.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    if not FLAGS["verbosity"].present:  # library INFO logs (e.g. every checkpoint step) drown the progress
        logging.set_verbosity(logging.WARNING)
    configure_jax()
    from fractal_jax.training import loop, parallel  # after the JAX runtime is configured

    config = FLAGS.config
    if config.distributed:
        parallel.initialize_distributed()
    if FLAGS.fresh:
        moved = loop.move_aside(FLAGS.workdir)
        if moved:
            logging.info("moved the previous run to %s", moved)
    try:
        loop.train(config, FLAGS.workdir)
    except (ValueError, loop.NonFiniteLossError) as e:
        # A clear message, not a traceback wall: every such error names the problem and the fix.
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    app.run(main)
