"""A tiny digits experiment for tests: compiles in seconds, trains 12 steps."""
from experiments.configs import digits


def get_config():
    c = digits.get_config()
    c.model.num_columns = 2
    c.model.widths = (8, 8, 16)
    c.model.dropout = (0.0, 0.1, 0.1)
    c.batch_size = 30
    c.eval_batch_size = 300
    c.num_train_steps = 12
    c.log_every_steps = 3
    c.eval_every_steps = 6
    c.checkpoint_every_steps = 6
    c.progress_bar = False
    return c
