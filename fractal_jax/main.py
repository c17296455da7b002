"""Trains a model from a config file:

    python -m fractal_jax.main --config experiments/configs/digits.py --workdir runs/digits \
        [--config.KEY=VALUE ...] [--fresh]

Running the same command on the same workdir resumes from its newest good checkpoint. Exit
status: 0 done, 1 an error that names its fix, 75 stopped by SIGTERM / SIGINT after saving a
checkpoint (run the same command again to resume), 65 the run diverged (non-finite values; see
`nonfinite`), 69 (multi-process jobs) another process of the job failed or was lost. One job may be several processes (`--config.distributed=True`, or
`python -m fractal_jax.launch`): see `fractal_jax/training/multihost.py`.
"""
import os

from absl import app, flags

from fractal_jax import cli
from fractal_jax import config as config_lib

FLAGS = flags.FLAGS
cli.define_config_flags("Directory for checkpoints, metrics and plots.", fresh=True)


def report(config, workdir: str, final: dict[str, float]) -> None:
    """Draws the learning curves and prints the final evaluation and where everything went."""
    import jax

    from fractal_jax.analysis import plots
    from fractal_jax.training.checkpoint import saved_steps
    from fractal_jax.training.metrics import METRICS_FILE, read_metrics

    if jax.process_index() != 0:
        return
    curves = plots.plot_learning_curves(read_metrics(workdir), os.path.join(workdir, "curves.png"))
    print(f"\nFinal evaluation on {config.dataset}/{config.data.eval_split} after "
          f"{config.num_train_steps} steps:\n{plots.column_accuracy_table(final)}")
    if config.precise_bn.enabled:
        print(f"accuracy: each network with BatchNorm statistics estimated for it on "
              f"{config.precise_bn.num_examples} training examples (precise_bn); stored BN: "
              "the running statistics of training, which no single network matches.")
    print(f"\nworkdir: {workdir}\n  checkpoints: {os.path.join(workdir, 'checkpoints')} "
          f"(steps {saved_steps(workdir)})\n  metrics: {os.path.join(workdir, METRICS_FILE)}\n"
          f"  curves: {curves}")


def main(argv):
    cli.start(argv)
    from fractal_jax.training import loop  # after configure_jax()

    with cli.one_line_errors():
        config = config_lib.validate(FLAGS.config)  # before --fresh moves anything
        cli.prepare_workdir(config, FLAGS.workdir, FLAGS.fresh)
        final = loop.train(config, FLAGS.workdir)
        report(config, FLAGS.workdir, final)  # curves and tables: a full disk is one line too


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
