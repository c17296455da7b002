"""Anytime evaluation of a trained FractalNet: the full network and every column alone.

The running BatchNorm statistics of training are shared by every column: they average steps in
which each unit's input came from whatever drop-path kept, mostly joins of several columns. A
column run alone, and the full network whose joins are plain means, see activations they do not
describe, one reason why public ports report a deepest-column accuracy far below the paper's
(spec §3, §6). `anytime_rows` reports, for every column and the full network, depth, size, cost
and accuracy with those shared statistics and with the network's own precise statistics
(`training/evaluate.py`: the ones the run's reported accuracies were computed with).
"""
from __future__ import annotations

import csv
import dataclasses
import io

from matplotlib.figure import Figure

from fractal_jax.analysis import runs
from fractal_jax.models.columns import column_network
from fractal_jax.models.fractal import FractalNet
from fractal_jax.models.summary import count_flops, count_params


@dataclasses.dataclass(frozen=True)
class AnytimeRow:
    """The full network (column None) or one column alone: what it costs and how well it does."""

    column: int | None
    depth: int  # conv layers on its path (the blocks only)
    params: int  # of the column as a standalone network (`extract_column`)
    flops: float  # per image, eval mode
    accuracy_stored_bn: float  # the running statistics of training, shared by every network
    accuracy_precise_bn: float  # statistics estimated for this network

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


def anytime_rows(run: runs.Run) -> list[AnytimeRow]:
    """Evaluates every column alone and the full network on the run's eval split, with the
    shared running statistics and with precise statistics of their own (computed as training
    computes them if the run was evaluated without them). Deterministic: the same run gives
    bit-identical rows."""
    model = check_fractal(run)
    run = runs.with_precise_stats(run)
    schedule = model.network_schedule
    shape = (1, *run.info.image_shape)
    return [AnytimeRow(
        column=column,
        depth=schedule.depth if column is None else schedule.column_depth(column),
        params=count_params(model if column is None else column_network(model, column), shape),
        flops=count_flops(model, shape, **({} if column is None else {"column": column})),
        accuracy_stored_bn=_accuracy(run, column, "stored"),
        accuracy_precise_bn=_accuracy(run, column, "precise")) for column in columns(model)]


def _accuracy(run: runs.Run, column: int | None, bn: str) -> float:
    return runs.accuracy(*runs.predict(run, runs.eval_batches(run), column, bn))


def markdown_table(rows: list[AnytimeRow]) -> str:
    """Returns the rows as a markdown table (accuracies in %, two decimals)."""
    lines = ["| network | depth | parameters | FLOPs / image | accuracy (stored BN) "
             "| accuracy (precise BN) |", "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r.name} | {r.depth} | {r.params:,} | {r.flops:,.0f} | "
              f"{r.accuracy_stored_bn:.2%} | {r.accuracy_precise_bn:.2%} |" for r in rows]
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
    for field, label, color in (("accuracy_stored_bn", "stored BN statistics", "C0"),
                                ("accuracy_precise_bn", "precise BN statistics", "C1")):
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
