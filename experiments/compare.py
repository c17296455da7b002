"""Trains FractalNet and baselines with the same budget, data and seeds; prints one table.

    python experiments/compare.py --config experiments/configs/digits.py --workdir runs/compare \
        --models fractalnet,resnet20 --seeds 0,1 [--config.KEY=VALUE ...]

Every model trains through `fractal_jax.training.loop.train` in `WORKDIR/<model>/seed_<s>` (so
running the command again resumes, or reports finished runs) with the config's data, optimiser,
budget and seeds. model.* keys the chosen model does not take (e.g. FractalNet's widths for a
ResNet) are left unset, so each model keeps its own defaults. The table (also written to
`WORKDIR/compare.md`) gives eval accuracy (mean ± sample std over seeds), parameters, FLOPs per
image and measured eval images/s.
"""
import os
import sys

# Run as a script: make the repository importable without installing it.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import inspect  # noqa: E402

import ml_collections  # noqa: E402
from absl import app, flags, logging  # noqa: E402

from fractal_jax import cli  # noqa: E402
from fractal_jax import config as config_lib  # noqa: E402
from fractal_jax.analysis import plots, runs  # noqa: E402
from fractal_jax.analysis.timing import eval_images_per_second  # noqa: E402
from fractal_jax.models import registry  # noqa: E402
from fractal_jax.models.summary import count_flops, count_params  # noqa: E402
from fractal_jax.training import experiment, loop  # noqa: E402

FLAGS = flags.FLAGS
cli.define_config_flags("Directory for one workdir per model and seed.")
flags.DEFINE_list("models", None, "Comma-separated registry names, e.g. fractalnet,resnet20.")
flags.DEFINE_list("seeds", None, "Comma-separated seeds (default: the config's seed).")
flags.mark_flags_as_required(["models"])


def model_options(name: str) -> set[str]:
    """Returns the option names the registered model `name` takes besides num_classes.

    These are the keyword parameters of its registry function and, when that function forwards
    **kwargs to a Flax module, the module's fields. Raises the registry's ValueError (with a
    "did you mean") for an unknown name.
    """
    module = registry.create_model(name, num_classes=1)
    parameters = inspect.signature(registry.MODELS[name]).parameters.values()
    names = {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    if any(p.kind is p.VAR_KEYWORD for p in parameters):
        names |= {f.name for f in dataclasses.fields(module) if f.init}
    return names - {"num_classes", "parent", "name"}


def config_for_model(config: ml_collections.ConfigDict,
                     name: str) -> tuple[ml_collections.ConfigDict, list[str]]:
    """Returns (`config` training model `name`, the set model.* keys it leaves out).

    model.* starts afresh from the base config (every option unset) and keeps only the set
    options that `name` takes; every other key is shared by all compared models.
    """
    options = model_options(name)
    model = config_lib.base_config().model
    model.name = name
    dropped = []
    for key, value in config.model.items():
        if key == "name" or value is None:
            continue
        if key in options:
            model[key] = value
        else:
            dropped.append(key)
    config = config.copy_and_resolve_references()
    config.model = model
    return config, dropped


@dataclasses.dataclass(frozen=True)
class Row:
    """One model's results: its final eval accuracy per seed, size, cost and speed."""

    model: str
    accuracies: tuple[float, ...]
    params: int
    flops: float
    images_per_second: float


def markdown_table(rows: list[Row], split: str) -> str:
    """Returns one markdown table with a row per model."""
    lines = [f"| model | {split} accuracy | parameters | FLOPs / image | eval images/s |",
             "|---|---:|---:|---:|---:|"]
    lines += [f"| {r.model} | {plots.format_mean_std(r.accuracies)} | {r.params:,} | {r.flops:,.0f} "
              f"| {r.images_per_second:,.0f} |" for r in rows]
    return "\n".join(lines)


def compare(config: ml_collections.ConfigDict, workdir: str, models: list[str],
            seeds: list[int]) -> str:
    """Trains every model with every seed; returns the table (also written to compare.md).

    All models are built and sized first, so a model that cannot take this data (e.g. an
    ImageNet network on 8×8 digits) fails before any training budget is spent.
    """
    info = experiment.dataset_info(config)
    shape = (1, *info.image_shape)
    configs, sizes = {}, {}
    for name in models:
        configs[name], dropped = config_for_model(config, name)
        if dropped:
            logging.warning("%s does not take model.%s; left unset", name,
                            ", model.".join(dropped))
        config_lib.validate(configs[name])
        model = experiment.build_model(configs[name], info.num_classes)
        sizes[name] = (count_params(model, shape), count_flops(model, shape))
    rows = []
    for name in models:
        run_dirs = [os.path.join(workdir, name, f"seed_{seed}") for seed in seeds]
        accuracies = []
        for seed, run_dir in zip(seeds, run_dirs):
            run_config = configs[name].copy_and_resolve_references()
            run_config.seed = seed
            # The runs' own progress and reports go to stderr: stdout carries the one table.
            with contextlib.redirect_stdout(sys.stderr):
                accuracies.append(loop.train(run_config, run_dir)["accuracy"])
        rows.append(Row(name, tuple(accuracies), *sizes[name],
                        eval_images_per_second(runs.load_run(run_dirs[0]))))
    table = markdown_table(rows, config.data.eval_split)
    with open(os.path.join(workdir, "compare.md"), "w") as f:
        f.write(table + "\n")
    return table


def main(argv):
    cli.start(argv)
    try:
        seeds = [int(s) for s in FLAGS.seeds] if FLAGS.seeds else [FLAGS.config.seed]
    except ValueError:
        raise app.UsageError(f"--seeds must be integers, got {','.join(FLAGS.seeds)}") from None
    if len(set(FLAGS.models)) != len(FLAGS.models) or len(set(seeds)) != len(seeds):
        raise app.UsageError("--models and --seeds must not repeat an entry")
    os.makedirs(FLAGS.workdir, exist_ok=True)
    with cli.one_line_errors():
        table = compare(FLAGS.config, FLAGS.workdir, FLAGS.models, seeds)
    print(f"\n{table}\n\ntable: {os.path.join(FLAGS.workdir, 'compare.md')}")


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
