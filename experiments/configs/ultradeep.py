"""The ultra-deep study (Tables 3–4): CIFAR-100++ with widths 16..128, batch 50, 400 epochs.

Pick the column count with ``--config.model.name=fractalnet_ultra1`` … ``fractalnet_ultra6``
(depth 5 … 160); the default is C=4 (40 layers).
"""
from experiments.configs import cifar10


def get_config():
    c = cifar10.get_config()
    c.dataset = "cifar100"
    c.data.augment = "++"
    c.model.name = "fractalnet_ultra4"
    c.batch_size = 50
    c.num_train_steps = 400 * 1_000  # 400 epochs × 50,000 / 50
    return c
