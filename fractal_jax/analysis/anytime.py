"""Anytime evaluation of a trained FractalNet: the full network and every column alone.

The BatchNorm statistics saved with a run are shared by every column: they average steps in
which each unit's input came from whatever drop-path kept, mostly joins of several columns. A
column run alone sees activations they do not describe, one reason why public ports report a
deepest-column accuracy far below the paper's (spec §3, §6). `reestimate_batch_stats` gives a
column statistics of its own: with the parameters fixed, it runs the column in train mode over
training batches and averages their BatchNorm batch statistics. `anytime_rows` reports, for the
full network and every column, depth, size, cost and accuracy with shared and re-estimated
statistics.
"""
from __future__ import annotations

import csv
import dataclasses
import functools
import io
import itertools
from typing import Any

import jax
import numpy as np
from flax import traverse_util
from matplotlib.figure import Figure

from fractal_jax.analysis import runs
from fractal_jax.data import pipeline
from fractal_jax.models.columns import column_network
from fractal_jax.models.fractal import FractalNet
from fractal_jax.models.summary import count_flops, count_params

BatchStats = dict[str, Any]


@functools.partial(jax.jit, static_argnames=("model", "column"))
def reestimate_batch_stats(model: FractalNet, variables: runs.Variables, images: jax.Array,
                           column: int | None = None) -> BatchStats:
    """Returns `variables["batch_stats"]` with the statistics of column `column` re-estimated.

    `images` (num_batches, batch, H, W, C) are training batches. Column `column` (None: the
    full network with every join a plain mean, as in eval mode) runs in train mode on each
    batch with the parameters fixed; each of its BatchNorm layers gets the average over the
    batches of its batch mean and (biased) batch variance. Dropout is off, as it is at test
    time. Statistics of units the column does not run are returned unchanged.
    """
    # Momentum 0 turns each layer's "running average" into exactly this batch's statistics;
    # the column starts without batch_stats, so only the layers it runs are created.
    probe = model.clone(dropout=None, bn_momentum=0.0)

    def batch_stats(x: jax.Array) -> BatchStats:
        _, updates = probe.apply({"params": variables["params"]}, x, train=True, column=column,
                                 mutable=["batch_stats"])
        return updates["batch_stats"]

    stats = jax.tree.map(lambda s: s.mean(axis=0), jax.lax.map(batch_stats, images))
    merged = traverse_util.flatten_dict(variables["batch_stats"])
    merged.update(traverse_util.flatten_dict(stats))
    return traverse_util.unflatten_dict(merged)


def training_images(run: runs.Run, num_batches: int) -> np.ndarray:
    """Returns the run's first `num_batches` training batches, (num_batches, batch, H, W, C).

    The batches the run trained on first (its seed and batch size), normalised as in training
    but not augmented: eval images are not augmented either, so their statistics are the target.
    """
    if num_batches < 1:
        raise ValueError(f"BatchNorm re-estimation needs at least 1 batch, got {num_batches}.")
    config = run.config
    batches = pipeline.train_batches(
        config.dataset, global_batch_size=config.batch_size, seed=config.seed, start_step=0,
        num_steps=num_batches, augment="none", normalize=config.data.normalize,
        data_dir=config.data_dir, path=config.data.path, split=config.data.train_split)
    return np.stack([b["image"] for b in itertools.islice(batches, num_batches)])


@dataclasses.dataclass(frozen=True)
class AnytimeRow:
    """The full network (column None) or one column alone: what it costs and how well it does."""

    column: int | None
    depth: int  # conv layers on its path (the blocks only)
    params: int  # of the column as a standalone network (`extract_column`)
    flops: float  # per image, eval mode
    accuracy_shared_bn: float
    accuracy_reestimated_bn: float

    @property
    def name(self) -> str:
        return network_name(self.column)


def network_name(column: int | None) -> str:
    return "full network" if column is None else f"column {column}"


def check_fractal(run: runs.Run) -> FractalNet:
    """Returns the run's model, or raises ValueError if it has no columns to evaluate."""
    if not isinstance(run.model, FractalNet):
        raise ValueError(f"{run.workdir} holds a {type(run.model).__name__} "
                         f"({run.config.model.name}); anytime evaluation needs a FractalNet.")
    return run.model


def columns(model: FractalNet) -> list[int | None]:
    """Every column, shallowest first, then the full network (None)."""
    return [*range(1, model.network_schedule.max_columns + 1), None]


def anytime_rows(run: runs.Run, num_bn_batches: int) -> list[AnytimeRow]:
    """Evaluates every column alone and the full network on the run's eval split.

    Each is evaluated twice: with the checkpoint's shared BatchNorm statistics, and with
    statistics re-estimated for it on `num_bn_batches` training batches. Deterministic: the
    same run and arguments give bit-identical rows.
    """
    model = check_fractal(run)
    schedule = model.network_schedule
    images = training_images(run, num_bn_batches)
    shape = (1, *run.info.image_shape)
    rows = []
    for column in columns(model):
        stats = reestimate_batch_stats(model, run.variables, images, column)
        reestimated = dataclasses.replace(
            run, variables={**run.variables, "batch_stats": stats})
        rows.append(AnytimeRow(
            column=column,
            depth=schedule.depth if column is None else schedule.column_depth(column),
            params=count_params(model if column is None else column_network(model, column),
                                shape),
            flops=count_flops(model, shape, **({} if column is None else {"column": column})),
            accuracy_shared_bn=_accuracy(run, column),
            accuracy_reestimated_bn=_accuracy(reestimated, column)))
    return rows


def _accuracy(run: runs.Run, column: int | None) -> float:
    return runs.accuracy(*runs.predict(run, runs.eval_batches(run), column))


def markdown_table(rows: list[AnytimeRow]) -> str:
    """Returns the rows as a markdown table (accuracies in %, two decimals)."""
    lines = ["| network | depth | parameters | FLOPs / image | accuracy (shared BN) "
             "| accuracy (re-estimated BN) |", "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r.name} | {r.depth} | {r.params:,} | {r.flops:,.0f} | "
              f"{r.accuracy_shared_bn:.2%} | {r.accuracy_reestimated_bn:.2%} |" for r in rows]
    return "\n".join(lines)


def csv_text(rows: list[AnytimeRow]) -> str:
    """Returns the rows as CSV with full-precision values, one line per row."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    fields = [f.name for f in dataclasses.fields(AnytimeRow)]
    writer.writerow(["network", *fields[1:]])
    for r in rows:
        writer.writerow([r.name, *(repr(getattr(r, f)) for f in fields[1:])])
    return out.getvalue()


def plot_accuracy_vs_depth(rows: list[AnytimeRow], path: str) -> str:
    """Writes a PNG of each column's accuracy against its depth, for both kinds of BatchNorm
    statistics, with the full network's as separate markers; returns `path`."""
    figure = Figure(figsize=(6, 4.5), layout="constrained")
    axes = figure.subplots()
    cols = [r for r in rows if r.column is not None]
    full = [r for r in rows if r.column is None]
    for field, label, color in (("accuracy_shared_bn", "shared BN statistics", "C0"),
                                ("accuracy_reestimated_bn", "re-estimated BN statistics", "C1")):
        axes.plot([r.depth for r in cols], [getattr(r, field) for r in cols], "o-",
                  color=color, label=f"column alone, {label}")
        axes.plot([r.depth for r in full], [getattr(r, field) for r in full], "*",
                  markersize=14, color=color, label=f"full network, {label}")
    axes.set_xscale("log", base=2)
    axes.set_xlabel("depth (conv layers)")
    axes.set_ylabel("accuracy")
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    figure.savefig(path, dpi=100)
    return path
