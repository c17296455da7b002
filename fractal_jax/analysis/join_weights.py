"""The weights a FractalNet with learned joins (``join="learned"``) gives each column at each join.

``python -m fractal_jax.analysis.join_weights --workdir RUN [--out PATH]`` loads the newest
checkpoint of a run and writes a PNG (default ``RUN/join_weights.png``) with one panel per block
and, at each join, one bar per input column: the softmax weight of that column when every input
survives (as in eval mode). The dashed line at each join is the plain mean's 1/n for comparison.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import flax.linen as nn
import ml_collections
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from fractal_jax.analysis import runs
from fractal_jax.models.fractal import FractalNet, input_weights, join_name
from fractal_jax.models.schedule import BlockSchedule
from fractal_jax.training.checkpoint import (CheckpointError, checkpoint_dir, read_metadata,
                                             read_state)
from fractal_jax.training.experiment import build_model

Params = dict[str, Any]
JoinWeights = dict[tuple[int, int], np.ndarray]


def _no_learned_joins(what: str) -> ValueError:
    return ValueError(f"{what} has no learned joins; train one with --config.model.join=learned.")


def join_weights(model: nn.Module, params: Params) -> JoinWeights:
    """Returns {(block, join position): weights} for every join of a learned-join FractalNet.

    `block` is 0-based (as in the ``block_{b}`` parameters), the position is the join's in its
    block schedule, and ``weights[i]`` is the softmax weight of the join's i-th input column
    (ascending, as in `Join.columns`) when all inputs survive. Raises ValueError if `model` has
    no learned joins, since its joins then have no weights to show.
    """
    if not isinstance(model, FractalNet):
        raise _no_learned_joins(f"a {type(model).__name__}")
    if model.join != "learned":
        raise _no_learned_joins(f"a FractalNet with join={model.join!r}")
    weights = {}
    for b, block in enumerate(model.network_schedule.blocks):
        for j in block.joins:
            logits = params[f"block_{b}"][join_name(j.position)]["logits"]
            weights[b, j.position] = np.asarray(input_weights(None, logits))
    return weights


def _draw_block(axes: Axes, block: BlockSchedule, weights: dict[int, np.ndarray]) -> None:
    """Draws one block's joins as groups of bars, one slot per column so colours line up."""
    if not block.joins:
        axes.text(0.5, 0.5, f"no joins (C={block.num_columns})", ha="center",
                  transform=axes.transAxes)
        axes.set_xticks([])
        return
    slot = 0.8 / block.num_columns
    for k in range(1, block.num_columns + 1):
        bars = [(i + (k - (block.num_columns + 1) / 2) * slot,
                 weights[j.position][j.columns.index(k)])
                for i, j in enumerate(block.joins) if k in j.columns]
        axes.bar(*zip(*bars), width=slot, color=f"C{k - 1}", label=f"column {k}")
    for i, j in enumerate(block.joins):
        axes.hlines(1 / len(j.columns), i - 0.4, i + 0.4, colors="gray", linestyles="dashed",
                    label="plain mean" if i == 0 else None)
    # A join's input columns are the bars it has, so the position alone labels it.
    axes.set_xticks(range(len(block.joins)), [str(j.position) for j in block.joins])
    axes.set_xlabel("join position")
    axes.set_xlim(-0.5, len(block.joins) - 0.5)


def plot_join_weights(model: nn.Module, params: Params, path: str) -> str:
    """Writes a PNG of `join_weights` (one panel per block, a bar group per join); returns `path`.

    Uses a bare Figure (rendered by Agg) rather than pyplot, so no global backend state or open
    figures are left behind. Raises ValueError like `join_weights`.
    """
    weights = join_weights(model, params)
    blocks = model.network_schedule.blocks
    # Panel widths follow the join counts, so bars have one width throughout.
    slots = [max(len(block.joins), 1) for block in blocks]
    figure = Figure(figsize=(min(3 + 1.5 * sum(slots), 30), 4), layout="constrained")
    panels = figure.subplots(1, len(blocks), sharey=True, squeeze=False,
                             width_ratios=slots)[0]
    for b, (axes, block) in enumerate(zip(panels, blocks)):
        _draw_block(axes, block, {j.position: weights[b, j.position] for j in block.joins})
        axes.set_title(f"block {b + 1} (C={block.num_columns})")
        axes.grid(axis="y", alpha=0.3)
    panels[0].set_ylim(0, 1)
    panels[0].set_ylabel("join weight (all inputs kept)")
    # One legend, from the panel with the most columns: colours are the same in every panel.
    widest = max(range(len(blocks)), key=lambda b: blocks[b].num_columns)
    figure.legend(*panels[widest].get_legend_handles_labels(), loc="outside right upper",
                  fontsize="small")
    figure.savefig(path, dpi=100)
    return path


def load_model_and_params(workdir: str) -> tuple[nn.Module, Params]:
    """Returns (model, params) of the newest readable checkpoint in `workdir`, without the
    data the run trained on: the model comes from the saved config, its class count from the
    head's kernel. Raises RunError without checkpoints, ValueError for a run without learned
    joins (checked on the config, before any arrays are read)."""
    metadata = read_metadata(workdir)
    if metadata is None:
        raise runs.RunError(f"no checkpoint in {checkpoint_dir(workdir)}")
    config = ml_collections.ConfigDict(metadata["config"])
    if config.model.get("join") != "learned":
        raise _no_learned_joins(f"the run in {workdir} (model {config.model.name!r}, "
                                f"join={config.model.get('join')!r})")
    params = read_state(workdir, int(metadata["step"]))["params"]
    return build_model(config, params["head"]["Dense_0"]["kernel"].shape[-1]), params


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, help="a run directory (holds checkpoints/)")
    parser.add_argument("--out", default=None, help="PNG path (default: WORKDIR/join_weights.png)")
    args = parser.parse_args(argv)
    try:
        model, params = load_model_and_params(args.workdir)
        path = plot_join_weights(model, params,
                                 args.out or os.path.join(args.workdir, "join_weights.png"))
    except (ValueError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
