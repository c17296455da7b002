"""Drop-path sweeps: every (seed, p_local, p_global) member trained in one run, either by one
compiled train step vmapped over the members' stacked states, step keys and rates ("vmap"), or
by the members' single-run steps one after another ("loop").

A chunk of members trains through the one training loop (`loop.Trainer.train`), so a member
trains as the single run of its seed and rates (`loop.train`) would: init key
``fold_in(key(seed), 0)``, step keys ``fold_in(key(seed), step)``, its rates in its state,
`nonfinite` applied to it alone.

Strategies (`resolve_strategy`; "auto" picks per backend; `programs.make_runner` runs them):
  - "vmap" (accelerators): one program for the chunk. It computes every unit and masks dead join
    inputs (members draw different plans at each step, so `drop_path.skip` does not apply). A
    member equals its single run up to float rounding (a sweep of one member matched a single
    run with drop_path.skip=False bit for bit); rounding differences grow over a long run, so
    final accuracies then differ about as much as those of different seeds do.
  - "loop" (CPU): each member's step is its single run's (dead work skipped; the compiled
    programs are shared by all members), so a member equals its single run bit for bit. On
    XLA:CPU a vmapped step ran slower per model than sequential single-model steps
    (BENCHMARKS.md).

Data order: "own" gives each member the batches of its own seed, exactly as its single run reads
them; "shared" gives every member the batches of the config's seed (members then differ only in
initialisation, plans and dropout). Batches are read once per data seed and handed to each
member inside the compiled step. Members train `chunk` at a time (default: all at once).

Workdir layout::

    WORKDIR/sweep.json                 the sweep: its config plus {"sweep": seeds, rates, order}
    WORKDIR/.lock                      held while a sweep runs (`lock.py`)
    WORKDIR/members/<member>/          one run per member, e.g. seed_0-p_local_0.15-p_global_0.5:
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

import dataclasses
import json
import os
from typing import Sequence

import jax
import ml_collections

from fractal_jax import config as config_lib
from fractal_jax.checks import check_choice
from fractal_jax.models import drop_path
from fractal_jax.models.fractal import FractalNet
from fractal_jax.training import experiment, loop
from fractal_jax.training.checkpoint import checkpoint_dir, read_metadata

DATA_ORDERS = ("own", "shared")
STRATEGIES = ("auto", "vmap", "loop")
MEMBERS_DIR = "members"
SWEEP_FILE = "sweep.json"


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


def _claim_workdir(workdir: str, config: ml_collections.ConfigDict, sweep: Sweep) -> None:
    """Writes WORKDIR/sweep.json, refusing a workdir that holds another sweep or a single run."""
    path = os.path.join(workdir, SWEEP_FILE)
    current = _record(config, sweep)
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            diffs = config_lib.experiment_differences(json.load(f), current)
        if diffs:
            raise experiment.WorkdirConflictError(
                f"Workdir {workdir!r} holds a different sweep; it differs in:\n  "
                + "\n  ".join(diffs) + "\nUse another --workdir, or pass --fresh to move the old "
                "sweep aside and start again.")
    elif os.path.isdir(checkpoint_dir(workdir)):
        raise experiment.WorkdirConflictError(
            f"Workdir {workdir!r} holds a single training run, not a sweep. Use another "
            "--workdir, or pass --fresh to move it aside.")
    if jax.process_index() == 0:
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            json.dump(current, f, indent=2, sort_keys=True)
        os.replace(path + ".tmp", path)


def check_chunk(chunk: int | None) -> None:
    """Rejects a chunk size that is not a positive number of members (None: all at once)."""
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
        raise ValueError(f"chunk must be a positive number of members, got {chunk!r}.")


def resolve_strategy(strategy: str) -> str:
    """"auto" is "loop" on CPU, where a vmapped step ran slower per model than single-model
    steps with dead work skipped (BENCHMARKS.md), and "vmap" on accelerators."""
    check_choice("strategy", strategy, STRATEGIES)
    if strategy == "auto":
        return "loop" if jax.default_backend() == "cpu" else "vmap"
    return strategy


def train_sweep(config: ml_collections.ConfigDict, workdir: str, sweep: Sweep, *,
                chunk: int | None = None, strategy: str = "auto") -> list[dict[str, float]]:
    """Trains (or resumes) every member of `sweep` in `workdir`, `chunk` at a time (default:
    all); returns each member's final eval metrics, in `sweep.members` order.

    Config, data and model are checked before the workdir is touched; the sweep holds the
    workdir's lock throughout, as a single run does.
    """
    config = config_lib.validate(config)
    check_chunk(chunk)
    strategy = resolve_strategy(strategy)
    experiment.check_batch_sizes(config)
    info = experiment.dataset_info(config)
    model = experiment.build_model(config, info.num_classes)
    if not isinstance(model, FractalNet):
        raise ValueError(f"model.name={config.model.name!r} has no drop-path to sweep; use a "
                         "FractalNet (e.g. --config.model.name=fractalnet).")
    os.makedirs(workdir, exist_ok=True)
    with loop.hold_workdir(workdir):
        _claim_workdir(workdir, config, sweep)
        members = sweep.members
        chunks = plan_chunks([_saved_step(member_dir(workdir, m)) for m in members],
                             config.num_train_steps, chunk or len(members))
        if chunks:
            trainer = loop.Trainer(config, model, info)
            for indices in chunks:
                trainer.train([_run_spec(config, sweep, workdir, members[i]) for i in indices],
                              strategy)
        return [loop.final_eval(member_dir(workdir, m), config.data.eval_split)
                for m in members]


def _run_spec(config: ml_collections.ConfigDict, sweep: Sweep, workdir: str,
              member: Member) -> loop.RunSpec:
    return loop.RunSpec(member_dir(workdir, member), member_config(config, member),
                        data_seed=sweep.data_seed(member, config.seed), name=member.name)
