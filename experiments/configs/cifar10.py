"""CIFAR-10 with the paper's recipe (spec §4, Table 1): FractalNet-20, SGD 0.9, lr 0.02 ÷10 at
epochs 200/300/350/375 of 400, batch 100, drop-path (local 0.15, global 50%) and dropout.

Augmentation tier: ``--config.data.augment=none`` (C10), ``+`` (C10+, default), ``++`` (C10++).
"""
from fractal_jax.config import base_config


def get_config():
    c = base_config()
    c.dataset = "cifar10"
    c.data.augment = "+"
    c.model.name = "fractalnet20"
    c.batch_size = 100
    c.num_train_steps = 400 * 500  # 400 epochs × 50,000 / 100
    c.optim.num_epochs = 400
    return c
