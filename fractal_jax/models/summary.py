"""``python -m fractal_jax.models.summary NAME``: structure, parameters and FLOPs of a model.

Prints the fractal schedule of each block (depth, units, joins) for fractal models, a per-module
table of output shapes, parameters and FLOPs per image (XLA's cost analysis through
`flax.linen.tabulate`), and ends with ``total parameters: 33,724,618``.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fractal_jax.models.fractal import FractalNet
from fractal_jax.models.registry import create_model, list_models


def count_params(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Number of trainable parameters, from shapes only (nothing is compiled or run)."""
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(input_shape)))
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(variables["params"]))


def count_flops(model: nn.Module, input_shape: tuple[int, ...], **kwargs: Any) -> float:
    """FLOPs of one eval-mode forward pass, from XLA's cost analysis of the lowered program."""
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(input_shape)))
    lowered = jax.jit(lambda v, x: model.apply(v, x, **kwargs)).lower(
        variables, jax.ShapeDtypeStruct(input_shape, jnp.float32))
    return float(lowered.cost_analysis()["flops"])


def schedule_lines(model: FractalNet) -> list[str]:
    lines = []
    for b, block in enumerate(model.network_schedule.blocks):
        lines.append(f"block {b + 1}: C={block.num_columns} depth={block.depth} "
                     f"units={len(block.units)} joins={len(block.joins)} "
                     f"width={model.widths[b]} dropout={model.dropout_rates[b]:g}  "
                     f"[{block.describe()}]")
    return lines


def summarize(name: str, num_classes: int, input_size: int, channels: int = 3) -> str:
    model = create_model(name, num_classes)
    shape = (1, input_size, input_size, channels)
    table = nn.tabulate(model, jax.random.key(0), depth=1, compute_flops=True,
                        console_kwargs={"force_terminal": False, "color_system": None,
                                        "width": 140})(jnp.zeros(shape))
    lines = [f"{name}: {num_classes} classes, input {input_size}x{input_size}x{channels}"]
    if isinstance(model, FractalNet):
        schedule = model.network_schedule
        lines.append(f"depth (deepest column, conv layers in blocks): {schedule.depth}")
        lines += schedule_lines(model)
    lines.append(table.rstrip())
    lines.append(f"FLOPs per image: {count_flops(model, shape):,.0f}")
    lines.append(f"total parameters: {count_params(model, shape):,}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", help=f"one of: {', '.join(list_models())}")
    parser.add_argument("--num-classes", type=int, default=None,
                        help="classifier outputs (default: the model's own, e.g. 10 or 1000)")
    parser.add_argument("--input-size", type=int, default=None,
                        help="square input side (default: 224 for ImageNet models, else 32)")
    parser.add_argument("--channels", type=int, default=3)
    args = parser.parse_args(argv)
    try:
        default = create_model(args.name, args.num_classes or 1)
    except ValueError as e:
        parser.error(str(e))
    # ImageNet models downsample by 32 (or have the ImageNet stem); CIFAR ones take 32x32.
    imagenet = getattr(default, "stem", None) == "imagenet" or \
        getattr(default, "min_input_size", 1) >= 32
    num_classes = args.num_classes or (1000 if imagenet else 10)
    size = args.input_size or (224 if imagenet else 32)
    try:
        print(summarize(args.name, num_classes, size, args.channels))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
