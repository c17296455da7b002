"""Results of a drop-path sweep: eval accuracy, mean ± std over seeds for every (p_local,
p_global), of the full network and of each column alone, as CSV, markdown and a PNG plot.

Inputs are member records ``{"seed", "p_local", "p_global", "accuracy", "accuracy/column_k",
...}`` (a member's final eval metrics with its seed and rates). Rows follow the order in which
rate pairs first appear and numbers are written at fixed precision, so the same records always
give byte-identical files.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import os

import numpy as np
from matplotlib.figure import Figure

from fractal_jax.analysis.plots import column_numbers, format_mean_std, mean_std
from fractal_jax.training.evaluate import STORED_PREFIX

CSV_FILE, MARKDOWN_FILE, PLOT_FILE = "sweep_results.csv", "sweep_results.md", "sweep_results.png"


@dataclasses.dataclass(frozen=True)
class Row:
    """One rate pair: the final accuracy of each seed, per network (full, then columns)."""

    p_local: float
    p_global: float
    seeds: tuple[int, ...]
    accuracies: dict[str, tuple[float, ...]]  # "accuracy" / "accuracy/column_k" -> per seed


def networks(record: dict) -> list[tuple[str, str]]:
    """(metric key, label) of the full network and of every column in a member record, then of
    the full network with the running BatchNorm statistics of training, where recorded."""
    stored = f"{STORED_PREFIX}accuracy"
    return [("accuracy", "full network")] + [
        (f"accuracy/column_{k}", f"column {k}") for k in column_numbers(record)] + (
        [(stored, "full network (stored BN)")] if stored in record else [])


def summarize(records: list[dict]) -> list[Row]:
    """Groups member records by (p_local, p_global), in order of first appearance."""
    groups: dict[tuple[float, float], list[dict]] = {}
    for record in records:
        groups.setdefault((record["p_local"], record["p_global"]), []).append(record)
    keys = [key for key, _ in networks(records[0])]
    return [Row(p_local, p_global, tuple(r["seed"] for r in group),
                {k: tuple(r[k] for r in group) for k in keys})
            for (p_local, p_global), group in groups.items()]


def csv_text(rows: list[Row]) -> str:
    """One line per rate pair: rates, number of seeds, then mean and std per network (the std
    is empty for a single seed)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    names = [key.replace("/", "_") for key in rows[0].accuracies]
    writer.writerow(["p_local", "p_global", "num_seeds",
                     *[f"{n}_{stat}" for n in names for stat in ("mean", "std")]])
    for row in rows:
        stats = [mean_std(values) for values in row.accuracies.values()]
        writer.writerow([row.p_local, row.p_global, len(row.seeds),
                         *[f"{v:.6f}" if v is not None else "" for s in stats for v in s]])
    return out.getvalue()


def markdown_table(rows: list[Row], labels: list[str]) -> str:
    """One line per rate pair, accuracies as "mean ± std" in %, one column per network."""
    lines = ["| p_local | p_global | seeds | " + " | ".join(labels) + " |",
             "|---:|---:|---:|" + "---:|" * len(labels)]
    lines += [f"| {r.p_local:g} | {r.p_global:g} | {len(r.seeds)} | "
              + " | ".join(format_mean_std(v) for v in r.accuracies.values()) + " |"
              for r in rows]
    return "\n".join(lines)


def plot_sweep(rows: list[Row], labels: list[str], path: str) -> str:
    """Writes a PNG with one panel per network: accuracy (mean, ± std bars) against p_local,
    one line per p_global; returns `path`."""
    figure = Figure(figsize=(3.6 * len(labels), 3.6), layout="constrained")
    panels = np.atleast_1d(figure.subplots(1, len(labels), sharey=True))
    for axes, label, key in zip(panels, labels, rows[0].accuracies):
        for p_global in dict.fromkeys(r.p_global for r in rows):
            line = [r for r in rows if r.p_global == p_global]
            stats = [mean_std(r.accuracies[key]) for r in line]
            axes.errorbar([r.p_local for r in line], [m for m, _ in stats],
                          yerr=[s or 0.0 for _, s in stats], marker="o", capsize=3,
                          label=f"p_global {p_global:g}")
        axes.set_title(label)
        axes.set_xlabel("p_local")
        axes.grid(alpha=0.3)
    panels[0].set_ylabel("accuracy")
    panels[0].legend(fontsize="small")
    figure.savefig(path, dpi=100, format="png")
    return path


def write_results(workdir: str, records: list[dict], caption: str) -> list[str]:
    """Writes sweep_results.csv, .md (`caption`, then the table) and .png into `workdir`;
    returns their paths."""
    rows = summarize(records)
    labels = [label for _, label in networks(records[0])]
    paths = [os.path.join(workdir, name) for name in (CSV_FILE, MARKDOWN_FILE, PLOT_FILE)]
    # Each file is written aside and renamed into place: the shards of a sweep that finish
    # together may both write them.
    temporary = [f"{path}.tmp-{os.getpid()}" for path in paths]
    with open(temporary[0], "w", encoding="utf-8") as f:
        f.write(csv_text(rows))
    with open(temporary[1], "w", encoding="utf-8") as f:
        f.write(f"{caption}\n\n{markdown_table(rows, labels)}\n")
    plot_sweep(rows, labels, temporary[2])
    for source, target in zip(temporary, paths):
        os.replace(source, target)
    return paths


def write_sweep_results(workdir: str, config, sweep, results: list[dict]) -> list[str]:
    """Writes the result tables of a finished `sweep` (`training.sweep.Sweep`) from its
    members' final eval metrics `results` (in `sweep.members` order); returns their paths."""
    return write_results(
        workdir, [{**dataclasses.asdict(m), **r} for m, r in zip(sweep.members, results)],
        caption=f"{config.dataset}/{config.data.eval_split} accuracy after "
                f"{config.num_train_steps} steps, mean ± sample std over seeds "
                f"{', '.join(map(str, sweep.seeds))} ({sweep.data_order} data order)")
