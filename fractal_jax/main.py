"""Trains a model from a config file:

    python -m fractal_jax.main --config experiments/configs/digits.py --workdir runs/digits \
        [--config.KEY=VALUE ...] [--fresh]

Running the same command on the same workdir resumes from its newest good checkpoint.
"""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from fractal_jax import cli  # noqa: E402
from fractal_jax import config as config_lib  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to an experiment config file.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and plots.")
flags.DEFINE_bool("fresh", False, "Move an existing workdir aside (WORKDIR.old-<time>) and "
                  "start from scratch instead of resuming.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    cli.start(argv)
    from fractal_jax.training import loop  # after configure_jax()

    with cli.one_line_errors():
        config = config_lib.validate(FLAGS.config)  # before --fresh moves anything
        cli.prepare_workdir(config, FLAGS.workdir, FLAGS.fresh)
        loop.train(config, FLAGS.workdir)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
