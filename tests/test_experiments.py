"""Anytime evaluation (every column with its own BatchNorm statistics) and the paper tables."""
import csv
import dataclasses
import os
import subprocess
import sys

import numpy as np
import pytest

from experiments import anytime as anytime_script
from experiments import paper_results, reproduce
from fractal_jax.analysis import anytime, runs
from fractal_jax.data.sources import DatasetNotFoundError
from fractal_jax.models.columns import extract_column
from fractal_jax.models.registry import create_model
from fractal_jax.models.summary import count_params
from fractal_jax.training import evaluate, experiment, loop, parallel
from test_training import ROOT, tiny_config


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tfds")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_dir):
    """A tiny 2-column run: (workdir, final eval metrics). Steps are cheap, compiling is not:
    60 steps make the columns' accuracy clearly better than chance."""
    workdir = str(tmp_path_factory.mktemp("anytime_run"))
    config = tiny_config(data_dir, num_train_steps=60, eval_every_steps=30,
                         checkpoint_every_steps=30)
    return workdir, loop.train(config, workdir)


@pytest.fixture(scope="module")
def run(trained):
    return runs.load_run(trained[0])


def accuracy(run, column, bn="precise"):
    return runs.accuracy(*runs.predict(run, runs.eval_batches(run), column, bn))


@pytest.mark.parametrize("column", [1, 2, None])
def test_a_loaded_run_predicts_with_the_statistics_its_accuracy_came_from(run, trained, column):
    _, final = trained
    key = "accuracy" if column is None else f"accuracy/column_{column}"
    assert accuracy(run, column) == final[key]  # its own precise statistics, saved
    assert accuracy(run, column, "stored") == final[f"stored_bn/{key}"]
    # A standalone column network predicts as the column does, with the same statistics.
    plain, variables = extract_column(run.model, runs.network_variables(run, column), column) \
        if column else (run.model, runs.network_variables(run))
    batch = next(runs.eval_batches(run))
    np.testing.assert_allclose(
        plain.apply(variables, batch["image"]),
        run.model.apply(runs.network_variables(run, column), batch["image"],
                        **({} if column is None else {"column": column})), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("column", [2, None])
def test_precise_statistics_of_one_batch_make_eval_mode_compute_train_mode(run, column):
    x = experiment.calibration_batches(run.config, run.info.num_train_examples)
    count = min(run.config.precise_bn.num_examples, run.info.num_train_examples)
    assert len(x) == 1 and x[0].shape == (count, 8, 8, 1)
    mesh = parallel.create_mesh()
    stats = evaluate.Evaluator(run.model, mesh).precise_stats(run.variables, x)
    params = run.variables["params"]
    evaluated = run.model.apply({"params": params, "batch_stats": stats[
        evaluate.network_name(column)]}, x[0], column=column)
    trained, _ = run.model.clone(dropout=None).apply(
        run.variables, x[0], train=True, column=column, mutable=["batch_stats"])
    np.testing.assert_allclose(evaluated, trained, rtol=1e-4, atol=1e-4)


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_anytime_script_writes_tables_plot_and_identical_reruns(run, trained, tmp_path, capsys):
    workdir, final = trained
    first, second = tmp_path / "a", tmp_path / "b"
    for out in (first, second):
        assert anytime_script.main(["--workdir", workdir, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert (first / "anytime.md").read_text() in printed

    rows = read_csv(first / "anytime.csv")
    assert [r["network"] for r in rows] == ["column 1", "column 2", "full network"]
    assert [int(r["depth"]) for r in rows] == [3, 6, 6]
    shape = (1, 8, 8, 1)
    assert [int(r["params"]) for r in rows] == [
        count_params(extract_column(run.model, run.variables, c)[0], shape) for c in (1, 2)
    ] + [count_params(run.model, shape)]
    flops = [float(r["flops"]) for r in rows]
    assert 0 < flops[0] < flops[1] < flops[2]
    # Both kinds of statistics: exactly what training's own evaluation measured.
    for row, key in zip(rows, ("accuracy/column_1", "accuracy/column_2", "accuracy")):
        assert float(row["accuracy_precise_bn"]) == final[key]
        assert float(row["accuracy_stored_bn"]) == final[f"stored_bn/{key}"]

    for name in ("anytime.md", "anytime.csv"):
        assert (first / name).read_bytes() == (second / name).read_bytes()
    speed = (first / "anytime_speed.md").read_text().splitlines()
    assert [line.split("|")[1].strip() for line in speed[-3:]] == [r["network"] for r in rows]
    assert all(float(line.split("|")[2].replace(",", "")) > 0 for line in speed[-3:])
    assert (first / "anytime.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_anytime_errors_name_the_problem(run, tmp_path, capsys):
    assert anytime_script.main(["--workdir", str(tmp_path)]) == 2
    assert "no checkpoint in" in capsys.readouterr().err
    resnet = dataclasses.replace(run, model=create_model("resnet20", 10))
    with pytest.raises(ValueError, match="needs a FractalNet"):
        anytime.anytime_rows(resnet)


def test_recipes_are_the_published_ones():
    configs, rows = reproduce.recipe(1, "C10++")
    plain, drop_path = configs["fractalnet20"], configs["fractalnet20_drop_path"]
    for config in (plain, drop_path):
        assert (config.dataset, config.data.augment, config.model.name) == (
            "cifar10", "++", "fractalnet20")
        assert (config.batch_size, config.num_train_steps, config.optim.learning_rate) == (
            100, 200_000, 0.02)
    assert (plain.drop_path.p_local, plain.drop_path.p_global, plain.model.dropout) == (
        0.0, 0.0, (0.0,) * 5)
    assert (drop_path.drop_path.p_local, drop_path.drop_path.p_global) == (0.15, 0.5)
    assert drop_path.model.dropout is None  # fractalnet20's own (0, .1, .2, .3, .4)
    assert [r.model for r in rows] == list(paper_results.ERRORS[1])  # FractalNet-40 included
    assert reproduce.recipe(1, "C10")[1][-1].model == "→ deepest column alone"

    configs, rows = reproduce.recipe(4, "C100++")
    assert sorted(configs) == ["fractalnet_ultra4", "plain_10", "plain_20", "plain_40", "plain_5"]
    for config in configs.values():
        assert (config.dataset, config.data.augment, config.batch_size) == ("cifar100", "++", 50)
    assert configs["plain_40"].model.depth == 40
    assert [r.model for r in rows] == list(paper_results.ERRORS[4])
    assert sorted(reproduce.recipe(3, "C100++")[0]) == [
        f"fractalnet_ultra{c}" for c in range(1, 7)]


@pytest.mark.parametrize("table,setting,match", [
    (5, "C10", "unknown table 5; the paper's tables are 1, 2, 3, 4"),
    (3, "C10", "Table 3 has no setting 'C10'; it reports C100\\+\\+"),
    (1, "C10+++", "Table 1 has no setting 'C10\\+\\+\\+'; it reports C100, C100\\+"),
])
def test_unknown_table_or_setting_is_refused_with_the_choices(table, setting, match):
    with pytest.raises(ValueError, match=match):
        reproduce.recipe(table, setting)


def test_paper_budget_without_the_dataset_fails_before_training(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="fractal_jax.data.prepare cifar10 --data_dir"):
        reproduce.reproduce(1, "C10+", "paper", str(tmp_path / "runs"),
                            {"data_dir": str(tmp_path / "no_data")})
    assert not os.path.exists(tmp_path / "runs" / "paper" / "C10+")
    with pytest.raises(ValueError, match="unknown budget 'quick'; use one of paper, smoke"):
        reproduce.reproduce(1, "C10+", "quick", str(tmp_path / "runs"))


@pytest.mark.slow
def test_smoke_budget_fills_the_table_and_reruns_byte_identically(tmp_path):
    """The CLI trains Table 1 (C10) on the stand-in; a fresh rerun writes the same bytes."""
    data_dir = str(tmp_path / "no_data")
    cmd = [sys.executable, "experiments/reproduce.py", "--table=1", "--setting=C10",
           "--budget=smoke", f"--workdir={tmp_path / 'a'}", f"--config.data_dir={data_dir}"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    text = (tmp_path / "a" / "smoke" / "table1_C10.md").read_text()
    assert "STAND-IN for cifar10" in text.splitlines()[0]
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    assert lines[0] == "| model | paper | measured | steps × batch |"
    cells = [[c.strip() for c in line.split("|")[1:-1]] for line in lines[1:]]
    expected = {row: errors["C10"] for row, errors in paper_results.ERRORS[1].items()
                if "C10" in errors}
    assert {c[0]: float(c[1]) for c in cells} == expected == {
        "FractalNet-20": 10.18, "+ drop-path + dropout": 7.33, "→ deepest column alone": 7.27}
    _, rows = reproduce.recipe(1, "C10")
    for cell, row in zip(cells, rows):  # each measured error is its run's final evaluation
        final = loop.final_eval(str(tmp_path / "a" / "smoke" / "C10" / row.run), "test")
        assert (cell[0], cell[2], cell[3]) == (
            row.model, f"{100.0 * (1.0 - final[row.metric]):.2f}", "4 × 10")
    assert "measured with BatchNorm statistics estimated for it" in text
    assert text.strip() in out.stdout

    again = reproduce.reproduce(1, "C10", "smoke", str(tmp_path / "b"), {"data_dir": data_dir})
    assert (tmp_path / "b" / "smoke" / "table1_C10.md").read_text() == text == again + "\n"
