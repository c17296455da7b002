"""Saliency maps (Simonyan et al. 2014): where a trained run looks when it scores a class.

    python -m fractal_jax.analysis.saliency --workdir RUN --num-images 4 --outdir DIR \
        [--target predicted|label]

writes, for each of the first eval images, a PNG of the image beside the magnitude of the
gradient of one class score (the unnormalised logit) with respect to the input pixels.
"""
from __future__ import annotations

import argparse
import functools
import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from matplotlib.figure import Figure

from fractal_jax.analysis import runs as runs_lib
from fractal_jax.analysis.runs import Run, Variables
from fractal_jax.runtime import configure_jax
from fractal_jax.training.checkpoint import CheckpointError

TARGETS = ("predicted", "label")


@functools.partial(jax.jit, static_argnums=0)
def _input_gradients(model: nn.Module, variables: Variables, images: jax.Array,
                     classes: jax.Array) -> jax.Array:
    def total_score(x: jax.Array) -> jax.Array:
        logits = model.apply(variables, x, train=False)
        # Eval mode keeps examples independent (BatchNorm uses its running statistics), so the
        # gradient of the summed scores is every image's own gradient.
        return jnp.take_along_axis(logits, classes[:, None], axis=-1).sum()

    return jax.grad(total_score)(images)


def saliency(run: Run, images: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """Returns (N, H, W) maps: |d logit[classes[i]] / d images[i]|, maximised over channels.

    Large values mark the pixels whose change would most move that class's score.
    """
    grads = _input_gradients(run.model, runs_lib.network_variables(run),
                             jnp.asarray(images, jnp.float32),
                             jnp.asarray(classes, jnp.int32))
    return np.asarray(jnp.abs(grads).max(axis=-1))


def predicted_classes(run: Run, images: np.ndarray) -> np.ndarray:
    """Returns the run's most probable class for each image."""
    return np.asarray(runs_lib.probabilities(run, images).argmax(axis=-1))


def first_eval_examples(run: Run, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Returns (images, labels) of the first `count` examples of the run's eval split,
    normalised as the model sees them (fewer if the split is smaller)."""
    if count < 1:
        raise ValueError(f"the number of images must be >= 1, got {count}")
    images, labels = [], []
    for batch in runs_lib.eval_batches(run):
        mask = np.asarray(batch["mask"], bool)
        images.append(batch["image"][mask])
        labels.append(batch["label"][mask])
        if sum(map(len, labels)) >= count:
            break
    return np.concatenate(images)[:count], np.concatenate(labels)[:count]


def _min_max(x: np.ndarray) -> np.ndarray:
    """Returns `x` scaled to [0, 1] (zeros if constant), undoing normalisation for display."""
    low, high = float(x.min()), float(x.max())
    return (x - low) / (high - low) if high > low else np.zeros_like(x)


def save_saliency_png(image: np.ndarray, saliency_map: np.ndarray, path: str,
                      title: str | None = None) -> str:
    """Writes a PNG of `image` (H, W, C) beside its `saliency_map` (H, W); returns `path`.

    Uses a bare Figure (rendered by Agg), so no pyplot state or open figures are left behind.
    """
    figure = Figure(figsize=(6, 3.2), layout="constrained")
    image_axes, map_axes = figure.subplots(1, 2)
    shown = _min_max(np.asarray(image, np.float32))
    if shown.shape[-1] == 1:
        image_axes.imshow(shown[..., 0], cmap="gray", vmin=0, vmax=1)
    else:
        image_axes.imshow(shown)
    map_axes.imshow(saliency_map, cmap="hot")
    for axes, name in ((image_axes, "image"), (map_axes, "saliency")):
        axes.set_title(name)
        axes.set_axis_off()
    if title:
        figure.suptitle(title)
    figure.savefig(path, dpi=100)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, help="workdir of a trained run")
    parser.add_argument("--num-images", type=int, default=4)
    parser.add_argument("--outdir", required=True, help="where the PNGs are written")
    parser.add_argument("--target", choices=TARGETS, default="predicted",
                        help="the class whose score is differentiated: the run's prediction "
                        "or the true label")
    args = parser.parse_args(argv)
    configure_jax()
    try:
        run = runs_lib.load_run(args.workdir)
        images, labels = first_eval_examples(run, args.num_images)
    except (ValueError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    predicted = predicted_classes(run, images)
    classes = predicted if args.target == "predicted" else labels
    maps = saliency(run, images, classes)
    names = run.info.class_names
    os.makedirs(args.outdir, exist_ok=True)
    for i, (image, saliency_map) in enumerate(zip(images, maps)):
        title = (f"label {names[labels[i]]}, predicted {names[predicted[i]]}; "
                 f"gradient of {names[classes[i]]}")
        path = save_saliency_png(image, saliency_map,
                                 os.path.join(args.outdir, f"saliency_{i:03d}.png"), title)
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
