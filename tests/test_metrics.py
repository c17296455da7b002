"""Metrics records round-trip, survive a killed writer, and feed the plots and tables."""
import glob
import os

import jax.numpy as jnp
import numpy as np
import pytest

from fractal_jax.analysis import plots
from fractal_jax.training import metrics as metrics_lib


def _write_run(workdir, steps, **kwargs) -> None:
    with metrics_lib.MetricsWriter(str(workdir), **kwargs) as writer:
        for step in steps:
            writer.write(step, "train", {"loss": jnp.float32(1.0 / step), "accuracy": np.float64(0.5)})
            if step % 2 == 0:
                writer.write(step, "eval", {"accuracy": jnp.asarray(0.25 * step),
                                            "num_examples": np.int32(10)})


def test_round_trip_converts_to_python_numbers(tmp_path):
    _write_run(tmp_path, [1, 2], tensorboard=False)
    records = metrics_lib.read_metrics(str(tmp_path))
    assert records == [
        {"step": 1, "split": "train", "loss": 1.0, "accuracy": 0.5},
        {"step": 2, "split": "train", "loss": 0.5, "accuracy": 0.5},
        {"step": 2, "split": "eval", "accuracy": 0.5, "num_examples": 10},
    ]
    assert type(records[2]["num_examples"]) is int
    assert not os.path.exists(tmp_path / metrics_lib.TENSORBOARD_DIR)


def test_bad_values_raise(tmp_path):
    with metrics_lib.MetricsWriter(str(tmp_path), tensorboard=False) as writer:
        with pytest.raises(ValueError, match="reserved"):
            writer.write(1, "train", {"step": 1.0})
        with pytest.raises(ValueError, match="scalars"):
            writer.write(1, "train", {"loss": jnp.ones(2)})


def test_missing_file_reads_empty(tmp_path):
    assert metrics_lib.read_metrics(str(tmp_path)) == []
    metrics_lib.truncate_metrics(str(tmp_path), after_step=3)  # no file: nothing to do
    assert not os.path.exists(tmp_path / metrics_lib.METRICS_FILE)


def test_resumed_run_file_equals_uninterrupted_one(tmp_path):
    uninterrupted, resumed = tmp_path / "a", tmp_path / "b"
    _write_run(uninterrupted, range(1, 7), tensorboard=False)
    # Killed after step 5 (mid-line), last checkpoint at step 4: resume writes 5 and 6 again.
    _write_run(resumed, range(1, 6), tensorboard=False)
    with open(resumed / metrics_lib.METRICS_FILE, "a") as f:
        f.write('{"step": 6, "split": "tr')
    assert [r["step"] for r in metrics_lib.read_metrics(str(resumed))][-1] == 5  # partial line skipped
    metrics_lib.truncate_metrics(str(resumed), after_step=4)
    assert max(r["step"] for r in metrics_lib.read_metrics(str(resumed))) == 4
    _write_run(resumed, [5, 6], tensorboard=False)
    resumed_bytes = (resumed / metrics_lib.METRICS_FILE).read_bytes()
    assert resumed_bytes == (uninterrupted / metrics_lib.METRICS_FILE).read_bytes()


def test_writer_drops_partial_trailing_line(tmp_path):
    _write_run(tmp_path, [1], tensorboard=False)
    with open(tmp_path / metrics_lib.METRICS_FILE, "a") as f:
        f.write('{"step": 2, "spl')
    _write_run(tmp_path, [2], tensorboard=False)
    assert [(r["step"], r["split"]) for r in metrics_lib.read_metrics(str(tmp_path))] == [
        (1, "train"), (2, "train"), (2, "eval")]


def test_tensorboard_event_files(tmp_path):
    _write_run(tmp_path, [1, 2], purge_step=1)
    assert glob.glob(str(tmp_path / metrics_lib.TENSORBOARD_DIR / "events.out.tfevents.*"))


def _eval_record(step: int) -> dict:
    return {"step": step, "split": "eval", "accuracy": 0.9735, "loss": 0.123456,
            "accuracy/column_1": 0.5, "loss/column_1": 1.5,
            "accuracy/column_2": 0.81234, "loss/column_2": 0.75,
            "accuracy/column_10": 0.9}


def test_learning_curves_png(tmp_path):
    records = [{"step": s, "split": "train", "loss": 2.0 / s, "accuracy": 1 - 1.0 / s} for s in range(1, 5)]
    records += [_eval_record(2), _eval_record(4)]
    path = plots.plot_learning_curves(records, str(tmp_path / "curves.png"))
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.getsize(path) > 10_000


def test_column_accuracy_table():
    table = plots.column_accuracy_table(_eval_record(4))
    lines = table.splitlines()
    assert lines[0] == "| | accuracy | loss |"
    assert lines[2:] == [
        "| full network | 97.35% | 0.1235 |",
        "| column 1 | 50.00% | 1.5000 |",
        "| column 2 | 81.23% | 0.7500 |",
        "| column 10 | 90.00% | – |",
    ]
