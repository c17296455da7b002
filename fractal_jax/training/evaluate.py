"""Evaluation of trained variables: the full network and, for a FractalNet, every column alone,
each with BatchNorm statistics estimated for the network evaluated ("precise" statistics).

Why: the running statistics a FractalNet gathers while training with drop-path describe none of
the networks it is evaluated as. Training mixes single columns (global steps) with means of the
surviving inputs of each join (local steps), while at test time every join is the mean of all
its inputs, whose variance is lower; and a column run alone sees inputs that the shared
statistics never saw. Through 20 layers the mismatch compounds: the digits default's full
network scored 36% with its running statistics at step 300, and 99% with its own.

`precise_batch_stats` runs the network once over fixed, unaugmented training examples (the
calibration set), with every BatchNorm layer normalising by the statistics of the batch it sees
and recording them, parameters fixed and dropout off (eval mode otherwise), and sets each
layer's mean and variance to the population mean and variance of its inputs over the whole set.
With the calibration set in one batch (the default) every layer's statistics are then exactly
those of its inputs when the network runs in eval mode with them: each BatchNorm input of the
evaluated network is standardised over the calibration set. In several batches the first
layer's are still exact and deeper layers' differ by the batch-to-batch noise of the layers
before them (Wu & Johnson, "Rethinking 'Batch' in BatchNorm", 2021).

Each batch's statistics are sums of deviations from a shift (`batch_norm.shifted_statistics`),
and batches are pooled by Chan et al.'s pairwise update of (count, mean, M2 = count · variance)
in float64, with each batch's mean as its float64 shift + offset: sums of squares, E[x²] -
E[x]², cancel away the digits of a variance small beside its mean, and float32 batch means round
off those of the differences between batches.
"""
from __future__ import annotations

import functools
from typing import Any, Iterable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from fractal_jax.models.batch_norm import BatchNorm, shifted_statistics
from fractal_jax.models.fractal import FractalNet
from fractal_jax.training import parallel, steps

Network = int | None  # a FractalNet column (1-based), or None for the full network
Variables = dict[str, Any]
BatchStats = dict[str, Any]
BATCH_NORMS = (nn.BatchNorm, BatchNorm)
STORED_PREFIX = "stored_bn/"  # metrics computed with the running statistics of training


def networks(model) -> list[Network]:
    """None (the full network) and, for a FractalNet, every column alone."""
    if isinstance(model, FractalNet):
        return [None] + list(range(1, model.network_schedule.max_columns + 1))
    return [None]


def network_name(network: Network) -> str:
    """"full" or "column_k": the key of a network's precise statistics in a checkpoint."""
    return "full" if network is None else f"column_{network}"


def metric_suffix(network: Network) -> str:
    """"" for the full network, "/column_k" for column k: metric names are "accuracy" + this."""
    return "" if network is None else f"/column_{network}"


def _normalise_and_record(moments: dict):
    """A flax method interceptor: every BatchNorm layer normalises by its batch's statistics
    (as in training) and records (shift, offset, variance) of its input in `moments` by path
    (see `batch_moments`)."""
    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name != "__call__" or not isinstance(module, BATCH_NORMS):
            return next_fun(*args, **kwargs)
        shift, offset, var = shifted_statistics(args[0])
        moments[module.path] = (shift, offset, var)
        y = (args[0].astype(jnp.float32) - (shift + offset)) * jax.lax.rsqrt(var + module.epsilon)
        if module.use_scale:
            y = y * module.get_variable("params", "scale")
        if module.use_bias:
            y = y + module.get_variable("params", "bias")
        return y.astype(module.dtype or args[0].dtype)
    return interceptor


def batch_moments(model, params: Any, images: jax.Array, network: Network = None
                  ) -> dict[tuple[str, ...], tuple[jax.Array, jax.Array, jax.Array]]:
    """{BatchNorm layer path: (shift, offset, variance) of its input over `images`} when
    `network` runs in eval mode (dropout off, every join a plain mean) with each BatchNorm layer
    normalising by the statistics of this batch: float32 arrays, the mean shift + offset (sum
    them in float64), the variance biased (`batch_norm.shifted_statistics`)."""
    moments: dict = {}
    kwargs = {} if network is None else {"column": network}
    with nn.intercept_methods(_normalise_and_record(moments)):
        # Variables without statistics: the interceptor never reads them.
        model.apply({"params": params}, images, train=False, **kwargs)
    return moments


Moments = tuple[int, np.ndarray, np.ndarray]  # (count, mean, M2: sum of squared deviations)


def pool_moments(a: Moments, b: Moments) -> Moments:
    """The (count, mean, M2) of two sets together (Chan, Golub & LeVeque's pairwise update):
    M2 adds the between-set term, a difference of means, rather than subtracting squares."""
    (n_a, mean_a, m2_a), (n_b, mean_b, m2_b) = a, b
    n = n_a + n_b
    delta = mean_b - mean_a
    return n, mean_a + delta * (n_b / n), m2_a + m2_b + np.square(delta) * (n_a * n_b / n)


def precise_batch_stats(model, variables: Variables, batches: Iterable[jax.Array],
                        network: Network = None, moments_fn=None) -> BatchStats:
    """`variables["batch_stats"]` with every BatchNorm layer that `network` runs given the
    population mean and variance of its inputs over `batches` (see the module docstring).

    Layers the network does not run keep their statistics. `moments_fn(params, images)` computes
    one batch's moments (default: `batch_moments`, jit-compiled per call site by the caller).
    """
    moments_fn = moments_fn or jax.jit(functools.partial(batch_moments, model, network=network))
    pooled: dict = {}
    count = 0
    for images in batches:
        # Counted in examples: each has the same number of positions in a layer's map.
        n = images.shape[0]
        for path, (shift, offset, var) in jax.device_get(
                moments_fn(variables["params"], images)).items():
            mean = np.asarray(shift, np.float64) + np.asarray(offset, np.float64)
            batch = (n, mean, n * np.asarray(var, np.float64))
            pooled[path] = pool_moments(pooled[path], batch) if path in pooled else batch
        count += n
    if count == 0:
        raise ValueError("precise BatchNorm statistics need at least one calibration batch.")
    flat = traverse_util.flatten_dict(jax.device_get(variables["batch_stats"]))
    for path, (n, mean, m2) in pooled.items():
        flat[(*path, "mean")] = np.asarray(mean, np.float32)
        flat[(*path, "var")] = np.asarray(m2 / n, np.float32)
    return traverse_util.unflatten_dict(flat)


class Evaluator:
    """Accuracy and mean loss of every network of a model over one eval pass.

    Called with `calibration` (image batches, host-local slices), each network is evaluated
    with its precise statistics, reported as "accuracy", "loss" (+ "/column_k"), and with the
    training's running statistics, reported under STORED_PREFIX. Without it, only the running
    statistics are used, under the plain names.
    """

    def __init__(self, model, mesh: jax.sharding.Mesh):
        self._mesh = mesh
        rep, data = parallel.replicated(mesh), parallel.data_sharded(mesh)
        self._networks = networks(model)
        self._eval = {n: parallel.jit_eval_step(functools.partial(
            steps.eval_step, model=model, column=n), mesh) for n in self._networks}
        self._moments = {n: jax.jit(functools.partial(batch_moments, model, network=n),
                                    in_shardings=(rep, data), out_shardings=rep)
                         for n in self._networks}
        self._model = model

    def precise_stats(self, variables: Variables, calibration: Sequence[np.ndarray]
                      ) -> dict[str, BatchStats]:
        """{network name: its precise statistics on `calibration`} for every network."""
        batches = [parallel.to_global({"image": b}, self._mesh)["image"] for b in calibration]
        stats = {network_name(n): precise_batch_stats(self._model, variables, batches, n,
                                                      self._moments[n])
                 for n in self._networks}
        return jax.device_put(stats, parallel.replicated(self._mesh))

    def __call__(self, variables: Variables, batches: Iterable[dict],
                 calibration: Sequence[np.ndarray] | None = None
                 ) -> tuple[dict[str, float], dict[str, BatchStats] | None]:
        """Returns (metrics, {network name: precise statistics}, or None without calibration)."""
        precise = None if calibration is None else self.precise_stats(variables, calibration)
        kinds = {"": None} if precise is None else {"": "precise", STORED_PREFIX: None}
        # (network, prefix) -> the variables it is evaluated with
        evaluated = {(n, prefix): variables if kind is None else
                     {"params": variables["params"], "batch_stats": precise[network_name(n)]}
                     for n in self._networks for prefix, kind in kinds.items()}
        totals = {k: {"loss_sum": 0.0, "correct": 0.0, "count": 0.0} for k in evaluated}
        for batch in batches:
            batch = parallel.to_global(batch, self._mesh)
            for (n, prefix), v in evaluated.items():
                for key, value in jax.device_get(self._eval[n](v, batch)).items():
                    totals[n, prefix][key] += float(value)
        metrics = {}
        for prefix in kinds:
            for n in self._networks:
                t = totals[n, prefix]
                metrics[f"{prefix}accuracy{metric_suffix(n)}"] = t["correct"] / max(t["count"], 1)
                metrics[f"{prefix}loss{metric_suffix(n)}"] = t["loss_sum"] / max(t["count"], 1)
        return metrics, precise
