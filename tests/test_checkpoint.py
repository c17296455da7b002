"""Checkpoints restore bit for bit, keep the right steps, and survive damaged step directories."""
import json
import logging
import os

import chex
import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fractal_jax.training import checkpoint as ckpt
from fractal_jax.training import integrity


@flax.struct.dataclass
class State:
    params: dict
    batch_stats: dict
    opt_state: optax.OptState
    step: jax.Array
    rng: jax.Array


_TX = optax.sgd(0.1, momentum=0.9)


def _state(seed: int) -> State:
    key = jax.random.key(seed)
    params = {"conv": {"kernel": jax.random.normal(key, (3, 3, 2, 4))},
              "bn": {"scale": jnp.ones(4), "bias": jnp.zeros(4, jnp.bfloat16)}}
    opt_state = _TX.init(params)
    opt_state = jax.tree.map(lambda x: x + seed, opt_state)
    return State(params=params, batch_stats={"bn": {"mean": jnp.full(4, seed, jnp.float32)}},
                 opt_state=opt_state, step=jnp.asarray(seed, jnp.int32),
                 rng=jax.random.key_data(jax.random.fold_in(key, 7)))


def _target() -> State:
    return jax.tree.map(jnp.zeros_like, _state(0))


def _save_steps(workdir, steps, accuracies=None, **kwargs) -> None:
    with ckpt.Checkpointer(str(workdir), **kwargs) as checkpointer:
        for i, step in enumerate(steps):
            metrics = None if accuracies is None else {"accuracy": accuracies[i], "loss": 1.0}
            assert checkpointer.save(step, _state(step), metadata={"step": step, "config": {"seed": 0}},
                                     metrics=metrics)


def _step_dirs(workdir) -> list[int]:
    return sorted(int(name) for name in os.listdir(ckpt.checkpoint_dir(str(workdir))) if name.isdigit())


def test_round_trip_is_exact(tmp_path):
    state = _state(3)
    # Typed PRNG keys and Python ints (flax's TrainState.create starts with step=0) survive too.
    tree = {"train": state.replace(params={**state.params, "key": jax.random.key(5)}), "epoch": 3}
    metadata = {"config": {"model": "fractalnet20", "widths": [64, 128]}, "data_position": 42, "versions": {}}
    checkpointer = ckpt.Checkpointer(str(tmp_path))
    assert checkpointer.save(3, tree, metadata=metadata)  # async: returns before the write finishes
    checkpointer.wait()
    assert _step_dirs(tmp_path) == [3]
    target = {"train": jax.tree.map(jnp.zeros_like, tree["train"]), "epoch": 0}
    restored, restored_metadata = checkpointer.restore(target)
    checkpointer.close()
    assert type(restored["train"]) is State and type(restored["train"].opt_state) is type(state.opt_state)
    chex.assert_trees_all_equal(restored, tree, strict=True)
    chex.assert_trees_all_equal_shapes_and_dtypes(restored["train"], tree["train"])
    assert type(restored["epoch"]) is int and restored["epoch"] == 3
    assert restored["train"].rng.dtype == jnp.uint32
    assert restored["train"].params["bn"]["bias"].dtype == jnp.bfloat16
    assert restored_metadata == metadata


def test_synchronous_save_and_skipped_steps(tmp_path):
    checkpointer = ckpt.Checkpointer(str(tmp_path), async_save=False)
    assert checkpointer.save(5, _state(5), metadata={})
    assert _step_dirs(tmp_path) == [5]
    assert not checkpointer.save(5, _state(5), metadata={})  # not newer than the latest
    assert not checkpointer.save(4, _state(4), metadata={})
    with pytest.raises(TypeError):
        checkpointer.save(6, _state(6), metadata={"bad": np.float32(1.0)})
    with pytest.raises(ValueError, match="accuracy"):
        checkpointer.save(6, _state(6), metadata={}, metrics={"loss": 1.0})
    checkpointer.close()


def test_retention_keeps_latest_and_best_across_restarts(tmp_path):
    _save_steps(tmp_path, [1, 2, 3, 4, 5, 6], accuracies=[0.1, 0.9, 0.2, 0.3, 0.4, 0.5], keep=2)
    assert _step_dirs(tmp_path) == [2, 5, 6]
    # A new run in the same workdir still knows step 2 is the best.
    checkpointer = ckpt.Checkpointer(str(tmp_path), keep=2)
    assert checkpointer.all_steps() == [2, 5, 6]
    checkpointer.save(7, _state(7), metadata={}, metrics={"accuracy": 0.3})
    checkpointer.wait()
    assert checkpointer.all_steps() == _step_dirs(tmp_path) == [2, 6, 7]
    state, metadata = checkpointer.restore(_target(), step=2)
    checkpointer.close()
    chex.assert_trees_all_equal(state, _state(2))
    assert metadata["step"] == 2


def test_without_keep_best_only_latest_survive(tmp_path):
    _save_steps(tmp_path, [1, 2, 3, 4], accuracies=[0.9, 0.1, 0.1, 0.1], keep=2, keep_best=False)
    assert _step_dirs(tmp_path) == [3, 4]


def test_read_metadata(tmp_path):
    assert ckpt.read_metadata(str(tmp_path)) is None
    _save_steps(tmp_path, [10, 20])
    assert ckpt.read_metadata(str(tmp_path)) == {"step": 20, "config": {"seed": 0}}
    assert ckpt.read_metadata(str(tmp_path), step=10)["step"] == 10


def _truncate_state_files(step_dir: str) -> None:
    for root, _, files in os.walk(os.path.join(step_dir, "state")):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "r+b") as f:
                f.truncate(os.path.getsize(path) // 2)


def _delete_metadata_file(step_dir: str) -> None:
    os.remove(os.path.join(step_dir, "metadata", "metadata"))


def _truncate_metrics_file(step_dir: str) -> None:
    with open(os.path.join(step_dir, "metrics", "metrics"), "r+b") as f:
        f.truncate(5)


@pytest.mark.parametrize("damage", [_truncate_state_files, _delete_metadata_file, _truncate_metrics_file])
def test_damaged_latest_step_falls_back_to_previous(tmp_path, caplog, damage):
    _save_steps(tmp_path, [1, 2], accuracies=[0.5, 0.6])
    latest_dir = os.path.join(ckpt.checkpoint_dir(str(tmp_path)), "2")
    damage(latest_dir)
    checkpointer = ckpt.Checkpointer(str(tmp_path))
    if damage is not _truncate_metrics_file:  # metrics rank checkpoints; the state itself is fine
        with pytest.raises(ckpt.CheckpointError, match=latest_dir):
            checkpointer.restore(_target())
        expected_step = 1
    else:
        expected_step = 2
    with caplog.at_level(logging.WARNING):
        state, metadata, step = checkpointer.restore_latest_good(_target())
    assert step == metadata["step"] == expected_step
    chex.assert_trees_all_equal(state, _state(expected_step))
    if expected_step == 1:
        assert latest_dir in caplog.text
        # The damaged step is gone, so the resumed run can save step 2 again.
        assert checkpointer.all_steps() == [1]
        assert checkpointer.save(2, _state(2), metadata={"step": 2}, metrics={"accuracy": 0.6})
        checkpointer.wait()
        chex.assert_trees_all_equal(checkpointer.restore(_target())[0], _state(2))
    checkpointer.close()


def test_every_step_damaged_raises(tmp_path):
    _save_steps(tmp_path, [1, 2])
    for step in (1, 2):
        _truncate_state_files(os.path.join(ckpt.checkpoint_dir(str(tmp_path)), str(step)))
    with ckpt.Checkpointer(str(tmp_path)) as checkpointer:
        with pytest.raises(ckpt.CheckpointError, match="none of the checkpoints"):
            checkpointer.restore_latest_good(_target())
        assert checkpointer.all_steps() == [1, 2]  # nothing deleted


def test_no_checkpoints(tmp_path):
    with ckpt.Checkpointer(str(tmp_path)) as checkpointer:
        assert checkpointer.latest_step() is None
        assert checkpointer.all_steps() == []
        assert checkpointer.restore_latest_good(_target()) is None
        with pytest.raises(FileNotFoundError):
            checkpointer.restore(_target())


def test_metadata_is_plain_json_on_disk(tmp_path):
    _save_steps(tmp_path, [1])
    with open(os.path.join(ckpt.checkpoint_dir(str(tmp_path)), "1", "metadata", "metadata")) as f:
        saved = json.load(f)
    # What the caller gave, sealed with the arrays' checksums and the metadata's own digest.
    assert integrity.unsealed(saved) == {"step": 1, "config": {"seed": 0}}
    assert integrity.is_sealed(saved) and list(saved[integrity.CHECKSUMS]) == ["state"]
