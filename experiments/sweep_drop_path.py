"""Trains one FractalNet per (seed, p_local, p_global), all at once, and tabulates the results:

    python experiments/sweep_drop_path.py --config experiments/configs/digits.py \
        --workdir runs/sweep --seeds 0,1,2,3 --p_local 0,0.15,0.3 --p_global 0,0.5 \
        [--data_order own|shared] [--chunk N] [--fresh] [--shard I/N | --collect] \
        [--config.KEY=VALUE ...]

Members train together (`fractal_jax.training.sweep`): by default one after another through
their single-run steps, which skip dead work and measured faster on CPU and GPU; with
`--strategy vmap` through one compiled train step vmapped over all members, or over `--chunk`
of them at a time when they do not fit in memory together.
Each equals the single run of its seed and rates (within float tolerance, or exactly for loop).
Writes WORKDIR/sweep_results.csv, .md and .png (eval accuracy, mean ± std over seeds for every
rate pair, full network and each column) and one run directory per member under
WORKDIR/members/. Running the command again resumes, or reports a finished sweep.

Across machines: `--shard I/N` trains only the I-th of N slices of the members (0 <= I < N), in
the same workdir on a shared filesystem; inside a SLURM job array the shard is read from
SLURM_ARRAY_TASK_ID / SLURM_ARRAY_TASK_COUNT when --shard is not given
(`experiments/slurm_sweep.sh`). Shards run concurrently, each holding its members' locks. Any
shard, or `--collect` (which trains nothing), writes the results once every member has finished,
and otherwise names the members still missing. SIGTERM / SIGINT stop after a checkpoint with
exit status 75; the same command resumes.
"""
import os
import sys

# Run as a script: make the repository importable without installing it.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from fractal_jax import cli  # noqa: E402
from fractal_jax import config as config_lib  # noqa: E402

FLAGS = flags.FLAGS
cli.define_config_flags("Directory for the sweep's members and result tables.", fresh=True)
flags.DEFINE_list("seeds", None, "Comma-separated seeds (default: the config's seed).")
flags.DEFINE_list("p_local", None, "Comma-separated local drop-path rates "
                  "(default: the config's drop_path.p_local).")
flags.DEFINE_list("p_global", None, "Comma-separated probabilities of a global drop-path step "
                  "(default: the config's drop_path.p_global).")
flags.DEFINE_enum("data_order", "own", ["own", "shared"], "own: each member reads the batches "
                  "of its own seed (as its single run does); shared: every member reads those "
                  "of the config's seed.")
flags.DEFINE_integer("chunk", None, "Train at most this many members at a time (default: all).")
flags.DEFINE_string("shard", None, "I/N: train only the I-th of N slices of the members "
                    "(default: all, or the SLURM array task's slice inside a job array).")
flags.DEFINE_bool("collect", False, "Train nothing: write the results of a sweep whose members "
                  "have finished (trained by shards), or name the ones still missing.")
flags.DEFINE_enum("strategy", "auto", ["auto", "vmap", "loop"], "vmap: one compiled step for "
                  "all members of a chunk; loop: each member's single-run step in turn (dead "
                  "work skipped); auto: loop, the faster on every backend measured (CPU, GPU).")


def parse_values(name: str, values: list[str] | None, default, kind: type) -> tuple:
    """The flag's comma-separated values as `kind`, or (default,) when the flag is not given."""
    if values is None:
        return (default,)
    try:
        return tuple(kind(v) for v in values)
    except ValueError:
        raise app.UsageError(f"--{name} must be comma-separated {kind.__name__}s, "
                             f"got {','.join(values)!r}") from None


def main(argv):
    cli.start(argv)
    import jax  # after the JAX runtime is configured

    from fractal_jax.analysis import sweep_tables
    from fractal_jax.training import sweep

    with cli.one_line_errors():
        config = config_lib.validate(FLAGS.config)  # before --fresh moves anything
        spec = sweep.Sweep(
            seeds=parse_values("seeds", FLAGS.seeds, config.seed, int),
            p_local=parse_values("p_local", FLAGS.p_local, config.drop_path.p_local, float),
            p_global=parse_values("p_global", FLAGS.p_global, config.drop_path.p_global, float),
            data_order=FLAGS.data_order)
        sweep.check_chunk(FLAGS.chunk)
        shard = (sweep.parse_shard(FLAGS.shard) if FLAGS.shard is not None
                 else sweep.shard_from_environment())
        if FLAGS.collect:
            if shard is not None or FLAGS.fresh:
                raise app.UsageError("--collect trains nothing: give it neither --shard nor "
                                     "--fresh.")
            sweep.check_sweep(config, FLAGS.workdir, spec)
            results = sweep.member_results(config, FLAGS.workdir, spec)
        else:
            if shard is not None and FLAGS.fresh:
                # Another shard may already be training in the workdir --fresh would move.
                raise app.UsageError("--fresh cannot be combined with shards: move or delete "
                                     "the old sweep once, before starting the shards.")
            cli.prepare_workdir(config, FLAGS.workdir, FLAGS.fresh)
            results = sweep.train_sweep(config, FLAGS.workdir, spec, chunk=FLAGS.chunk,
                                        strategy=FLAGS.strategy, shard=shard)
    if jax.process_index() != 0:
        return
    missing = [m.name for m, r in zip(spec.members, results) if r is None]
    if missing:
        print(f"\n{len(spec.members) - len(missing)} of {len(spec.members)} members finished; "
              f"still missing: {', '.join(missing)}.\nThe results are written when they have "
              "finished (by the last shard to finish, or by running this command with "
              "--collect).")
        if FLAGS.collect:
            sys.exit(1)
        return
    with cli.one_line_errors():  # a full disk is one line here too
        paths = sweep_tables.write_sweep_results(FLAGS.workdir, config, spec, results)
    with open(paths[1], encoding="utf-8") as f:
        print(f"\n{f.read()}\nresults: {', '.join(paths)}\n"
              f"members: {os.path.join(FLAGS.workdir, sweep.MEMBERS_DIR)}/")


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
