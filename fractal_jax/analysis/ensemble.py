"""Ensembles of trained runs: average their softmax predictions on the shared eval split.

    python -m fractal_jax.analysis.ensemble --workdirs runs/a,runs/b [--out table.md]

prints a markdown table with each member's accuracy and the ensemble's. Members may differ in
seed or model, but must be evaluated on the same examples: runs on another dataset or split are
refused.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Sequence

import numpy as np

from fractal_jax.analysis import runs as runs_lib
from fractal_jax.analysis.runs import Run
from fractal_jax.runtime import configure_jax
from fractal_jax.training.checkpoint import CheckpointError


@dataclasses.dataclass(frozen=True)
class Member:
    """One run's own result in an ensemble."""

    workdir: str
    model: str
    seed: int
    step: int
    accuracy: float


@dataclasses.dataclass(frozen=True)
class EnsembleResult:
    """Accuracy of every member and of their averaged predictions on one eval split."""

    dataset: str
    split: str
    num_examples: int
    members: tuple[Member, ...]
    accuracy: float


def _eval_data(run: Run) -> dict[str, str | None]:
    """Returns what decides which examples a run is evaluated on."""
    return {"dataset": run.config.dataset, "data.path": run.config.data.path,
            "data.eval_split": run.config.data.eval_split}


def check_same_eval_data(runs: Sequence[Run]) -> None:
    """Raises ValueError unless there are runs and all share dataset, data path and eval split.

    Averaging predictions only means something example by example, so the check names the
    first run that differs and how.
    """
    if not runs:
        raise ValueError("an ensemble needs at least one run")
    reference = _eval_data(runs[0])
    for run in runs[1:]:
        diffs = [f"{key}={value!r} (vs {reference[key]!r})"
                 for key, value in _eval_data(run).items() if value != reference[key]]
        if diffs:
            raise ValueError(f"cannot ensemble {run.workdir} with {runs[0].workdir}: they are "
                             f"evaluated on different data: {', '.join(diffs)}")


def evaluate_ensemble(runs: Sequence[Run]) -> EnsembleResult:
    """Returns each run's accuracy and that of the mean of their class probabilities.

    Raises ValueError for runs on different eval data (also if, despite equal configs, their
    eval passes yield different labels, e.g. a changed data_dir).
    """
    check_same_eval_data(runs)
    predictions = [runs_lib.predict(run, runs_lib.eval_batches(run)) for run in runs]
    labels = predictions[0][1]
    for run, (_, other) in zip(runs[1:], predictions[1:]):
        if not np.array_equal(other, labels):
            raise ValueError(f"{run.workdir} is evaluated on other examples than "
                             f"{runs[0].workdir} (their labels differ)")
    members = tuple(
        Member(workdir=run.workdir, model=run.config.model.name, seed=int(run.config.seed),
               step=run.step, accuracy=runs_lib.accuracy(probs, labels))
        for run, (probs, _) in zip(runs, predictions))
    mean = np.mean([probs for probs, _ in predictions], axis=0)
    return EnsembleResult(dataset=runs[0].config.dataset, split=runs[0].config.data.eval_split,
                          num_examples=len(labels), members=members,
                          accuracy=runs_lib.accuracy(mean, labels))


def markdown_table(result: EnsembleResult) -> str:
    """Returns the result as a markdown table: one row per member, then the ensemble's row."""
    lines = [f"| {result.dataset}/{result.split} ({result.num_examples} images) | model | seed "
             "| step | accuracy |", "|---|---|---:|---:|---:|"]
    lines += [f"| {m.workdir} | {m.model} | {m.seed} | {m.step} | {m.accuracy:.2%} |"
              for m in result.members]
    lines.append(f"| ensemble of {len(result.members)} (mean softmax) | | | | "
                 f"{result.accuracy:.2%} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdirs", required=True,
                        help="comma-separated workdirs of trained runs")
    parser.add_argument("--out", default=None, help="also write the table to this file")
    args = parser.parse_args(argv)
    configure_jax()
    try:
        runs = [runs_lib.load_run(w) for w in args.workdirs.split(",") if w]
        table = markdown_table(evaluate_ensemble(runs))
    except (ValueError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
