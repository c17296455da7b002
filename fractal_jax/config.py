"""The experiment config: one `ml_collections.ConfigDict` with every knob, checked once at start.

Experiment files under ``experiments/configs/`` start from `base_config()` and change fields;
`validate` rejects unknown keys (with a "did you mean"), wrong types and out-of-range values,
naming the key and what is allowed, before any work starts.
"""
from __future__ import annotations

import difflib
import json

import ml_collections

from fractal_jax.checks import check_choice, require

NONFINITE = ("stop", "skip")
BN_UPDATES = ("live", "all")  # whose BatchNorm statistics a drop-path step updates
# Datasets by where they come from (data/sources.py): TFDS datasets read into memory, or one
# example at a time; the digits scikit-learn ships; files under data.path.
IN_MEMORY_TFDS = ("cifar10", "cifar100", "svhn_cropped")
RANDOM_ACCESS_TFDS = ("imagenet2012",)
TFDS = IN_MEMORY_TFDS + RANDOM_ACCESS_TFDS
FILE_DATASETS = ("image_folder", "npz")
LOCAL_DATASETS = ("digits", *FILE_DATASETS)  # read without a data_dir
DATASETS = ("digits", *TFDS, *FILE_DATASETS)
# The paper's augmentation tiers (data/augment.py), normalisations and translation range.
TIERS = ("none", "+", "++")
NORMALIZATIONS = ("mean", "mean_std")
MAX_SHIFT = 4
OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("paper", "cosine", "constant", "steps")
WEIGHT_DECAY_TARGETS = ("kernels", "all")
# How the model computes its layers (`models/conv.py`, `pool.py`, `batch_norm.py`, `dropout.py`);
# the lists live here so that checking a config imports no JAX.
CONV_IMPLS = ("auto", "xla", "patches")
POOL_IMPLS = ("windows", "slices", "reduce_window")
BN_IMPLS = ("auto", "autodiff", "fused")
DROPOUT_IMPLS = ("hash", "threefry")
# Keys that may change between a run and its resumption without changing the experiment.
RESUMABLE_KEYS = ("num_train_steps", "eval_every_steps", "checkpoint_every_steps",
                  "log_every_steps", "keep_checkpoints", "data_dir", "progress_bar",
                  "eval_batch_size", "drop_path.skip", "model.remat", "model.conv_impl",
                  "model.pool_impl", "model.bn_impl", "nonfinite", "precise_bn.enabled",
                  "precise_bn.num_examples", "precise_bn.batch_size", "profile_steps",
                  "distributed", "host_timeout_s", "nonfinite_max_consecutive")


def default_optim_config() -> ml_collections.ConfigDict:
    """The paper's CIFAR recipe [P §4.1] (`training/optim.py` builds it); experiment configs
    override fields."""
    return ml_collections.ConfigDict(dict(
        name="sgd",
        learning_rate=0.02,
        momentum=0.9,
        nesterov=False,
        # Paper silent; public ports use 0 (spec §4: OPEN, default 0).
        weight_decay=0.0,
        weight_decay_on="kernels",
        # "paper": ÷10 each time the remaining epochs halve; "steps": at boundaries_epochs.
        schedule="paper",
        num_epochs=400,
        boundaries_epochs=(),
        decay_factor=0.1,
        warmup_steps=0,
        b1=0.9,
        b2=0.999,
        eps=1e-8,
        grad_clip_norm=None,
    ))


def base_config() -> ml_collections.ConfigDict:
    """Every key the trainer reads, with the paper's CIFAR defaults where it has them."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.dataset = "cifar10"
    c.data_dir = ml_collections.config_dict.placeholder(str)
    c.data = ml_collections.ConfigDict(dict(
        path=ml_collections.config_dict.placeholder(str),  # image_folder / npz root
        # Paper tiers "none", "+", "++" (ImageNet always uses random-resized crops + flips);
        # max_shift / flip set the tier's translation range and mirroring.
        augment="+", max_shift=MAX_SHIFT, flip=True, normalize="mean", train_split="train",
        eval_split="test"))
    # model.name picks the registry entry; every other model.* key that is set (not None) is
    # passed to its constructor, overriding the entry's default.
    ph = ml_collections.config_dict.placeholder
    c.model = ml_collections.ConfigDict(dict(
        name="fractalnet20", num_blocks=ph(int), num_columns=ph(int), widths=ph(tuple),
        dropout=ph(tuple), dropout_position=ph(str), dropout_type=ph(str), join_order=ph(str),
        join=ph(str), head=ph(str), stem=ph(str), pool_last_block=ph(bool), bn_momentum=ph(float),
        bn_affine=ph(bool), bn_bias_correction=ph(bool), depth=ph(int),
        stochastic_depth_rate=ph(float), weight_init=ph(str), dtype=ph(str), remat=ph(bool),
        conv_impl=ph(str), pool_impl=ph(str), bn_impl=ph(str), dropout_impl=ph(str)))
    # skip: steps under a global plan compute only the kept column (same results, faster).
    # bn_update: "live" = units a plan leaves dead keep their BatchNorm statistics (needed to
    # skip dead work); "all" = every unit is computed and updates them every step (Caffe).
    c.drop_path = ml_collections.ConfigDict(dict(p_local=0.15, p_global=0.5, per_sample=False,
                                                 skip=True, bn_update="live"))
    # Every evaluation uses BatchNorm statistics estimated for the network it evaluates (the
    # full network, or a column alone) on the first num_examples unaugmented training examples
    # (training/evaluate.py), in batches of batch_size (None: all at once, which is exact).
    # enabled=False evaluates with the running statistics gathered in training instead.
    c.precise_bn = ml_collections.ConfigDict(dict(enabled=True, num_examples=1000,
                                                  batch_size=ph(int)))
    c.optim = default_optim_config()
    c.batch_size = 100
    c.eval_batch_size = 500
    c.num_train_steps = 200_000  # 400 epochs of 50,000 images at batch 100
    c.log_every_steps = 100
    c.eval_every_steps = 5_000
    c.checkpoint_every_steps = 5_000
    c.keep_checkpoints = 3
    c.progress_bar = True
    # Join a multi-process job (`training/multihost.py`): a cluster JAX detects (SLURM, TPU
    # pods), or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID (which
    # `python -m fractal_jax.launch` sets, and which imply it).
    c.distributed = False
    # Seconds after which a process that went silent (killed, crashed, host down) ends the others.
    c.host_timeout_s = 60.0
    # A NaN/Inf loss or gradient: "stop" the run (its last checkpoint stays good), or "skip" the
    # batch (the state stays as it was; the train records count `nonfinite_skipped`).
    c.nonfinite = "stop"
    # With nonfinite="skip": more consecutive skipped steps than this stop the run (diverged).
    c.nonfinite_max_consecutive = 20
    # (A, B): trace steps A..B with jax.profiler into WORKDIR/profile/ and log their host
    # timeline (training/profiling.py); (A,) traces one step; None: no profiling.
    c.profile_steps = ml_collections.config_dict.placeholder(tuple)
    return c


def _unknown_key(key: str, reference: ml_collections.ConfigDict, prefix: str) -> ValueError:
    close = difflib.get_close_matches(key, list(reference.keys()), n=3)
    hint = f" Did you mean {', '.join(repr(prefix + c) for c in close)}?" if close else ""
    return ValueError(f"Unknown config key {prefix + key!r}.{hint} Valid keys here: "
                      f"{', '.join(sorted(prefix + k for k in reference.keys()))}.")


def check_key(path: str) -> None:
    """Raises ValueError, with a "did you mean", unless the dotted `path` (e.g. "optim.name") is a
    config key."""
    reference, prefix = base_config(), ""
    for key in path.split("."):
        if not isinstance(reference, ml_collections.ConfigDict):
            raise ValueError(f"Unknown config key {path!r}: {prefix[:-1]!r} has no sub-keys.")
        if key not in reference:
            raise _unknown_key(key, reference, prefix)
        reference, prefix = reference[key], f"{prefix}{key}."


def _check_keys(config: ml_collections.ConfigDict, reference: ml_collections.ConfigDict,
                prefix: str = "") -> None:
    for key in config.keys():
        name = f"{prefix}{key}"
        if key not in reference:
            raise _unknown_key(key, reference, prefix)
        if isinstance(reference[key], ml_collections.ConfigDict):
            _check_keys(config[key], reference[key], f"{name}.")


def _positive_int(config: ml_collections.ConfigDict, key: str) -> None:
    value = config
    for part in key.split("."):
        value = value[part]
    require(isinstance(value, int) and not isinstance(value, bool) and value > 0, key, value,
            "it must be a positive integer")


def _validate_optim(optim: ml_collections.ConfigDict) -> None:
    def check(ok: bool, key: str, allowed: str) -> None:
        require(ok, f"optim.{key}", optim[key], f"it must be {allowed}")

    check_choice("optim.name", optim.name, OPTIMIZERS)
    check_choice("optim.schedule", optim.schedule, SCHEDULES)
    check_choice("optim.weight_decay_on", optim.weight_decay_on, WEIGHT_DECAY_TARGETS)
    check(optim.learning_rate > 0, "learning_rate", "> 0")
    check(0 <= optim.momentum < 1, "momentum", "in [0, 1)")
    check(optim.weight_decay >= 0, "weight_decay", ">= 0")
    check(optim.num_epochs > 0, "num_epochs", "> 0")
    check(0 < optim.decay_factor <= 1, "decay_factor", "in (0, 1]")
    boundaries = list(optim.boundaries_epochs)
    check(all(b >= 0 for b in boundaries) and boundaries == sorted(boundaries),
          "boundaries_epochs", "non-negative and ascending")
    check(isinstance(optim.warmup_steps, int) and optim.warmup_steps >= 0, "warmup_steps",
          "an integer >= 0")
    check(0 <= optim.b1 < 1, "b1", "in [0, 1)")
    check(0 <= optim.b2 < 1, "b2", "in [0, 1)")
    check(optim.eps > 0, "eps", "> 0")
    check(optim.grad_clip_norm is None or optim.grad_clip_norm >= 0, "grad_clip_norm",
          "None or >= 0")


def validate(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Checks every key and value; returns an unlocked copy of `config`.

    Raises ValueError naming the first unknown key (with a "did you mean") or bad value.
    """
    _check_keys(config, base_config())
    require(isinstance(config.seed, int), "seed", config.seed, "it must be an integer")
    require(isinstance(config.host_timeout_s, (int, float)) and config.host_timeout_s >= 2,
            "host_timeout_s", config.host_timeout_s, "it must be at least 2 (seconds)")
    check_choice("dataset", config.dataset, DATASETS)
    check_choice("data.augment", config.data.augment, TIERS)
    require(isinstance(config.data.max_shift, int) and config.data.max_shift >= 0,
            "data.max_shift", config.data.max_shift, "it must be an integer >= 0 (pixels)")
    check_choice("data.normalize", config.data.normalize, NORMALIZATIONS)
    if config.dataset in FILE_DATASETS:
        require(bool(config.data.path), "data.path", config.data.path,
                f"dataset {config.dataset!r} needs data.path (its root folder or .npz file)")
    require(isinstance(config.model.get("name"), str), "model.name", config.model.get("name"),
            "it must name a registered model (python -m fractal_jax.models.summary --help)")
    for key, choices in (("conv_impl", CONV_IMPLS), ("pool_impl", POOL_IMPLS),
                         ("bn_impl", BN_IMPLS), ("dropout_impl", DROPOUT_IMPLS)):
        if config.model.get(key) is not None:
            check_choice(f"model.{key}", config.model[key], choices)
    for key in ("p_local", "p_global"):
        value = config.drop_path[key]
        require(isinstance(value, (int, float)) and 0.0 <= value <= 1.0, f"drop_path.{key}",
                value, "it must be a probability in [0, 1]")
    for key in ("per_sample", "skip"):
        require(isinstance(config.drop_path[key], bool), f"drop_path.{key}",
                config.drop_path[key], "it must be True or False")
    check_choice("drop_path.bn_update", config.drop_path.bn_update, BN_UPDATES)
    require(not (config.drop_path.bn_update == "all" and config.drop_path.skip), "drop_path.skip",
            True, "skipping dead work needs drop_path.bn_update='live' (units that are not "
            "computed cannot update their statistics); set drop_path.skip=False to update "
            "every unit every step")
    check_choice("nonfinite", config.nonfinite, NONFINITE)
    require(isinstance(config.nonfinite_max_consecutive, int)
            and not isinstance(config.nonfinite_max_consecutive, bool)
            and config.nonfinite_max_consecutive >= 1, "nonfinite_max_consecutive",
            config.nonfinite_max_consecutive, "it must be an integer >= 1 (steps)")
    require(isinstance(config.precise_bn.enabled, bool), "precise_bn.enabled",
            config.precise_bn.enabled, "it must be True or False")
    _positive_int(config, "precise_bn.num_examples")
    if config.precise_bn.batch_size is not None:
        _positive_int(config, "precise_bn.batch_size")
    for key in ("batch_size", "eval_batch_size", "num_train_steps", "log_every_steps",
                "eval_every_steps", "checkpoint_every_steps", "keep_checkpoints"):
        _positive_int(config, key)
    require(config.checkpoint_every_steps % config.log_every_steps == 0,
            "checkpoint_every_steps", config.checkpoint_every_steps,
            f"it must be a multiple of log_every_steps={config.log_every_steps}, so a resumed "
            "run logs the same averaging windows as an uninterrupted one")
    steps = config.profile_steps
    require(steps is None or (
        isinstance(steps, tuple) and len(steps) in (1, 2)
        and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in steps)
        and list(steps) == sorted(steps)), "profile_steps", steps,
        "it must be A,B (trace steps A to B, 1 <= A <= B) or A (one step), e.g. "
        "--config.profile_steps=10,12")
    _validate_optim(config.optim)
    return ml_collections.ConfigDict(config.to_dict())


def to_json_dict(config: ml_collections.ConfigDict) -> dict:
    """The config as plain JSON types (tuples become lists), as stored in checkpoints."""
    return json.loads(config.to_json())


def experiment_differences(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """Keys whose values differ between two JSON configs, ignoring `RESUMABLE_KEYS`."""
    diffs = []
    for key in sorted(set(saved) | set(current)):
        name = f"{prefix}{key}"
        if name in RESUMABLE_KEYS:
            continue
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += experiment_differences(a, b, f"{name}.")
        elif a != b:
            diffs.append(f"{name}: {a!r} (saved) vs {b!r} (now)")
    return diffs
