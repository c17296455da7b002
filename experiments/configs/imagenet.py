"""ImageNet with the paper's recipe (spec §2, §4): FractalNet-34 (B=4, C=4, ResNet stem, GAP
head), batch 32, 70 epochs, lr 0.001 ÷10 at epochs 50 and 65, random-resized crops + flips."""
from fractal_jax.config import base_config

TRAIN_IMAGES = 1_281_167


def get_config():
    c = base_config()
    c.dataset = "imagenet2012"
    c.data.augment = "none"  # ImageNet always trains on random-resized crops + flips
    c.data.normalize = "mean_std"
    c.data.eval_split = "validation"
    c.model.name = "fractalnet34_imagenet"
    c.batch_size = 32
    c.eval_batch_size = 200
    c.num_train_steps = 70 * TRAIN_IMAGES // 32
    c.optim.learning_rate = 0.001
    c.optim.schedule = "steps"
    c.optim.boundaries_epochs = (50, 65)
    c.log_every_steps = 500
    c.eval_every_steps = 40_000
    c.checkpoint_every_steps = 10_000
    return c
