"""The experiment config: one `ml_collections.ConfigDict` with every knob, checked once at start.

Experiment files under ``experiments/configs/`` start from `base_config()` and change fields;
`validate` rejects unknown keys (with a "did you mean"), wrong types and out-of-range values,
naming the key and what is allowed, before any work starts.
"""
from __future__ import annotations

import difflib
import json
from typing import Any

import ml_collections

from fractal_jax.data.augment import MAX_SHIFT, NORMALIZATIONS, TIERS
from fractal_jax.training.optim import validate_optim_config as validate_optim
from fractal_jax.training.optim import default_optim_config

NONFINITE = ("stop", "skip")
DATASETS = ("digits", "cifar10", "cifar100", "svhn_cropped", "imagenet2012", "image_folder", "npz")
# Keys that may change between a run and its resumption without changing the experiment.
RESUMABLE_KEYS = ("num_train_steps", "eval_every_steps", "checkpoint_every_steps",
                  "log_every_steps", "keep_checkpoints", "data_dir", "progress_bar",
                  "eval_batch_size", "drop_path.skip", "model.remat", "model.conv_impl",
                  "model.pool_impl", "nonfinite")


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
        bn_affine=ph(bool), depth=ph(int), stochastic_depth_rate=ph(float), weight_init=ph(str),
        dtype=ph(str), remat=ph(bool), conv_impl=ph(str),
        pool_impl=ph(str)))
    # skip: steps under a global plan compute only the kept column (same results, faster).
    c.drop_path = ml_collections.ConfigDict(dict(p_local=0.15, p_global=0.5, per_sample=False,
                                                 skip=True))
    c.optim = default_optim_config()
    c.batch_size = 100
    c.eval_batch_size = 500
    c.num_train_steps = 200_000  # 400 epochs of 50,000 images at batch 100
    c.log_every_steps = 100
    c.eval_every_steps = 5_000
    c.checkpoint_every_steps = 5_000
    c.keep_checkpoints = 3
    c.progress_bar = True
    c.distributed = False  # call jax.distributed.initialize() for multi-host runs
    # A NaN/Inf loss or gradient: "stop" the run (its last checkpoint stays good), or "skip" the
    # batch (the state stays as it was; the train records count `nonfinite_skipped`).
    c.nonfinite = "stop"
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


def _require(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ValueError(f"Config value {key}={value!r} is invalid: {allowed}.")


def _positive_int(config: ml_collections.ConfigDict, key: str) -> None:
    value = config[key]
    _require(isinstance(value, int) and not isinstance(value, bool) and value > 0, key, value,
             "it must be a positive integer")


def validate(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Checks every value; returns the config with `optim` completed by its defaults."""
    _check_keys(config, base_config())
    _require(isinstance(config.seed, int), "seed", config.seed, "it must be an integer")
    _require(config.dataset in DATASETS, "dataset", config.dataset,
             f"it must be one of {', '.join(DATASETS)}")
    _require(config.data.augment in TIERS, "data.augment", config.data.augment,
             f"it must be one of {', '.join(map(repr, TIERS))}")
    _require(isinstance(config.data.max_shift, int) and config.data.max_shift >= 0,
             "data.max_shift", config.data.max_shift, "it must be an integer >= 0 (pixels)")
    _require(config.data.normalize in NORMALIZATIONS, "data.normalize", config.data.normalize,
             f"it must be one of {', '.join(NORMALIZATIONS)}")
    if config.dataset in ("image_folder", "npz"):
        _require(bool(config.data.path), "data.path", config.data.path,
                 f"dataset {config.dataset!r} needs data.path (its root folder or .npz file)")
    _require(isinstance(config.model.get("name"), str), "model.name", config.model.get("name"),
             "it must name a registered model (python -m fractal_jax.models.summary --help)")
    for key in ("p_local", "p_global"):
        value = config.drop_path[key]
        _require(isinstance(value, (int, float)) and 0.0 <= value <= 1.0, f"drop_path.{key}",
                 value, "it must be a probability in [0, 1]")
    for key in ("per_sample", "skip"):
        _require(isinstance(config.drop_path[key], bool), f"drop_path.{key}",
                 config.drop_path[key], "it must be True or False")
    _require(config.nonfinite in NONFINITE, "nonfinite", config.nonfinite,
             f"it must be one of {', '.join(NONFINITE)}")
    for key in ("batch_size", "eval_batch_size", "num_train_steps", "log_every_steps",
                "eval_every_steps", "checkpoint_every_steps", "keep_checkpoints"):
        _positive_int(config, key)
    _require(config.checkpoint_every_steps % config.log_every_steps == 0,
             "checkpoint_every_steps", config.checkpoint_every_steps,
             f"it must be a multiple of log_every_steps={config.log_every_steps}, so a resumed "
             "run logs the same averaging windows as an uninterrupted one")
    config = ml_collections.ConfigDict(config.to_dict())
    config.optim = validate_optim(config.optim)
    return config


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
