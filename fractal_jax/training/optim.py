"""Optimizers and learning-rate schedules built from an `optim` ConfigDict.

The paper's recipe [P §4.1] is SGD with momentum 0.9 and a learning rate divided by 10 each
time the number of remaining epochs halves (0.02 for 400 epochs: drops at 200, 300, 350, 375).
The config is validated by `config.validate`. Every schedule here is a function of the absolute
optimizer step, so a drop "at epoch 200"
happens at step 200 * steps_per_epoch whether or not a warmup precedes it.
"""
import ml_collections
import optax
from flax import traverse_util

# The paper lists four drops (at 1/2, 3/4, 7/8 and 15/16 of training) and no more.
PAPER_NUM_DROPS = 4


def paper_drop_epochs(num_epochs: float) -> list[float]:
    """Returns the epochs at which the paper's rule divides the learning rate.

    Each drop comes when the remaining epochs halve: 400 -> [200, 300, 350, 375]; 20 (SVHN)
    -> [10, 15, 17.5, 18.75]. Fractional epochs are kept here and rounded to the nearest
    step by the schedule.
    """
    return [num_epochs * (1 - 0.5**k) for k in range(1, PAPER_NUM_DROPS + 1)]


def _step_decay(init_value: float, boundary_epochs: list[float], factor: float,
                steps_per_epoch: int) -> optax.Schedule:
    """Returns a piecewise-constant schedule that multiplies by `factor` at each epoch boundary.

    Boundaries become steps by round(epoch * steps_per_epoch) (Python's round: ties to even).
    Boundaries that round to the same step (short runs, fractional epochs) multiply their factors
    instead of overwriting each other, which a plain {step: scale} dict would do.
    """
    scales: dict[int, float] = {}
    for epoch in boundary_epochs:
        step = round(epoch * steps_per_epoch)
        scales[step] = scales.get(step, 1.0) * factor
    return optax.piecewise_constant_schedule(init_value, scales)


def create_learning_rate_schedule(optim: ml_collections.ConfigDict, *, steps_per_epoch: int,
                                  num_train_steps: int) -> optax.Schedule:
    """Returns the learning rate as a function of the optimizer step.

    "paper": ×`decay_factor` at each of `paper_drop_epochs(num_epochs)`; "steps": ×`decay_factor`
    at each of `boundaries_epochs`; "cosine": from `learning_rate` to 0 at `num_train_steps`; "constant".
    Epoch boundaries past `num_train_steps` are simply never reached, so a short smoke run with
    the full recipe's config works. A linear warmup from 0 replaces the first `warmup_steps`.
    """
    if steps_per_epoch <= 0 or num_train_steps <= 0:
        raise ValueError(f"steps_per_epoch and num_train_steps must be > 0, got {steps_per_epoch}, "
                         f"{num_train_steps}")
    lr = optim.learning_rate
    if optim.schedule == "paper":
        schedule = _step_decay(lr, paper_drop_epochs(optim.num_epochs), optim.decay_factor, steps_per_epoch)
    elif optim.schedule == "steps":
        schedule = _step_decay(lr, list(optim.boundaries_epochs), optim.decay_factor, steps_per_epoch)
    elif optim.schedule == "cosine":
        schedule = optax.cosine_decay_schedule(lr, decay_steps=num_train_steps)
    else:
        schedule = optax.constant_schedule(lr)
    warmup_steps = optim.warmup_steps
    if warmup_steps == 0:
        return schedule
    warmup = optax.linear_schedule(0.0, lr, transition_steps=warmup_steps)
    # join_schedules hands later schedules the steps since their boundary; shift back so the
    # main schedule keeps seeing absolute steps (and drops stay at their epochs).
    return optax.join_schedules([warmup, lambda step: schedule(step + warmup_steps)], [warmup_steps])


def _kernels_only(params: optax.Params) -> optax.Params:
    """Returns a boolean tree that is True only for conv/dense kernels (not BN scale, biases)."""
    return traverse_util.path_aware_map(lambda path, _: path[-1] == "kernel", params)


def create_optimizer(optim: ml_collections.ConfigDict, *, steps_per_epoch: int, num_train_steps: int
                     ) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Returns the optax transformation for a validated `optim` config
    (`config.default_optim_config` lists the fields) and its learning-rate schedule, which the
    training loop logs.

    SGD adds `weight_decay * param` to the gradient before momentum (`add_decayed_weights` then
    `sgd`, the Caffe convention); AdamW uses its own decoupled decay. `weight_decay_on="kernels"`
    exempts BatchNorm scales/offsets and biases. Gradient clipping by global norm, when on, comes
    first.
    """
    schedule = create_learning_rate_schedule(optim, steps_per_epoch=steps_per_epoch,
                                             num_train_steps=num_train_steps)
    mask = _kernels_only if optim.weight_decay_on == "kernels" else None
    if optim.name == "sgd":
        # momentum 0 means plain SGD: no trace buffer in the optimizer state.
        tx = optax.sgd(schedule, momentum=optim.momentum or None, nesterov=optim.nesterov)
        if optim.weight_decay > 0:
            tx = optax.chain(optax.add_decayed_weights(optim.weight_decay, mask), tx)
    else:
        tx = optax.adamw(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps,
                         weight_decay=optim.weight_decay, mask=mask, nesterov=optim.nesterov)
    if optim.grad_clip_norm:
        tx = optax.chain(optax.clip_by_global_norm(optim.grad_clip_norm), tx)
    return tx, schedule
