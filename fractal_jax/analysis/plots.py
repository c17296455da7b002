"""Figures and tables from metrics records (`training.metrics.read_metrics`).

Eval records hold the full network's "accuracy"/"loss" and, for the paper's per-column ("anytime")
evaluation of Table 4, one "accuracy/column_k"/"loss/column_k" per column run alone.
"""
import re

import numpy as np

from matplotlib.figure import Figure

from fractal_jax.training.evaluate import STORED_PREFIX

_COLUMN_KEY = re.compile(r"^accuracy/column_(\d+)$")


def column_numbers(record: dict) -> list[int]:
    """Returns the column numbers k that have an "accuracy/column_k" entry, in increasing order."""
    return sorted(int(m.group(1)) for m in map(_COLUMN_KEY.match, record) if m)


def _series(records: list[dict], split: str, key: str) -> tuple[list[int], list[float]]:
    """Returns (steps, values) of `key` over the records of `split` that have it."""
    points = [(r["step"], r[key]) for r in records if r["split"] == split and key in r]
    return [s for s, _ in points], [v for _, v in points]


def plot_learning_curves(records: list[dict], path: str) -> str:
    """Writes a PNG of loss (left) and accuracy (right) against step for every split; returns `path`.

    The accuracy panel also draws each column's accuracy, so one can see how the columns, the full
    network and their gap evolve, and the full network's with the running BatchNorm statistics
    of training where the records have it. Uses a bare Figure (rendered by Agg) rather than pyplot, so no
    global backend state or open figures are left behind.
    """
    figure = Figure(figsize=(11, 4.5), layout="constrained")
    loss_axes, accuracy_axes = figure.subplots(1, 2)
    splits = list(dict.fromkeys(r["split"] for r in records))
    for split in splits:
        loss_axes.plot(*_series(records, split, "loss"), label=split)
        # Train records average the batches' drop-path sub-networks, not the full network.
        label = "train batches (drop-path)" if split == "train" else f"{split} full network"
        accuracy_axes.plot(*_series(records, split, "accuracy"), label=label, linewidth=2)
        columns = sorted({k for r in records if r["split"] == split for k in column_numbers(r)})
        for k in columns:
            accuracy_axes.plot(*_series(records, split, f"accuracy/column_{k}"), label=f"{split} column {k}",
                               linestyle="--", linewidth=1)
        stored = _series(records, split, f"{STORED_PREFIX}accuracy")
        if stored[0]:  # the full network with the running statistics of training
            accuracy_axes.plot(*stored, label=f"{split} full network, stored BN statistics",
                               linestyle=":", color="grey")
    for axes, name in ((loss_axes, "loss"), (accuracy_axes, "accuracy")):
        axes.set_xlabel("step")
        axes.set_ylabel(name)
        axes.grid(alpha=0.3)
        if axes.has_data():
            axes.legend(fontsize="small")
    figure.savefig(path, dpi=100)
    return path


def column_accuracy_table(record: dict) -> str:
    """Returns a markdown table of one eval record: the full network, then each column alone.

    Accuracy is a percentage with two decimals; loss has four; a missing value is "–". A record
    of an evaluation with precise BatchNorm statistics also has the accuracy with the running
    statistics of training ("stored_bn/..."), shown in a column of its own.
    """
    rows = [("full network", "accuracy", "loss")] + [
        (f"column {k}", f"accuracy/column_{k}", f"loss/column_{k}") for k in column_numbers(record)]
    columns = [("accuracy", "", ".2%"), ("loss", "", ".4f")]
    if any(key.startswith(STORED_PREFIX) for key in record):
        columns.append(("accuracy (stored BN)", STORED_PREFIX, ".2%"))

    def cell(key: str, fmt: str) -> str:
        return format(float(record[key]), fmt) if key in record else "–"

    lines = ["| | " + " | ".join(title for title, _, _ in columns) + " |",
             "|---|" + "---:|" * len(columns)]
    lines += [f"| {name} | " + " | ".join(
        cell(prefix + (acc if title.startswith("accuracy") else loss), fmt)
        for title, prefix, fmt in columns) + " |" for name, acc, loss in rows]
    return "\n".join(lines)


def mean_std(values: tuple[float, ...]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for a single value)."""
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else None


def format_mean_std(values: tuple[float, ...]) -> str:
    """"85.12%" for one seed, "85.12% ± 1.03%" (sample std) for several."""
    mean, std = mean_std(values)
    return f"{mean:.2%}" if std is None else f"{mean:.2%} ± {std:.2%}"
