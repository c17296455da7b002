"""Table 4's plain baselines: a chain of conv units without joins, trained with the ultra-deep
study's recipe (CIFAR-100++, widths 16..128, batch 50, 400 epochs; see ultradeep.py) and the same
per-block dropout as its fractal networks (the paper does not say otherwise).

Pick the depth with ``--config.model.depth=5`` / ``10`` / ``20`` / ``40`` (default 20).
"""
from experiments.configs import ultradeep
from fractal_jax.models.paper import CIFAR_DROPOUT, ULTRA_WIDTHS


def get_config():
    c = ultradeep.get_config()
    c.model.name = "plain"
    c.model.depth = 20
    c.model.widths = ULTRA_WIDTHS
    c.model.dropout = CIFAR_DROPOUT
    return c
