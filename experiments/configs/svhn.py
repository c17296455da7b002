"""SVHN (cropped digits, 73,257 training images) with the paper's recipe: 20 epochs, lr 0.02
÷10 each time the remaining epochs halve, batch 100, no augmentation (spec §4)."""
from fractal_jax.config import base_config


def get_config():
    c = base_config()
    c.dataset = "svhn_cropped"
    c.data.augment = "none"
    c.model.name = "fractalnet20"
    c.batch_size = 100
    c.num_train_steps = 20 * 73_257 // 100
    c.optim.num_epochs = 20
    c.eval_every_steps = 1_000
    c.checkpoint_every_steps = 1_000
    return c
