"""Measured eval speed of a trained run: `eval_images_per_second(run, column)`."""
from __future__ import annotations

import itertools
import time

import jax

from fractal_jax.analysis import runs

TIMING_BATCHES = 4  # eval batches per timed pass
TIMING_PASSES = 5  # timed passes after the warm-up one, to average out timer noise


def eval_images_per_second(run: runs.Run, column: int | None = None) -> float:
    """Returns eval-mode images/s of the run's jitted forward pass on its first eval batches.

    `column` times one FractalNet column alone (None: the full network). One warm-up pass
    compiles; the timed passes count every row, padding included, since the compiled program
    computes them all. The result varies from run to run with the machine's load.
    """
    images = [jax.device_put(b["image"])
              for b in itertools.islice(runs.eval_batches(run), TIMING_BATCHES)]

    def one_pass():
        jax.block_until_ready([runs.probabilities(run, x, column=column) for x in images])

    one_pass()
    start = time.perf_counter()
    for _ in range(TIMING_PASSES):
        one_pass()
    elapsed = time.perf_counter() - start
    return TIMING_PASSES * sum(len(x) for x in images) / elapsed
