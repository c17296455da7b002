"""Model names → constructors, so configs can say ``model.name = "fractalnet20"``."""
from __future__ import annotations

import difflib
from typing import Callable, Sequence

import flax.linen as nn

from fractal_jax.models import densenet, inception, resnet, resnext
from fractal_jax.models.columns import PlainNet
from fractal_jax.models.fractal import FractalNet
from fractal_jax.models.paper import CIFAR_DROPOUT, CIFAR_WIDTHS, ULTRA_WIDTHS


def fractalnet(num_classes: int = 10, *, num_blocks: int = 5,
               num_columns: int | Sequence[int] = 3, widths: Sequence[int] = CIFAR_WIDTHS,
               dropout: Sequence[float] | None = None, **kwargs) -> FractalNet:
    """A FractalNet with any B, C (an int or one per block), widths and dropout rates."""
    num_columns = num_columns if isinstance(num_columns, int) else tuple(num_columns)
    return FractalNet(num_classes=num_classes, num_blocks=num_blocks, num_columns=num_columns,
                      widths=tuple(widths), dropout=None if dropout is None else tuple(dropout),
                      **kwargs)


def fractalnet20(num_classes: int = 10, **kwargs) -> FractalNet:
    """Spec §2 standard CIFAR/SVHN model: B=5, C=3, 20 layers, 33,724,618 parameters (C10)."""
    return fractalnet(num_classes, **{"num_columns": 3, "dropout": CIFAR_DROPOUT, **kwargs})


def _ultra(columns: int) -> Callable[..., FractalNet]:
    def build(num_classes: int = 100, **kwargs) -> FractalNet:
        return fractalnet(num_classes, **{"num_columns": columns, "widths": ULTRA_WIDTHS,
                                          "dropout": CIFAR_DROPOUT, **kwargs})
    build.__doc__ = f"Ultra-deep study (Table 3): C={columns}, widths {ULTRA_WIDTHS}."
    return build


# Stage presets: 3 blocks, one column count per block (the first block shallower), GAP head.
STAGE_PRESETS = {
    "micro": ((1, 2, 2), (16, 32, 64)),
    "small": ((2, 3, 3), (32, 64, 128)),
    "medium": ((3, 4, 4), (64, 128, 256)),
    "large": ((4, 5, 5), (96, 192, 384)),
}


def _stages(columns: tuple[int, ...], widths: tuple[int, ...]) -> Callable[..., FractalNet]:
    def build(num_classes: int = 10, **kwargs) -> FractalNet:
        defaults = dict(num_blocks=len(columns), num_columns=columns, widths=widths, head="gap")
        return fractalnet(num_classes, **{**defaults, **kwargs})
    build.__doc__ = (f"Stage preset for 32x32 inputs: C={columns} per block, widths {widths}, "
                     "a pool after every block, GAP head.")
    return build


def fractalnet34_imagenet(num_classes: int = 1000, **kwargs) -> FractalNet:
    """ImageNet FractalNet-34: B=4, C=4, widths 128..1024, ResNet stem, GAP head (spec §2)."""
    defaults = dict(num_blocks=4, num_columns=4, widths=(128, 256, 512, 1024),
                    stem="imagenet", head="gap", pool_last_block=False)
    return fractalnet(num_classes, **{**defaults, **kwargs})


def plain(num_classes: int = 10, *, depth: int = 20, num_blocks: int = 5,
          widths: Sequence[int] = CIFAR_WIDTHS,
          dropout: Sequence[float] | None = None, **kwargs) -> PlainNet:
    """A plain conv chain of `depth` layers split evenly over the blocks (Table 4 baselines)."""
    if depth % num_blocks:
        raise ValueError(f"plain: depth {depth} must be a multiple of num_blocks {num_blocks}.")
    return PlainNet(num_classes=num_classes, num_blocks=num_blocks,
                    units_per_block=(depth // num_blocks,) * num_blocks, widths=tuple(widths),
                    dropout=None if dropout is None else tuple(dropout), **kwargs)


MODELS: dict[str, Callable[..., nn.Module]] = {
    "fractalnet": fractalnet,
    "fractalnet20": fractalnet20,
    **{f"fractalnet_ultra{c}": _ultra(c) for c in range(1, 7)},
    **{f"fractalnet_{size}": _stages(*preset) for size, preset in STAGE_PRESETS.items()},
    "fractalnet34_imagenet": fractalnet34_imagenet,
    "plain": plain,
    **resnet.MODELS, **resnext.MODELS, **densenet.MODELS, **inception.MODELS,
}


def list_models() -> list[str]:
    return sorted(MODELS)


def create_model(name: str, num_classes: int, **kwargs) -> nn.Module:
    """Builds the registered model `name`; keyword arguments override its defaults."""
    if name not in MODELS:
        close = difflib.get_close_matches(name, MODELS, n=3)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ValueError(f"Unknown model name {name!r}.{hint} Known models: "
                         f"{', '.join(list_models())}.")
    try:
        return MODELS[name](num_classes=num_classes, **kwargs)
    except TypeError as e:  # an option this model does not have
        raise ValueError(f"Model {name!r} rejected its options {sorted(kwargs)}: {e}") from None
