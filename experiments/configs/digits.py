"""The default experiment: a small FractalNet on the offline digits dataset (8×8, 10 classes).

Three blocks of C=3 columns (8×8 → 1×1, 12 conv layers on the deepest path) with the paper's
drop-path (local 0.15, global 50%); trains in a few minutes on 2 CPU cores.
"""
from fractal_jax.config import base_config


def get_config():
    c = base_config()
    c.dataset = "digits"
    # Try "+" with data.max_shift=1, data.flip=False: the paper's ±4 px would erase an 8×8 digit.
    c.data.augment = "none"
    c.model.name = "fractalnet"
    c.model.num_blocks = 3
    c.model.num_columns = 3
    c.model.widths = (32, 64, 128)
    # No dropout and slow BatchNorm averages: with drop-path, dropout's train/test variance shift
    # and BN statistics of only the last ~10 plans made the full network's accuracy swing by
    # ±2% between evaluations on this small data set.
    c.model.dropout = None
    c.model.bn_momentum = 0.99
    c.batch_size = 50
    c.eval_batch_size = 300
    c.num_train_steps = 1_500  # 50 epochs of the 1,500 training digits
    c.optim.num_epochs = 50
    c.log_every_steps = 30
    c.eval_every_steps = 300
    c.checkpoint_every_steps = 300
    return c
