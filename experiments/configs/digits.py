"""The default experiment: a small FractalNet on the offline digits dataset (8×8, 10 classes).

Three blocks of C=3 columns (8×8 → 1×1, 12 conv layers on the deepest path), the paper's
drop-path (local 0.15, global 50%) and per-block dropout; trains in a few minutes on 2 CPU cores.
"""
from fractal_jax.config import base_config


def get_config():
    c = base_config()
    c.dataset = "digits"
    # The "+" tier scaled to 8×8 images: ±1 px translations, no mirroring (digits are not
    # mirror-symmetric); without it the net overfits the 1,500 training digits.
    c.data.augment = "+"
    c.data.max_shift = 1
    c.data.flip = False
    c.model.name = "fractalnet"
    c.model.num_blocks = 3
    c.model.num_columns = 3
    c.model.widths = (32, 64, 128)
    c.model.dropout = (0.0, 0.1, 0.2)
    c.batch_size = 50
    c.eval_batch_size = 300
    c.num_train_steps = 1_500  # 50 epochs of the 1,500 training digits
    c.optim.num_epochs = 50
    c.log_every_steps = 30
    c.eval_every_steps = 300
    c.checkpoint_every_steps = 300
    return c
