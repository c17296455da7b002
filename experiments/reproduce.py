"""Reproduces one of the paper's tables: trains each row's published recipe, prints a markdown
table with the paper's test error beside the measured one.

    python experiments/reproduce.py --table 1 --setting C10+ --workdir runs/paper \
        [--budget paper|smoke] [--config.KEY=VALUE ...]

Tables (spec §5): 1 = FractalNet-20 without and with drop-path + dropout, and its deepest column
alone (settings C10, C10+, C10++, C100, C100+, C100++, SVHN); 2 = FractalNet-34 on ImageNet
(setting ImageNet); 3 = the ultra-deep study, C = 1..6 (C100++); 4 = plain networks of depth
5..40 against the columns of a 4-column FractalNet (C100++).

Every training run goes through `fractal_jax.training.loop.train` in
`WORKDIR/<budget>/<setting>/<run>` (running the command again resumes unfinished runs and
re-evaluates finished ones; Tables 3 and 4 share their 4-column run), and the table is written
to `WORKDIR/<budget>/table<T>_<setting>.md`. Same arguments, same table, byte for byte.

Budgets: ``paper`` trains the exact recipes of `experiments/configs/` (needs the TFDS dataset
prepared in ``--config.data_dir``; a missing one fails before any training). ``smoke`` runs the
same code for a few steps with widths of 8, and, if the dataset is not prepared, on a
deterministic stand-in of random images of the dataset's shape and class count (labelled so in
the table): it checks the machinery, not the paper. ``--config.KEY=VALUE`` overrides any key of
every run (listed in the table's caption).
"""
import os
import sys

# Run as a script: make the repository importable without installing it.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import contextlib  # noqa: E402
import dataclasses  # noqa: E402
from typing import Any  # noqa: E402

import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from experiments import paper_results  # noqa: E402
from experiments.configs import cifar10, cifar100, imagenet, plain, svhn, ultradeep  # noqa: E402
from fractal_jax import cli  # noqa: E402
from fractal_jax import config as config_lib  # noqa: E402
from fractal_jax.data.sources import DatasetNotFoundError  # noqa: E402
from fractal_jax.models.paper import CIFAR_DROPOUT  # noqa: E402
from fractal_jax.training import experiment, loop  # noqa: E402

BUDGETS = ("paper", "smoke")
# The smoke budget: the same runs, a few steps, widths of 8.
SMOKE = dict(num_train_steps=4, batch_size=10, eval_batch_size=50, log_every_steps=2,
             eval_every_steps=4, checkpoint_every_steps=4, progress_bar=False)
SMOKE_WIDTH = 8
# The stand-in for a dataset that is not prepared: (image shape, classes) as the models see them.
STANDIN_SHAPES = {"cifar10": ((32, 32, 3), 10), "cifar100": ((32, 32, 3), 100),
                  "svhn_cropped": ((32, 32, 3), 10), "imagenet2012": ((224, 224, 3), 1000)}
STANDIN_EXAMPLES = 50  # one file serves as every split
# Table 1 and 2 settings: (config module, augmentation tier; None keeps the config's own).
SETTINGS = {"C10": (cifar10, "none"), "C10+": (cifar10, "+"), "C10++": (cifar10, "++"),
            "C100": (cifar100, "none"), "C100+": (cifar100, "+"), "C100++": (cifar100, "++"),
            "SVHN": (svhn, None), "ImageNet": (imagenet, None)}


@dataclasses.dataclass(frozen=True)
class Row:
    """One row of a paper table and how it is measured."""

    model: str  # the paper's row, a key of paper_results.ERRORS[table]
    run: str | None  # the training run that measures it; None: not run (see `note`)
    metric: str = "accuracy"  # which of that run's final eval metrics
    note: str = ""  # why it is not measured


def _with(config: ml_collections.ConfigDict,
          changes: dict[str, Any]) -> ml_collections.ConfigDict:
    """Returns a copy of `config` with the values of dotted keys ("model.name") changed."""
    config = config.copy_and_resolve_references()
    config.update_from_flattened_dict(changes)
    return config


def _setting_config(setting: str) -> ml_collections.ConfigDict:
    """Returns the paper's recipe for a Table 1 or 2 setting."""
    module, augment = SETTINGS[setting]
    config = module.get_config()
    return config if augment is None else _with(config, {"data.augment": augment})


def recipe(table: int, setting: str) -> tuple[dict[str, ml_collections.ConfigDict], list[Row]]:
    """Returns (the training runs of `table` in `setting` by name, the table's rows).

    Raises ValueError naming the valid choices for an unknown table or a setting the table
    does not report.
    """
    if table not in paper_results.ERRORS:
        raise ValueError(f"unknown table {table!r}; the paper's tables are "
                         f"{', '.join(map(str, paper_results.ERRORS))}.")
    settings = list(dict.fromkeys(s for row in paper_results.ERRORS[table].values() for s in row))
    if setting not in settings:
        raise ValueError(f"Table {table} has no setting {setting!r}; it reports "
                         f"{', '.join(settings)}.")
    if table == 1:
        base = _setting_config(setting)
        runs = {"fractalnet20": _with(base, {"drop_path.p_local": 0.0, "drop_path.p_global": 0.0,
                                             "model.dropout": (0.0,) * len(CIFAR_DROPOUT)}),
                "fractalnet20_drop_path": base}
        rows = [Row("FractalNet-20", "fractalnet20"),
                Row("+ drop-path + dropout", "fractalnet20_drop_path"),
                Row("→ deepest column alone", "fractalnet20_drop_path", "accuracy/column_3"),
                Row("FractalNet-40", None, note="not run: its layout is not published (spec §2)")]
    elif table == 2:
        runs = {"fractalnet34": _setting_config(setting)}
        rows = [Row("FractalNet-34, top-1", "fractalnet34"),
                Row("FractalNet-34, top-5", None, note="not measured: evaluation is top-1")]
    else:
        fractals = range(1, 7) if table == 3 else (4,)
        runs = {f"fractalnet_ultra{c}": _with(ultradeep.get_config(),
                                              {"model.name": f"fractalnet_ultra{c}"})
                for c in fractals}
        if table == 3:
            rows = [Row(f"FractalNet C={c} ({5 * 2 ** (c - 1)} layers)", f"fractalnet_ultra{c}")
                    for c in fractals]
        else:
            runs.update({f"plain_{d}": _with(plain.get_config(), {"model.depth": d})
                         for d in (5, 10, 20, 40)})
            rows = [Row(f"plain, {d} layers", f"plain_{d}") for d in (5, 10, 20, 40)]
            rows += [Row(f"fractal column {c} alone ({5 * 2 ** (c - 1)} layers)",
                         "fractalnet_ultra4", f"accuracy/column_{c}") for c in range(1, 5)]
            rows.append(Row("full 4-column fractal (40 layers)", "fractalnet_ultra4"))
    return runs, [r for r in rows if setting in paper_results.ERRORS[table][r.model]]


def smoke(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Returns `config` for a few steps with every block SMOKE_WIDTH wide."""
    num_blocks = experiment.build_model(config, 1).num_blocks
    return _with(config, {"model.widths": (SMOKE_WIDTH,) * num_blocks, **SMOKE})


def standin(dataset: str, directory: str) -> str:
    """Returns the path of the stand-in for `dataset`, writing it on first use.

    Random uint8 images of the dataset's shape and labels cycling through its classes, drawn
    from a fixed seed, so every run of the smoke budget trains on the same bytes.
    """
    path = os.path.join(directory, f"standin_{dataset}.npz")
    if not os.path.exists(path):
        shape, num_classes = STANDIN_SHAPES[dataset]
        rng = np.random.default_rng(0)
        os.makedirs(directory, exist_ok=True)
        partial = f"{path}.partial.npz"
        np.savez(partial,
                 images=rng.integers(0, 256, (STANDIN_EXAMPLES, *shape), dtype=np.uint8),
                 labels=np.arange(STANDIN_EXAMPLES, dtype=np.int32) % num_classes,
                 class_names=np.array([f"stand-in class {i}" for i in range(num_classes)]))
        os.replace(partial, path)  # a run stopped mid-write leaves no truncated stand-in
    return path


def prepare(config: ml_collections.ConfigDict, budget: str, overrides: dict[str, Any],
            root: str) -> tuple[ml_collections.ConfigDict, str | None]:
    """Returns (the validated config of one run under `budget`, the stand-in's dataset or None).

    Checks that its data can be read, so that a missing dataset fails before any training: the
    paper budget raises DatasetNotFoundError; the smoke budget switches to a stand-in.
    """
    if budget == "smoke":
        config = smoke(config)
    config = config_lib.validate(_with(config, overrides))
    try:
        experiment.dataset_info(config)
        return config, None
    except DatasetNotFoundError:
        if budget != "smoke":
            raise
    dataset = config.dataset
    return _with(config, {"dataset": "npz", "data.path": standin(dataset, root)}), dataset


def markdown_table(table: int, setting: str, budget: str, rows: list[Row],
                   configs: dict[str, ml_collections.ConfigDict],
                   metrics: dict[str, dict[str, float]], standin_of: str | None,
                   overrides: dict[str, Any]) -> str:
    """Returns the table: a caption saying how it was measured, then one line per paper row."""
    data = (f"a deterministic STAND-IN for {standin_of} (random images of its shape and class "
            f"count; the real data is not prepared here), so the measured errors say nothing "
            f"about the paper's" if standin_of else
            ", ".join(sorted({c.dataset for c in configs.values()})))
    lines = [f"Table {table}, {setting}: test error (%), budget {budget!r}, data: {data}."]
    if overrides:
        lines.append("Config overrides: " + ", ".join(f"{k}={v!r}" for k, v in overrides.items())
                     + ".")
    if table == 2:
        lines.append("Measured on a single central crop; the paper averages 10 crops.")
    if all(c.precise_bn.enabled for c in configs.values()):
        lines.append("Each network (a full network, a column alone) is measured with BatchNorm "
                     "statistics estimated for it (precise_bn).")
    lines += ["", "| model | paper | measured | steps × batch |", "|---|---:|---:|---:|"]
    for row in rows:
        paper = f"{paper_results.ERRORS[table][row.model][setting]:.2f}"
        if row.run is None:
            lines.append(f"| {row.model} | {paper} | {row.note} | – |")
            continue
        config = configs[row.run]
        lines.append(f"| {row.model} | {paper} | "
                     f"{100.0 * (1.0 - metrics[row.run][row.metric]):.2f} | "
                     f"{config.num_train_steps:,} × {config.batch_size} |")
    return "\n".join(lines)


def table_path(workdir: str, budget: str, table: int, setting: str) -> str:
    return os.path.join(workdir, budget, f"table{table}_{setting}.md")


def reproduce(table: int, setting: str, budget: str, workdir: str,
              overrides: dict[str, Any] | None = None) -> str:
    """Trains (or resumes) every run of the table; returns it and writes it under `workdir`.

    Raises ValueError for an unknown table, setting, budget or config key, and
    DatasetNotFoundError (paper budget) before any training if the data is not prepared.
    """
    if budget not in BUDGETS:
        raise ValueError(f"unknown budget {budget!r}; use one of {', '.join(BUDGETS)}.")
    overrides = dict(overrides or {})
    recipes, rows = recipe(table, setting)
    root = os.path.join(workdir, budget)
    prepared = {name: prepare(config, budget, overrides, root)
                for name, config in recipes.items() if any(r.run == name for r in rows)}
    configs = {name: config for name, (config, _) in prepared.items()}
    standin_of = next((s for _, s in prepared.values() if s), None)
    metrics = {}
    for name, config in configs.items():
        # The runs' progress and reports go to stderr: stdout carries the one table.
        with contextlib.redirect_stdout(sys.stderr):
            metrics[name] = loop.train(config, os.path.join(root, setting, name))
    text = markdown_table(table, setting, budget, rows, configs, metrics, standin_of, overrides)
    with open(table_path(workdir, budget, table, setting), "w") as f:
        f.write(text + "\n")
    return text


def define_flags() -> None:
    """Defines the command line (only when run as a script, so importing this defines none)."""
    flags.DEFINE_integer("table", None, "The paper's table: 1, 2, 3 or 4.")
    flags.DEFINE_string("setting", None,
                        "C10, C10+, C10++, C100, C100+, C100++, SVHN or ImageNet.")
    flags.DEFINE_enum("budget", "paper", BUDGETS, "paper: the published recipe; smoke: a few "
                      "steps with tiny widths (on a stand-in if the data is not prepared).")
    flags.DEFINE_string("workdir", None, "Directory for the runs and the table.")
    config_flags.DEFINE_config_dict("config", config_lib.base_config(),
                                    "Overrides applied to every run: --config.KEY=VALUE.")
    flags.mark_flags_as_required(["table", "setting", "workdir"])


def main(argv):
    cli.start(argv)
    args = flags.FLAGS
    overrides = config_flags.get_override_values(args["config"])
    with cli.one_line_errors():
        text = reproduce(args.table, args.setting, args.budget, args.workdir, overrides)
    path = table_path(args.workdir, args.budget, args.table, args.setting)
    print(f"\n{text}\n\ntable: {path}")


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=cli.parse_flags)
