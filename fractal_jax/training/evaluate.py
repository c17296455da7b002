"""Evaluation of a trained state: the full network and, for a FractalNet, every column alone."""
from __future__ import annotations

import functools
from typing import Any, Iterable

import jax

from fractal_jax.models.fractal import FractalNet
from fractal_jax.training import parallel, steps
from fractal_jax.training.state import TrainState

Network = int | None  # a FractalNet column (1-based), or None for the full network


def networks(model) -> list[Network]:
    """None (the full network) and, for a FractalNet, every column alone."""
    if isinstance(model, FractalNet):
        return [None] + list(range(1, model.network_schedule.max_columns + 1))
    return [None]


def metric_suffix(network: Network) -> str:
    """"" for the full network, "/column_k" for column k: metric names are "accuracy" + this."""
    return "" if network is None else f"/column_{network}"


class Evaluator:
    """Accuracy and mean loss of every network of a model over one eval pass, with one
    compiled eval step per network."""

    def __init__(self, model, mesh: jax.sharding.Mesh):
        self._mesh = mesh
        self._fns = {n: parallel.jit_eval_step(functools.partial(steps.eval_step, column=n), mesh)
                     for n in networks(model)}

    def __call__(self, state: TrainState, batches: Iterable[dict]) -> dict[str, float]:
        totals: dict[Any, dict[str, float]] = {
            n: {"loss_sum": 0.0, "correct": 0.0, "count": 0.0} for n in self._fns}
        for batch in batches:
            batch = parallel.to_global(batch, self._mesh)
            for network, fn in self._fns.items():
                for k, v in jax.device_get(fn(state, batch)).items():
                    totals[network][k] += float(v)
        out = {}
        for network, t in totals.items():
            out[f"accuracy{metric_suffix(network)}"] = t["correct"] / max(t["count"], 1)
            out[f"loss{metric_suffix(network)}"] = t["loss_sum"] / max(t["count"], 1)
        return out
