"""Drop-path sweeps: members equal their single runs, chunks equal all-at-once, data order,
exact resume, byte-identical tables, refusals and clear errors for bad values."""
import dataclasses
import json
import os
import shutil
import subprocess
import sys

import chex
import numpy as np
import pytest

from fractal_jax.analysis import runs, sweep_tables
from fractal_jax.training import experiment, lock, loop, metrics, sweep
from fractal_jax.training.checkpoint import read_metadata
from test_training import ROOT, TINY, final_state, metrics_text, tiny_config

SWEEP = sweep.Sweep(seeds=(0, 1), p_local=(0.0, 0.3), p_global=(0.5,))
# A member's vmapped step differs from its single run's only in float rounding: losses agree to
# float32 precision at first, and after 12 steps the eval accuracy may differ by a few of the
# 297 test images at most.
LOSS_RTOL = 1e-5
ACCURACY_ATOL = 0.02


def read_text(path):
    with open(path, "rb") as f:
        return f.read()


def member_texts(workdir, spec=SWEEP):
    return [metrics_text(sweep.member_dir(workdir, m)) for m in spec.members]


def member_states(workdir, spec=SWEEP):
    return [final_state(sweep.member_dir(workdir, m)) for m in spec.members]


def records(workdir, split):
    return [r for r in map(json.loads, metrics_text(workdir).splitlines()) if r["split"] == split]


def train_and_tabulate(config, workdir, spec=SWEEP, **kwargs):
    """`train_sweep` and its result tables, as the command line writes them."""
    results = sweep.train_sweep(config, workdir, spec, **kwargs)
    sweep_tables.write_sweep_results(workdir, config, spec, results)
    return results


@pytest.fixture(scope="module")
def together(tmp_path_factory, data_dir):
    """All four members trained at once by one vmapped step: (workdir, results)."""
    workdir = str(tmp_path_factory.mktemp("together"))
    return workdir, train_and_tabulate(tiny_config(data_dir), workdir, strategy="vmap")


@pytest.fixture(scope="module")
def chunked(tmp_path_factory, data_dir):
    """The same sweep two members at a time."""
    workdir = str(tmp_path_factory.mktemp("chunked"))
    return workdir, sweep.train_sweep(tiny_config(data_dir), workdir, SWEEP, chunk=2,
                                      strategy="vmap")


@pytest.fixture(scope="module")
def single(tmp_path_factory, data_dir):
    """The single run of member (seed 1, p_local 0.3, p_global 0.5): (workdir, results)."""
    workdir = str(tmp_path_factory.mktemp("single"))
    return workdir, loop.train(tiny_config(data_dir, seed=1, **{"drop_path.p_local": 0.3}),
                               workdir)


def test_sweep_writes_member_runs_and_result_tables(together):
    workdir, results = together
    for member, result in zip(SWEEP.members, results):
        evals = records(sweep.member_dir(workdir, member), "test")
        assert [r["step"] for r in evals] == [6, 12]
        assert result["accuracy"] == evals[-1]["accuracy"]
    with open(os.path.join(workdir, sweep_tables.CSV_FILE)) as f:
        lines = f.read().splitlines()
    assert lines[0].startswith("p_local,p_global,num_seeds,accuracy_mean,accuracy_std,"
                               "accuracy_column_1_mean")
    assert [line.split(",")[:3] for line in lines[1:]] == [["0.0", "0.5", "2"],
                                                           ["0.3", "0.5", "2"]]
    mean = np.mean([r["accuracy"] for r in results[::2]])  # seeds 0 and 1 at p_local 0
    assert float(lines[1].split(",")[3]) == pytest.approx(mean, abs=1e-6)
    with open(os.path.join(workdir, sweep_tables.MARKDOWN_FILE)) as f:
        assert "| 0.3 | 0.5 | 2 | " in f.read()
    assert os.path.getsize(os.path.join(workdir, sweep_tables.PLOT_FILE)) > 1000


def test_member_equals_its_single_run(together, single):
    workdir, results = together
    member = sweep.Member(seed=1, p_local=0.3, p_global=0.5)
    single, final = single
    swept = sweep.member_dir(workdir, member)
    np.testing.assert_allclose([r["loss"] for r in records(swept, "train")[:2]],
                               [r["loss"] for r in records(single, "train")[:2]], rtol=LOSS_RTOL)
    result = results[SWEEP.members.index(member)]
    for key in ("accuracy", "accuracy/column_1", "accuracy/column_2"):
        assert abs(result[key] - final[key]) <= ACCURACY_ATOL, key
    # The member's directory is a run like any other, with its own seed and rates.
    run = runs.load_run(swept)
    assert (run.config.seed, run.config.drop_path.p_local) == (1, 0.3)


def test_loop_strategy_members_are_their_single_runs_bit_for_bit(single, tmp_path, data_dir):
    spec = sweep.Sweep(seeds=(1,), p_local=(0.0, 0.3), p_global=(0.5,))
    results = sweep.train_sweep(tiny_config(data_dir), str(tmp_path), spec, strategy="loop")
    swept = sweep.member_dir(str(tmp_path), spec.members[1])
    assert records(swept, "train") == records(single[0], "train")
    assert results[1] == single[1]
    chex.assert_trees_all_equal(final_state(swept), final_state(single[0]))


def test_auto_strategy_is_loop_and_bad_strategies_are_refused():
    assert sweep.resolve_strategy("auto") == "loop"
    assert sweep.resolve_strategy("vmap") == "vmap"
    with pytest.raises(ValueError, match="strategy='pmap' is invalid: it must be one of 'auto'"):
        sweep.resolve_strategy("pmap")


def test_chunks_give_the_results_of_all_at_once(together, chunked):
    for a, b in zip(member_texts(together[0]), member_texts(chunked[0])):
        np.testing.assert_allclose([r["loss"] for r in map(json.loads, a.splitlines())],
                                   [r["loss"] for r in map(json.loads, b.splitlines())],
                                   rtol=LOSS_RTOL)
    for a, b in zip(together[1], chunked[1]):
        assert a.keys() == b.keys()
        for key in a:
            assert abs(a[key] - b[key]) <= ACCURACY_ATOL, key


def test_shared_data_order_gives_every_member_the_config_seeds_batches(chunked, tmp_path,
                                                                        data_dir):
    shared = sweep.Sweep(SWEEP.seeds, SWEEP.p_local, SWEEP.p_global, data_order="shared")
    workdir = str(tmp_path)
    sweep.train_sweep(tiny_config(data_dir, seed=0), workdir, shared, chunk=2, strategy="vmap")
    for member, own, text in zip(SWEEP.members, member_texts(chunked[0]),
                                 member_texts(workdir, shared)):
        # The config's seed is 0: seed-0 members read the same batches either way.
        assert (text == own) == (member.seed == 0), member.name
        saved = read_metadata(sweep.member_dir(workdir, member))
        assert saved["data_position"]["seed"] == 0 and saved["config"]["seed"] == member.seed


@pytest.mark.slow
def test_interrupted_sweep_resumes_to_the_same_result(chunked, tmp_path, data_dir, monkeypatch):
    """Stop in the second chunk after its first checkpoint, run again with another chunk size:
    every member's metrics and parameters are those of the uninterrupted chunked sweep."""
    workdir = str(tmp_path)
    write, seen = metrics.MetricsWriter.write, []

    def dies_at_step_9_of_the_second_chunk(self, step, split, values):
        seen.append(step)
        if seen.count(9) == 3:  # the first chunk's two members wrote theirs
            raise KeyboardInterrupt
        write(self, step, split, values)

    monkeypatch.setattr(metrics.MetricsWriter, "write", dies_at_step_9_of_the_second_chunk)
    with pytest.raises(KeyboardInterrupt):
        sweep.train_sweep(tiny_config(data_dir), workdir, SWEEP, chunk=2, strategy="vmap")
    monkeypatch.setattr(metrics.MetricsWriter, "write", write)
    assert [read_metadata(sweep.member_dir(workdir, m))["step"] for m in SWEEP.members] \
        == [12, 12, 6, 6]
    sweep.train_sweep(tiny_config(data_dir), workdir, SWEEP, chunk=3, strategy="vmap")
    assert member_texts(workdir) == member_texts(chunked[0])
    for a, b in zip(member_states(workdir), member_states(chunked[0])):
        chex.assert_trees_all_equal(a, b)


def test_rerun_writes_byte_identical_tables(together, tmp_path, data_dir):
    train_and_tabulate(tiny_config(data_dir), str(tmp_path), strategy="vmap")
    for name in (sweep_tables.CSV_FILE, sweep_tables.MARKDOWN_FILE):
        assert read_text(os.path.join(tmp_path, name)) == \
            read_text(os.path.join(together[0], name))


def test_finished_sweep_reports_without_training(together, data_dir, monkeypatch):
    workdir, results = together
    before = member_texts(workdir)

    def no_training(*args, **kwargs):
        raise AssertionError("a finished sweep trained again")

    monkeypatch.setattr(loop.Trainer, "train", no_training)
    assert sweep.train_sweep(tiny_config(data_dir), workdir, SWEEP, chunk=1) == results
    assert member_texts(workdir) == before


def test_workdir_of_another_sweep_or_a_single_run_is_refused(together, tmp_path, data_dir):
    other = sweep.Sweep(seeds=(0, 1, 2), p_local=SWEEP.p_local, p_global=SWEEP.p_global)
    with pytest.raises(experiment.WorkdirConflictError, match=r"(?s)sweep.seeds.*--fresh"):
        sweep.train_sweep(tiny_config(data_dir), together[0], other)
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(experiment.WorkdirConflictError, match="single training run"):
        sweep.train_sweep(tiny_config(data_dir), str(tmp_path), SWEEP)


def test_chunks_hold_the_unfinished_members_in_order():
    # Members at different steps share a chunk: it resumes from their common step.
    assert sweep.plan_chunks([12, 6, 0, 12, 9, 0], 12, 3) == [[1, 2, 4], [5]]
    assert sweep.plan_chunks([0] * 5, 12, 2) == [[0, 1], [2, 3], [4]]
    assert sweep.plan_chunks([12, 12], 12, 2) == []


@pytest.mark.parametrize("kwargs,match", [
    (dict(seeds=()), "no seeds"),
    (dict(p_local=()), "no p_local rates"),
    (dict(p_global=(0.5, 1.5)), r"p_global must be a probability in \[0, 1\], got 1.5"),
    (dict(p_local=(-0.1,)), "p_local must be a probability"),
    (dict(seeds=(0, 0)), r"seeds lists \[0\] more than once"),
    (dict(seeds=(0.5,)), "Seeds must be integers"),
    (dict(data_order="random"), "data_order='random' is invalid: it must be one of 'own', 'shared'"),
])
def test_bad_sweep_values_are_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sweep.Sweep(**{**dataclasses.asdict(SWEEP), **kwargs})


@pytest.mark.parametrize("chunk", [0, -2])
def test_bad_chunk_is_a_clear_error(chunk, tmp_path, data_dir):
    with pytest.raises(ValueError, match=f"positive number of members, got {chunk}"):
        sweep.train_sweep(tiny_config(data_dir), str(tmp_path), SWEEP, chunk=chunk)


def run_cli(workdir, data_dir, *args):
    cmd = [sys.executable, "experiments/sweep_drop_path.py", f"--config={TINY}",
           f"--workdir={workdir}", f"--config.data_dir={data_dir}", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_command_line_reports_a_finished_sweep_and_names_bad_values(together, tmp_path,
                                                                    data_dir):
    out = run_cli(together[0], data_dir, "--seeds=0,1", "--p_local=0,0.3", "--p_global=0.5",
                  "--chunk=1")
    assert out.returncode == 0, out.stderr[-3000:]
    with open(os.path.join(together[0], sweep_tables.MARKDOWN_FILE)) as f:
        assert f.read() in out.stdout
    out = run_cli(str(tmp_path), data_dir, "--seeds=0,1", "--p_local=0,1.5")
    assert out.returncode != 0
    assert "error: p_local must be a probability in [0, 1], got 1.5" in out.stderr
    assert not os.listdir(tmp_path)


def test_vmapped_chunk_killed_between_its_members_saves_resumes_from_their_common_step(
        tmp_path, data_dir):
    """Members 0, 1 saved step 9, members 2, 3 only step 6 (as after a kill between their
    saves): the chunk resumes together from step 6 and ends bit-identical."""
    config = tiny_config(data_dir, checkpoint_every_steps=3)
    reference = str(tmp_path / "reference")
    sweep.train_sweep(config, reference, SWEEP, strategy="vmap")
    workdir = str(tmp_path / "killed")
    shutil.copytree(reference, workdir)
    for member, last in zip(SWEEP.members, (9, 9, 6, 6)):
        checkpoints = os.path.join(sweep.member_dir(workdir, member), "checkpoints")
        for step in [d for d in os.listdir(checkpoints) if d.isdigit() and int(d) > last]:
            shutil.rmtree(os.path.join(checkpoints, step))
    sweep.train_sweep(config, workdir, SWEEP, strategy="vmap")
    assert member_texts(workdir) == member_texts(reference)
    for a, b in zip(member_states(workdir), member_states(reference)):
        chex.assert_trees_all_equal(a, b)


# ----- shards: one sweep trained by several processes -----------------------------------------

@pytest.mark.parametrize("count", [1, 2, 3, 4, 5, 8])
def test_shards_train_every_member_exactly_once_in_contiguous_slices(count):
    slices = [sweep.shard_members(7, (i, count)) for i in range(count)]
    assert sum(slices, []) == list(range(7))
    assert max(map(len, slices)) - min(map(len, slices)) <= 1
    assert sweep.shard_members(7, None) == list(range(7))


def test_shard_from_slurm_array_environment_and_bad_shards_are_clear_errors():
    env = {"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_MIN": "3",
           "SLURM_ARRAY_TASK_STEP": "2", "SLURM_ARRAY_TASK_COUNT": "4"}
    assert sweep.shard_from_environment(env) == (2, 4)  # tasks 3, 5, 7, 9
    assert sweep.shard_from_environment({}) is None
    with pytest.raises(ValueError, match="pass --shard I/N explicitly"):
        sweep.shard_from_environment({"SLURM_ARRAY_TASK_ID": "1"})
    assert sweep.parse_shard("1/3") == (1, 3)
    for bad in ("3/3", "-1/2", "1", "a/b", "0/0"):
        with pytest.raises(ValueError, match="it must be I/N with 0 <= I < N"):
            sweep.parse_shard(bad)


def test_a_shard_returns_only_finished_members_and_refuses_a_member_in_training(
        loop_sweep, tmp_path, data_dir):
    """Shard 0/2 trains the first two members; the other two are reported missing (None) until
    trained. A member whose lock another process holds is refused, naming it."""
    workdir = str(tmp_path / "sweep")
    results = sweep.train_sweep(tiny_config(data_dir), workdir, SWEEP, shard=(0, 2))
    assert results[2:] == [None, None] and results[:2] == loop_sweep[1][:2]
    assert sorted(os.listdir(os.path.join(workdir, sweep.MEMBERS_DIR))) == sorted(
        m.name for m in SWEEP.members[:2])
    busy = sweep.member_dir(workdir, SWEEP.members[3])
    os.makedirs(busy)
    with lock.workdir_lock(busy):
        with pytest.raises(lock.WorkdirLockError, match="in use by another run"):
            sweep.train_sweep(tiny_config(data_dir), workdir, SWEEP, shard=(1, 2))
    # A single run is refused in a sweep's workdir, and --fresh while a shard holds it.
    with pytest.raises(experiment.WorkdirConflictError, match="holds a drop-path sweep"):
        loop.train(tiny_config(data_dir), workdir)
    with lock.workdir_lock(workdir, shared=True):
        with pytest.raises(lock.WorkdirLockError, match="the shards of a sweep"):
            experiment.move_aside(workdir)


@pytest.mark.slow
def test_two_concurrent_shards_give_the_whole_sweeps_results(loop_sweep, tmp_path, data_dir):
    """A 4-member sweep as shards 0/2 and 1/2 in two processes at once: the last to finish writes
    sweep_results.csv, equal to the whole sweep's; --collect writes the same."""
    workdir = str(tmp_path / "sharded")
    args = ["--seeds=0,1", "--p_local=0,0.3", "--p_global=0.5"]
    cmd = [sys.executable, "experiments/sweep_drop_path.py", f"--config={TINY}",
           f"--workdir={workdir}", f"--config.data_dir={data_dir}", *args]
    procs = [subprocess.Popen([*cmd, f"--shard={i}/2"], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert any("results: " in out for out in outs), outs
    csv = os.path.join(workdir, sweep_tables.CSV_FILE)
    assert read_text(csv) == read_text(os.path.join(loop_sweep[0], sweep_tables.CSV_FILE))
    os.remove(csv)
    out = run_cli(workdir, data_dir, *args, "--collect")
    assert out.returncode == 0, out.stderr[-3000:]
    assert read_text(csv) == read_text(os.path.join(loop_sweep[0], sweep_tables.CSV_FILE))
    out = run_cli(str(tmp_path / "none"), data_dir, *args, "--collect")
    assert out.returncode == 1 and "holds no sweep" in out.stderr
