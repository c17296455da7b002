"""Drop-path sweeps: every (seed, p_local, p_global) member trained in one run, either by one
compiled train step vmapped over the members' stacked states, step keys and rates ("vmap"), or
by the members' single-run steps one after another ("loop").

A chunk of members trains through the one training loop (`loop.Trainer.train`), so a member
trains as the single run of its seed and rates (`loop.train`) would: init key
``fold_in(key(seed), 0)``, step keys ``fold_in(key(seed), step)``, its rates in its state,
`nonfinite` applied to it alone.

Strategies (`resolve_strategy`; "auto" is "loop"; `programs.make_runner` runs them):
  - "vmap": one program for the chunk. It computes every unit and masks dead join
    inputs (members draw different plans at each step, so `drop_path.skip` does not apply). A
    member equals its single run up to float rounding (a sweep of one member matched a single
    run with drop_path.skip=False bit for bit); rounding differences grow over a long run, so
    final accuracies then differ about as much as those of different seeds do.
  - "loop" (the default): each member's step is its single run's (dead work skipped; the
    compiled programs are shared by all members), so a member equals its single run bit for
    bit. It was also the faster one wherever measured (BENCHMARKS.md): on XLA:CPU a vmapped
    step ran at 0.56-0.71× the images/s of sequential steps; on an H200 GPU at FractalNet-20
    size, batch 100, 4 and 8 vmapped members ran at 0.70× and 0.87× of the same members'
    masked steps one after another, and at 0.49× and 0.63× of single-model steps that skip
    dead work, which only "loop" can do.

Shards: a sweep too large for one machine runs as N processes on a shared filesystem (the tasks
of a SLURM job array, a Kubernetes indexed job, separate shells), each training the members of
its slice (`shard_members`) in the same workdir: `train_sweep(..., shard=(i, N))`. They hold the
sweep's lock shared and each member's lock exclusively (`lock.py`), so shards run side by side
while a second process on the same member, a single run or `--fresh` is refused. Any process
can then collect the results (`member_results`: None for members not finished yet).

Data order: "own" gives each member the batches of its own seed, exactly as its single run reads
them; "shared" gives every member the batches of the config's seed (members then differ only in
initialisation, plans and dropout). Batches are read once per data seed and handed to each
member inside the compiled step. Members train `chunk` at a time (default: all at once).

Workdir layout::

    WORKDIR/sweep.json                 the sweep: its config plus {"sweep": seeds, rates, order}
    WORKDIR/.lock                      held (shared) while any shard of the sweep runs
    WORKDIR/members/<member>/          one run per member, e.g. seed_0-p_local_0.15-p_global_0.5:
        .lock                          held while a process trains the member
        checkpoints/                   its own (unstacked) train state and metadata with its own
                                       config (seed and rates), as `loop.train` saves them
        metrics.jsonl, tensorboard/    its train and eval records, as `loop.train` writes them
    WORKDIR/sweep_results.csv/.md/.png mean ± std over seeds per rate pair, written by the
                                       command line (analysis/sweep_tables)

So a member's directory is a run like any other (`analysis.runs.load_run` loads it). A sweep
resumes every member from its newest checkpoint, whatever `chunk` it is run again with (members
at different steps train in different chunks), and a finished sweep reports its results
without training.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import re
from typing import Mapping, Sequence

import ml_collections

from fractal_jax import config as config_lib
from fractal_jax.checks import check_choice
from fractal_jax.models import drop_path
from fractal_jax.models.fractal import FractalNet
from fractal_jax.training import experiment, loop, multihost, preemption
from fractal_jax.training.checkpoint import checkpoint_dir, read_metadata
from fractal_jax.training.experiment import SWEEP_FILE
from fractal_jax.training.profiling import PROFILE_DIR

DATA_ORDERS = ("own", "shared")
STRATEGIES = ("auto", "vmap", "loop")
MEMBERS_DIR = "members"


@dataclasses.dataclass(frozen=True)
class Member:
    """One model of a sweep: its seed and drop-path rates."""

    seed: int
    p_local: float
    p_global: float

    @property
    def name(self) -> str:
        return f"seed_{self.seed}-p_local_{self.p_local}-p_global_{self.p_global}"


@dataclasses.dataclass(frozen=True)
class Sweep:
    """Every seed with every (p_local, p_global), and whose batches the members read."""

    seeds: tuple[int, ...]
    p_local: tuple[float, ...]
    p_global: tuple[float, ...]
    data_order: str = "own"

    def __post_init__(self):
        object.__setattr__(self, "seeds", tuple(self.seeds))
        if not self.seeds:
            raise ValueError("The sweep has no seeds; give at least one, e.g. --seeds 0,1.")
        for seed in self.seeds:
            if not isinstance(seed, int) or isinstance(seed, bool):
                raise ValueError(f"Seeds must be integers, got {seed!r}.")
        for name in ("p_local", "p_global"):
            rates = getattr(self, name)
            if not rates:
                raise ValueError(f"The sweep has no {name} rates; give at least one, "
                                 f"e.g. --{name} 0,0.15.")
            for rate in rates:
                drop_path.check_rate(name, rate)
            object.__setattr__(self, name, tuple(float(r) for r in rates))
        for name in ("seeds", "p_local", "p_global"):
            values = getattr(self, name)
            repeated = sorted({v for v in values if values.count(v) > 1})
            if repeated:
                raise ValueError(f"{name} lists {repeated} more than once; give each value once.")
        check_choice("data_order", self.data_order, DATA_ORDERS)

    @property
    def members(self) -> list[Member]:
        """Every (seed, p_local, p_global), seed-major, so members in a chunk share seeds."""
        return [Member(seed, p_local, p_global) for seed in self.seeds
                for p_local in self.p_local for p_global in self.p_global]

    def data_seed(self, member: Member, config_seed: int) -> int:
        """The seed whose batch order `member` trains on."""
        return member.seed if self.data_order == "own" else config_seed


def member_dir(workdir: str, member: Member) -> str:
    """The run directory of `member` inside the sweep's `workdir`."""
    return os.path.join(workdir, MEMBERS_DIR, member.name)


def _with_seed(config: ml_collections.ConfigDict, seed: int, **drop_path_rates: float
               ) -> ml_collections.ConfigDict:
    config = config.copy_and_resolve_references()
    config.seed = seed
    config.drop_path.update(drop_path_rates)
    return config


def member_config(config: ml_collections.ConfigDict, member: Member) -> ml_collections.ConfigDict:
    """The config of `member`'s single run: `config` with its seed and rates."""
    return _with_seed(config, member.seed, p_local=member.p_local, p_global=member.p_global)


def plan_chunks(member_steps: Sequence[int], num_train_steps: int, size: int) -> list[list[int]]:
    """The unfinished members' indices, in order, in chunks of at most `size`.

    A chunk trains from its members' common step (`_initial_states`), so a chunk interrupted
    between its members' saves resumes as the same chunk and computes what it would have
    computed, bit for bit.
    """
    unfinished = [i for i, step in enumerate(member_steps) if step < num_train_steps]
    return [unfinished[i:i + size] for i in range(0, len(unfinished), size)]


def _saved_step(workdir: str) -> int:
    metadata = read_metadata(workdir)
    return 0 if metadata is None else int(metadata["step"])


def _record(config: ml_collections.ConfigDict, sweep: Sweep) -> dict:
    """What makes two sweeps the same experiment, as plain JSON types."""
    return json.loads(json.dumps({**config_lib.to_json_dict(config),
                                  "sweep": dataclasses.asdict(sweep)}))


def _refuse_other_sweep(workdir: str, current: dict) -> bool:
    """Raises WorkdirConflictError if `workdir` holds another sweep or a single run; returns
    whether it holds this sweep."""
    path = os.path.join(workdir, SWEEP_FILE)
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            diffs = config_lib.experiment_differences(json.load(f), current)
        if diffs:
            raise experiment.WorkdirConflictError(
                f"Workdir {workdir!r} holds a different sweep; it differs in:\n  "
                + "\n  ".join(diffs) + "\nUse another --workdir, or pass --fresh to move the old "
                "sweep aside and start again.")
        return True
    if os.path.isdir(checkpoint_dir(workdir)):
        raise experiment.WorkdirConflictError(
            f"Workdir {workdir!r} holds a single training run, not a sweep. Use another "
            "--workdir, or pass --fresh to move it aside.")
    return False


def _claim_workdir(workdir: str, config: ml_collections.ConfigDict, sweep: Sweep) -> None:
    """Writes WORKDIR/sweep.json, refusing a workdir that holds another sweep or a single run.

    Shards starting together race to write it: the first creates it (a hard link, which fails
    if the file exists), the others then compare with it.
    """
    current = _record(config, sweep)
    path = os.path.join(workdir, SWEEP_FILE)
    holds_it = _refuse_other_sweep(workdir, current)
    temporary = f"{path}.tmp-{os.getpid()}"
    with open(temporary, "w", encoding="utf-8") as f:
        json.dump(current, f, indent=2, sort_keys=True)
    if holds_it:  # the same sweep: keep the newest resumable values (e.g. num_train_steps)
        os.replace(temporary, path)
        return
    try:
        os.link(temporary, path)
    except FileExistsError:  # another shard was first
        _refuse_other_sweep(workdir, current)
    finally:
        os.remove(temporary)


def check_chunk(chunk: int | None) -> None:
    """Rejects a chunk size that is not a positive number of members (None: all at once)."""
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
        raise ValueError(f"chunk must be a positive number of members, got {chunk!r}.")


def resolve_strategy(strategy: str) -> str:
    """"auto" is "loop": a vmapped step ran slower per model than single-model steps with dead
    work skipped on every backend measured, CPU and GPU (BENCHMARKS.md)."""
    check_choice("strategy", strategy, STRATEGIES)
    return "loop" if strategy == "auto" else strategy


def parse_shard(text: str) -> tuple[int, int]:
    """"I/N" (shard I of N, counting from 0) as (I, N)."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not match or not int(match[1]) < int(match[2]):
        raise ValueError(f"shard={text!r} is invalid: it must be I/N with 0 <= I < N, e.g. "
                         "--shard 0/4 for the first of four shards.")
    return int(match[1]), int(match[2])


def shard_from_environment(environ: Mapping[str, str] = os.environ) -> tuple[int, int] | None:
    """The shard of a SLURM array task, (task's position, number of tasks), None outside one."""
    if "SLURM_ARRAY_TASK_ID" not in environ:
        return None
    try:
        task, first = int(environ["SLURM_ARRAY_TASK_ID"]), int(environ["SLURM_ARRAY_TASK_MIN"])
        step, count = (int(environ.get("SLURM_ARRAY_TASK_STEP", 1)),
                       int(environ["SLURM_ARRAY_TASK_COUNT"]))
    except (KeyError, ValueError) as e:
        raise ValueError(f"SLURM_ARRAY_TASK_ID is set but the array's environment is incomplete "
                         f"or not numbers ({e}); pass --shard I/N explicitly.") from None
    return parse_shard(f"{(task - first) // step}/{count}")


def shard_members(num_members: int, shard: tuple[int, int] | None) -> list[int]:
    """The indices of the members shard (i, N) trains: the i-th of N contiguous, near-equal
    slices of `Sweep.members` (seed-major, so a slice's members mostly share seeds and data);
    every member with None."""
    if shard is None:
        return list(range(num_members))
    index, count = shard
    return list(range(index * num_members // count, (index + 1) * num_members // count))


def member_results(config: ml_collections.ConfigDict, workdir: str, sweep: Sweep
                   ) -> list[dict[str, float] | None]:
    """Each member's final eval metrics, in `sweep.members` order; None for a member that has
    not reached config.num_train_steps (not started, still training or stopped)."""
    return multihost.decide("read the members' results", lambda: [
        loop.final_eval(member_dir(workdir, m), config.data.eval_split)
        if _saved_step(member_dir(workdir, m)) >= config.num_train_steps else None
        for m in sweep.members])


def check_sweep(config: ml_collections.ConfigDict, workdir: str, sweep: Sweep) -> None:
    """Raises unless `workdir` holds this sweep (before its results are collected)."""
    if not _refuse_other_sweep(workdir, _record(config_lib.validate(config), sweep)):
        raise ValueError(f"{workdir!r} holds no sweep ({SWEEP_FILE} is missing); run "
                                "experiments/sweep_drop_path.py with this --workdir first.")


def train_sweep(config: ml_collections.ConfigDict, workdir: str, sweep: Sweep, *,
                chunk: int | None = None, strategy: str = "auto",
                shard: tuple[int, int] | None = None) -> list[dict[str, float] | None]:
    """Trains (or resumes) the members of `sweep` in `workdir` (those of `shard` (i, N), or
    all), `chunk` at a time (default: all); returns every member's final eval metrics, in
    `sweep.members` order, None for members not finished (by other shards).

    Config, data and model are checked before the workdir is touched. The process holds the
    sweep's lock shared and the lock of each member while it trains it.
    """
    config = config_lib.validate(config)
    check_chunk(chunk)
    if shard is not None:
        shard = parse_shard(f"{shard[0]}/{shard[1]}")
    strategy = resolve_strategy(strategy)
    experiment.check_batch_sizes(config)
    info = experiment.dataset_info(config)
    model = experiment.build_model(config, info.num_classes)
    if not isinstance(model, FractalNet):
        raise ValueError(f"model.name={config.model.name!r} has no drop-path to sweep; use a "
                         "FractalNet (e.g. --config.model.name=fractalnet).")
    # Decided by process 0 for every process of a multi-host run (`multihost.decide`).
    multihost.decide("create the workdir", lambda: os.makedirs(workdir, exist_ok=True))
    multihost.check_shared_directory(workdir)
    with loop.hold_workdir(workdir, shared=True):
        multihost.decide("claim the workdir", lambda: _claim_workdir(workdir, config, sweep))
        members = [sweep.members[i] for i in shard_members(len(sweep.members), shard)]
        saved = multihost.decide("read the members' steps", lambda: [
            _saved_step(member_dir(workdir, m)) for m in members])
        chunks = plan_chunks(saved, config.num_train_steps, chunk or len(members) or 1)
        trainer = loop.Trainer(config, model, info) if chunks else None
        # A signal during a chunk stops it after a checkpoint (the loop's own StopRequest); one
        # between two chunks stops the sweep before the next.
        with preemption.StopRequest() as between_chunks:
            for indices in chunks:
                if between_chunks.should_stop():
                    raise preemption.Preempted(between_chunks.signal_name, None, [workdir])
                with contextlib.ExitStack() as held:
                    for i in indices:
                        multihost.decide("create a member's workdir", functools.partial(
                            os.makedirs, member_dir(workdir, members[i]), exist_ok=True))
                        held.enter_context(loop.hold_workdir(member_dir(workdir, members[i])))
                    trainer.train([_run_spec(config, sweep, workdir, members[i])
                                   for i in indices],
                                  strategy, profile_dir=os.path.join(workdir, PROFILE_DIR))
        return member_results(config, workdir, sweep)


def _run_spec(config: ml_collections.ConfigDict, sweep: Sweep, workdir: str,
              member: Member) -> loop.RunSpec:
    return loop.RunSpec(member_dir(workdir, member), member_config(config, member),
                        data_seed=sweep.data_seed(member, config.seed), name=member.name)
