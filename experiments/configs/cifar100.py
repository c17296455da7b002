"""CIFAR-100 with the paper's recipe (spec §4, Table 1); the same as cifar10.py but 100 classes."""
from experiments.configs import cifar10


def get_config():
    c = cifar10.get_config()
    c.dataset = "cifar100"
    return c
