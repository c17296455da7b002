"""Analysis of trained runs: loading, ensembles, saliency maps, and the model comparison script."""
import dataclasses
import json
import os
import shutil
import subprocess
import sys

import chex
import numpy as np
import pytest

from fractal_jax.analysis import ensemble, runs, saliency
from fractal_jax.models.registry import create_model
from fractal_jax.training import integrity, loop
from fractal_jax.training.checkpoint import read_metadata
from test_training import ROOT, TINY, final_state, tiny_config

SHORT = dict(num_train_steps=6, eval_every_steps=6, checkpoint_every_steps=6)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tfds")


@pytest.fixture(scope="session")
def seed_runs(tmp_path_factory, data_dir):
    """Two 6-step tiny runs that differ only in seed: [(workdir, final eval metrics)] * 2."""
    trained = []
    for seed in (0, 1):
        workdir = str(tmp_path_factory.mktemp(f"seed{seed}"))
        trained.append((workdir, loop.train(tiny_config(data_dir, seed=seed, **SHORT), workdir)))
    return trained


@pytest.fixture(scope="session")
def run(seed_runs):
    return runs.load_run(seed_runs[0][0])


def last_eval_record(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["split"] == "test"][-1]


def test_loaded_run_reproduces_the_final_eval_accuracy(run, seed_runs):
    assert run.step == 6 and run.config.seed == 0 and run.info.num_classes == 10
    probs, labels = runs.predict(run, runs.eval_batches(run))
    assert probs.shape == (run.info.num_eval_examples, 10) == (len(labels), 10)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    assert runs.accuracy(probs, labels) == pytest.approx(
        last_eval_record(seed_runs[0][0])["accuracy"], abs=1e-12)


def test_ensemble_reports_members_and_ensemble_deterministically(seed_runs, tmp_path, capsys):
    members = [runs.load_run(workdir) for workdir, _ in seed_runs]
    result = ensemble.evaluate_ensemble(members)
    assert [m.seed for m in result.members] == [0, 1]
    for member, (_, final) in zip(result.members, seed_runs):
        assert member.accuracy == pytest.approx(final["accuracy"], abs=1e-12)
    predictions = [runs.predict(m, runs.eval_batches(m)) for m in members]
    mean = np.mean([probs for probs, _ in predictions], axis=0)
    assert result.accuracy == runs.accuracy(mean, predictions[0][1])
    assert result.num_examples == 297
    table = ensemble.markdown_table(result)
    assert "ensemble of 2" in table and all(w in table for w, _ in seed_runs)

    out = tmp_path / "table.md"
    workdirs = ",".join(w for w, _ in seed_runs)
    assert ensemble.main(["--workdirs", workdirs, "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == table == out.read_text().strip()


@pytest.mark.parametrize("key,value", [("dataset", "npz"), ("data.eval_split", "train")])
def test_ensemble_of_runs_on_other_data_is_refused(run, key, value):
    config = run.config.copy_and_resolve_references()
    section, _, name = key.rpartition(".")
    (config[section] if section else config)[name] = value
    other = dataclasses.replace(run, workdir="other", config=config)
    with pytest.raises(ValueError, match=f"different data: {key}={value!r}"):
        ensemble.evaluate_ensemble([run, other])


def test_saliency_maps_are_per_pixel_non_negative_and_saved(run, seed_runs, tmp_path):
    images, labels = saliency.first_eval_examples(run, 3)
    maps = saliency.saliency(run, images, saliency.predicted_classes(run, images))
    assert maps.shape == (3, 8, 8) == images.shape[:3]
    assert (maps >= 0).all() and (maps.reshape(3, -1).max(axis=1) > 0).all()
    path = saliency.save_saliency_png(images[0], maps[0], str(tmp_path / "one.png"))
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"

    outdir = tmp_path / "cli"
    args = ["--workdir", seed_runs[0][0], "--num-images", "3", "--outdir", str(outdir),
            "--target", "label"]
    assert saliency.main(args) == 0
    assert sorted(os.listdir(outdir)) == [f"saliency_00{i}.png" for i in range(3)]


def test_checkpoint_of_another_model_is_refused(seed_runs, tmp_path):
    workdir = str(tmp_path / "edited")
    shutil.copytree(seed_runs[0][0], workdir)
    path = os.path.join(workdir, "checkpoints", "6", "metadata", "metadata")
    with open(path) as f:
        metadata = json.load(f)
    metadata["config"]["model"]["widths"] = [8, 8, 32]
    # Sealed again: a sound checkpoint whose config names another model.
    metadata = integrity.seal(integrity.unsealed(metadata), metadata[integrity.CHECKSUMS])
    with open(path, "w") as f:
        json.dump(metadata, f)
    with pytest.raises(runs.ModelMismatchError, match=r"another model.*params/block_2"):
        runs.load_run(workdir)
    with pytest.raises(runs.ModelMismatchError, match="another model"):
        runs.restore_variables(seed_runs[0][0], 6, create_model("resnet20", 10), (8, 8, 1))


def test_restore_variables_matches_the_saved_state(run, seed_runs):
    saved = final_state(seed_runs[0][0])
    chex.assert_trees_all_equal(run.variables, {k: saved[k] for k in ("params", "batch_stats")})


@pytest.mark.parametrize("step,match", [(None, "no checkpoint in"), (7, "no checkpoint for step 7")])
def test_missing_checkpoint_says_how_to_train_one(seed_runs, tmp_path, step, match):
    workdir = str(tmp_path) if step is None else seed_runs[0][0]
    with pytest.raises(runs.RunError, match=f"(?s){match}.*fractal_jax.main"):
        runs.load_run(workdir, step)


def run_compare(workdir, data_dir, models):
    cmd = [sys.executable, "experiments/compare.py", f"--config={TINY}", f"--workdir={workdir}",
           f"--models={models}", f"--config.data_dir={data_dir}",
           *(f"--config.{k}={v}" for k, v in SHORT.items())]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_compare_trains_both_models_and_prints_one_table(tmp_path, data_dir):
    workdir = tmp_path / "compare"
    out = run_compare(workdir, data_dir, "fractalnet,resnet20")
    assert out.returncode == 0, out.stderr[-3000:]
    table = [line for line in out.stdout.splitlines() if line.startswith("|")]
    assert table[0].startswith("| model | test accuracy | parameters | FLOPs / image")
    assert [row.split("|")[1].strip() for row in table[2:]] == ["fractalnet", "resnet20"]
    assert (workdir / "compare.md").read_text().strip() == "\n".join(table)
    # The baseline keeps its own architecture: FractalNet's widths are not passed on to it.
    dropped = out.stderr.split("resnet20 does not take ", 1)[1].split("\n", 1)[0]
    assert "model.dropout" in dropped and "model.num_blocks" in dropped
    saved = read_metadata(str(workdir / "resnet20" / "seed_0"))["config"]["model"]
    assert saved["name"] == "resnet20" and saved["widths"] is None


@pytest.mark.slow
def test_compare_refuses_a_model_too_big_for_the_images_before_training(tmp_path, data_dir):
    out = run_compare(tmp_path, data_dir, "fractalnet,resnet18")
    assert out.returncode != 0
    assert "resnet18 needs inputs of at least 32x32" in out.stderr
    assert not os.path.exists(tmp_path / "fractalnet")
