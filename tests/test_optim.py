"""Learning-rate schedules and optimizers match the paper's recipe and reject bad configs."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fractal_jax import config as config_lib
from fractal_jax.training import optim as optim_lib


def _config(**overrides):
    config = config_lib.default_optim_config()
    config.update(overrides)
    return config


def _validated(**overrides):
    """The experiment config with `optim` overrides, through the one validation every run uses."""
    config = config_lib.base_config()
    config.optim.update(overrides)
    return config_lib.validate(config)


def _lr(schedule, step: int) -> float:
    return float(schedule(jnp.asarray(step, jnp.int32)))


def test_paper_schedule_drops_when_remaining_epochs_halve():
    spe = 500
    schedule = optim_lib.create_learning_rate_schedule(_config(), steps_per_epoch=spe,
                                                       num_train_steps=400 * spe)
    expected = {0: 0.02, 200 * spe - 1: 0.02, 200 * spe: 2e-3, 300 * spe - 1: 2e-3, 300 * spe: 2e-4,
                350 * spe: 2e-5, 375 * spe - 1: 2e-5, 375 * spe: 2e-6, 400 * spe - 1: 2e-6}
    for step, lr in expected.items():
        np.testing.assert_allclose(_lr(schedule, step), lr, rtol=1e-5, err_msg=f"step {step}")


def test_paper_schedule_rounds_fractional_epochs_to_nearest_step():
    assert optim_lib.paper_drop_epochs(20) == [10, 15, 17.5, 18.75]
    # SVHN: 20 epochs; with 10 steps/epoch the drops at 17.5 and 18.75 land on steps 175 and 188.
    schedule = optim_lib.create_learning_rate_schedule(_config(num_epochs=20), steps_per_epoch=10,
                                                       num_train_steps=200)
    for step, lr in {174: 2e-4, 175: 2e-5, 187: 2e-5, 188: 2e-6}.items():
        np.testing.assert_allclose(_lr(schedule, step), lr, rtol=1e-5, err_msg=f"step {step}")


def test_colliding_boundaries_multiply():
    # One epoch of 2 steps: drops at 0.5, 0.75, 0.875, 0.9375 epochs round to steps 1, 2, 2, 2.
    schedule = optim_lib.create_learning_rate_schedule(_config(num_epochs=1), steps_per_epoch=2,
                                                       num_train_steps=2)
    np.testing.assert_allclose([_lr(schedule, s) for s in range(3)], [0.02, 2e-3, 2e-6], rtol=1e-5)


def test_imagenet_step_schedule():
    config = _config(learning_rate=0.001, schedule="steps", boundaries_epochs=(50, 65))
    schedule = optim_lib.create_learning_rate_schedule(config, steps_per_epoch=100, num_train_steps=7000)
    for step, lr in {0: 1e-3, 4999: 1e-3, 5000: 1e-4, 6499: 1e-4, 6500: 1e-5, 6999: 1e-5}.items():
        np.testing.assert_allclose(_lr(schedule, step), lr, rtol=1e-5, err_msg=f"step {step}")


def test_cosine_ends_near_zero_and_constant_stays():
    cosine = optim_lib.create_learning_rate_schedule(_config(schedule="cosine"), steps_per_epoch=10,
                                                     num_train_steps=1000)
    assert _lr(cosine, 0) == pytest.approx(0.02)
    assert _lr(cosine, 500) == pytest.approx(0.01, rel=1e-4)
    assert _lr(cosine, 1000) < 1e-8
    constant = optim_lib.create_learning_rate_schedule(_config(schedule="constant"), steps_per_epoch=10,
                                                       num_train_steps=1000)
    assert _lr(constant, 999) == pytest.approx(0.02)


def test_warmup_ramps_linearly_then_follows_absolute_steps():
    config = _config(schedule="steps", boundaries_epochs=(2,), warmup_steps=10)
    schedule = optim_lib.create_learning_rate_schedule(config, steps_per_epoch=10, num_train_steps=40)
    np.testing.assert_allclose([_lr(schedule, s) for s in (0, 5, 10, 19)], [0.0, 0.01, 0.02, 0.02], rtol=1e-6)
    # The drop stays at epoch 2 (step 20); the warmup does not push it back.
    assert _lr(schedule, 20) == pytest.approx(2e-3)


def _params():
    return {
        "conv": {"kernel": jnp.ones((3, 3, 1, 2))},
        "bn": {"scale": jnp.ones((2,)), "bias": jnp.ones((2,))},
        "dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones((2,))},
    }


def _one_update(config, params, grads=None):
    tx, _ = optim_lib.create_optimizer(config, steps_per_epoch=10, num_train_steps=100)
    grads = jax.tree.map(jnp.zeros_like, params) if grads is None else grads
    updates, _ = tx.update(grads, tx.init(params), params)
    return optax.apply_updates(params, updates)


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_weight_decay_on_kernels_only(name):
    params = _params()
    new = _one_update(_config(name=name, weight_decay=0.5, schedule="constant"), params)
    assert float(new["conv"]["kernel"].max()) < 1.0
    assert float(new["dense"]["kernel"].max()) < 1.0
    for leaf in (new["bn"]["scale"], new["bn"]["bias"], new["dense"]["bias"]):
        np.testing.assert_array_equal(leaf, 1.0)
    config = _config(name=name, weight_decay=0.5, schedule="constant", weight_decay_on="all")
    decayed_all = _one_update(config, params)
    assert float(decayed_all["bn"]["scale"].max()) < 1.0


def test_sgd_step_is_lr_times_grad_without_decay():
    params = {"w": {"kernel": jnp.ones((2,))}}
    new = _one_update(_config(schedule="constant"), params, {"w": {"kernel": jnp.full((2,), 2.0)}})
    np.testing.assert_allclose(new["w"]["kernel"], 1.0 - 0.02 * 2.0, rtol=1e-6)


def test_nesterov_differs_from_plain_momentum():
    params = {"w": jnp.zeros((3,))}
    grads = {"w": jnp.ones((3,))}

    def two_steps(nesterov):
        tx, _ = optim_lib.create_optimizer(_config(nesterov=nesterov, schedule="constant"),
                                           steps_per_epoch=1, num_train_steps=10)
        state, p = tx.init(params), params
        for _ in range(2):
            updates, state = tx.update(grads, state, p)
            p = optax.apply_updates(p, updates)
        return p["w"]

    # Plain: -lr*(1 + 1.9); Nesterov: -lr*(1.9 + 2.71).
    np.testing.assert_allclose(two_steps(False), -0.02 * 2.9, rtol=1e-6)
    np.testing.assert_allclose(two_steps(True), -0.02 * 4.61, rtol=1e-6)


def test_grad_clip_bounds_the_update():
    params = {"w": jnp.zeros((4,))}
    new = _one_update(_config(grad_clip_norm=1.0, momentum=0.0, schedule="constant"), params,
                      {"w": jnp.full((4,), 100.0)})
    np.testing.assert_allclose(jnp.linalg.norm(new["w"]), 0.02, rtol=1e-5)


@pytest.mark.parametrize("overrides, key", [
    ({"name": "rmsprop"}, "name"),
    ({"schedule": "linear"}, "schedule"),
    ({"learning_rate": -0.1}, "learning_rate"),
    ({"momentum": 1.0}, "momentum"),
    ({"momentum": -0.1}, "momentum"),
    ({"weight_decay": -1e-4}, "weight_decay"),
    ({"weight_decay_on": "biases"}, "weight_decay_on"),
    ({"decay_factor": 0.0}, "decay_factor"),
    ({"boundaries_epochs": (65, 50)}, "boundaries_epochs"),
    ({"warmup_steps": -1}, "warmup_steps"),
    ({"b2": 1.0}, "b2"),
    ({"grad_clip_norm": -1.0}, "grad_clip_norm"),
    ({"num_epochs": 0}, "num_epochs"),
])
def test_bad_values_raise_naming_the_key(overrides, key):
    with pytest.raises(ValueError, match=f"optim.{key}=.* is invalid"):
        _validated(**overrides)


def test_unknown_name_lists_valid_values_and_unknown_keys_raise():
    with pytest.raises(ValueError, match="'sgd', 'adamw'"):
        _validated(name="adam")
    config = config_lib.base_config()
    config.optim.learning_rte = 0.1
    with pytest.raises(ValueError, match="Did you mean 'optim.learning_rate'"):
        config_lib.validate(config)
    with pytest.raises(ValueError, match="steps_per_epoch"):
        optim_lib.create_learning_rate_schedule(_config(), steps_per_epoch=0, num_train_steps=100)


def test_the_optimizer_comes_with_the_schedule_it_follows():
    tx, schedule = optim_lib.create_optimizer(_config(schedule="cosine"), steps_per_epoch=10,
                                              num_train_steps=100)
    params = {"w": jnp.zeros((1,))}
    state = tx.init(params)
    for _ in range(3):
        updates, state = tx.update({"w": jnp.ones((1,))}, state, params)
    # Unit gradients, momentum 0.9: the third update is the step-2 learning rate times the trace.
    assert _lr(schedule, 2) < _lr(schedule, 0)
    np.testing.assert_allclose(updates["w"], -_lr(schedule, 2) * (1 + 0.9 + 0.81), rtol=1e-5)
