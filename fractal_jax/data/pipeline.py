"""Deterministic, resumable, multi-host input pipelines for training and evaluation, on grain.

Every batch is read by random access: the batch at step s is a pure function of (seed, s),
computed from nothing but s, so resuming at step s costs the same as starting and
reproduces exactly the batches of an uninterrupted run.

Global example position i = s * global_batch + j (j in 0..global_batch-1) reads example
`permutation(seed, epoch)[i mod N]` with epoch = i // N, so every epoch visits each example
exactly once, in a fresh order. Augmentation is numpy, keyed by (seed, s): the flips and
shifts of the paper's tiers are drawn for the whole global batch and row j goes to
position j; ImageNet's crop and flip of position j are drawn from the key (seed, s, j).
With `eval_transform` the same examples, in the same order, are preprocessed as evaluation
does instead (unaugmented; ImageNet's resize and central crop): a deterministic set of
training images, e.g. to calibrate BatchNorm statistics.

Multi-host: each process reads and yields only its slice, positions [p * local, (p + 1) *
local) of each global batch (local = global_batch / process_count), computed exactly as a
single process would, so the processes' slices concatenate to the single-process batch.

grain runs the per-step batch functions in a pool of threads, in order, ahead of the
training step: threads, not processes, because PIL's decoding and resizing and numpy's
copies release the GIL, and the in-memory arrays are then shared instead of copied.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
import sys
from collections.abc import Callable, Iterator, Sequence

import grain
import jax
import numpy as np

from fractal_jax.checks import check_choice
from fractal_jax.config import (LOCAL_DATASETS, MAX_SHIFT, NORMALIZATIONS, RANDOM_ACCESS_TFDS,
                                TIERS)
from fractal_jax.data import augment as aug
from fractal_jax.data import sources

Batch = dict[str, np.ndarray]
# First words of the generator keys, so that shuffling and augmentation never share draws.
_SHUFFLE_STREAM = 0x5EED
_AUGMENT_STREAM = 0xA0
_PREFETCH_PER_THREAD = 2  # Batches buffered per grain thread: enough to hide one slow batch.


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What a model and training loop need to know about a dataset."""

    name: str
    num_classes: int
    image_shape: tuple[int, int, int]  # (H, W, C) of the model input AFTER preprocessing
    num_train_examples: int
    num_eval_examples: int
    class_names: tuple[str, ...]


def get_dataset_info(
    dataset: str,
    *,
    data_dir: str | None = None,
    path: str | None = None,
    train_split: str = "train",
    eval_split: str = "test",
) -> DatasetInfo:
    """Returns the DatasetInfo of `dataset`, reading TFDS metadata or loading local splits.

    Raises ValueError for an unknown name, DatasetNotFoundError for TFDS data that is not
    prepared (in ArrayRecord format) in `data_dir`, and DataError for malformed local data.
    """
    sources.check_dataset_name(dataset)
    if dataset in LOCAL_DATASETS:
        train = sources.load_split(dataset, train_split, data_dir, path)
        evaluation = _eval_split(dataset, eval_split, train_split, data_dir, path)
        return DatasetInfo(
            name=dataset,
            num_classes=len(train.class_names),
            image_shape=tuple(train.images.shape[1:]),
            num_train_examples=len(train.labels),
            num_eval_examples=len(evaluation.labels),
            class_names=train.class_names,
        )
    builder = sources.tfds_builder(dataset, data_dir)
    _check_labelled(dataset, eval_split)
    names = sources.tfds_class_names(builder)
    if dataset in RANDOM_ACCESS_TFDS:
        shape = (aug.IMAGENET_SIZE, aug.IMAGENET_SIZE, 3)
    else:
        shape = tuple(builder.info.features["image"].shape)
    return DatasetInfo(
        name=dataset,
        num_classes=len(names),
        image_shape=shape,
        num_train_examples=builder.info.splits[train_split].num_examples,
        num_eval_examples=builder.info.splits[eval_split].num_examples,
        class_names=names,
    )


def default_num_threads(dataset: str) -> int:
    """Returns how many grain threads prepare batches of `dataset` on this machine.

    Decoding and cropping JPEGs (ImageNet, ~200 images/s per core) takes a thread per core.
    The in-memory datasets' vectorised batches take two at most: one thread made 20,000-30,000
    augmented CIFAR images/s on a busy 2-core CPU (experiments/pipeline_benchmark.py), 40-200x
    that CPU's train step (BENCHMARKS.md); a second keeps up with faster accelerator steps.
    """
    cores = os.cpu_count() or 1
    return cores if dataset in RANDOM_ACCESS_TFDS else min(2, cores)


def train_batches(
    dataset: str,
    *,
    global_batch_size: int,
    seed: int,
    start_step: int = 0,
    num_steps: int | None = None,
    augment: str = "none",
    max_shift: int = MAX_SHIFT,
    flip: bool = True,
    normalize: str = "mean",
    data_dir: str | None = None,
    path: str | None = None,
    split: str = "train",
    process_index: int | None = None,
    process_count: int | None = None,
    num_threads: int | None = None,
    eval_transform: bool = False,
) -> Iterator[Batch]:
    """Returns an iterator over training batches for steps start_step, start_step + 1, ...

    Each batch is {"image": float32 (local_batch, H, W, C), "label": int32 (local_batch,)},
    this process's slice of the global batch. The iterator is infinite unless `num_steps`
    is given. `augment` is a tier of `config.TIERS` (translations up to `max_shift` px,
    horizontal flips if `flip`; ImageNet uses its own random crops and flips for every tier,
    as its config relies on), `normalize` one of `config.NORMALIZATIONS` (statistics from
    `split`). `eval_transform=True` (with augment="none") preprocesses every example as
    `eval_batches` does, for every dataset: ImageNet gets its central crop, with no
    randomness. `num_threads` grain threads (default: `default_num_threads`) prepare batches
    ahead; the batches never depend on it.
    Errors in the arguments or the data are raised here, not at the first `next()`.
    """
    sources.check_dataset_name(dataset)
    check_choice("augment", augment, TIERS)
    if eval_transform and augment != "none":
        raise ValueError(f"eval_transform=True preprocesses as evaluation does, without "
                         f"augmentation; it needs augment='none', got augment={augment!r}.")
    if not 0 <= max_shift:
        raise ValueError(f"max_shift must be >= 0 pixels, got {max_shift}.")
    lo, hi = _process_slice(global_batch_size, process_index, process_count)
    threads = default_num_threads(dataset) if num_threads is None else num_threads
    if dataset in RANDOM_ACCESS_TFDS:
        return encoded_image_train_batches(
            sources.encoded_image_source(sources.tfds_builder(dataset, data_dir), split),
            global_batch_size=global_batch_size, seed=seed, start_step=start_step,
            num_steps=num_steps, normalize=normalize, process_index=process_index,
            process_count=process_count, num_threads=threads, eval_transform=eval_transform,
        )
    mean, std = _normalization(dataset, split, data_dir, path, normalize)
    batch_at = functools.partial(
        _in_memory_train_batch, data=sources.load_split(dataset, split, data_dir, path),
        global_batch=global_batch_size, lo=lo, hi=hi, seed=seed, tier=augment,
        mean=mean, std=std, max_shift=max_shift, flip=flip,
    )
    return _iterate(_steps(start_step, num_steps, global_batch_size).map(batch_at), threads)


def encoded_image_train_batches(
    source: Sequence[dict],
    *,
    global_batch_size: int,
    seed: int,
    start_step: int = 0,
    num_steps: int | None = None,
    normalize: str = "mean",
    process_index: int | None = None,
    process_count: int | None = None,
    num_threads: int | None = None,
    eval_transform: bool = False,
) -> Iterator[Batch]:
    """Returns ImageNet-style training batches of a random-access `source` of encoded images.

    `source[i]` is {"image": JPEG / PNG bytes, "label": int} and `source.__getitems__`
    reads several records at once (as TFDS's ArrayRecord data sources do). Each example is
    decoded, cropped and flipped by `augment.imagenet_train_image` (or, with
    `eval_transform`, centrally cropped by `augment.imagenet_eval_image`, as evaluation does)
    and normalised with ImageNet's statistics; otherwise the batches are as `train_batches`
    describes.
    """
    check_choice("normalize", normalize, NORMALIZATIONS)
    lo, hi = _process_slice(global_batch_size, process_index, process_count)
    steps = _steps(start_step, num_steps, global_batch_size)
    mean, std = _normalization("imagenet2012", "train", None, None, normalize)
    batch_at = functools.partial(
        _imagenet_train_batch, source=source, global_batch=global_batch_size, lo=lo, hi=hi,
        seed=seed, mean=mean, std=std, eval_transform=eval_transform,
    )
    threads = default_num_threads("imagenet2012") if num_threads is None else num_threads
    return _iterate(steps.map(batch_at), threads)


def eval_batches(
    dataset: str,
    *,
    batch_size: int,
    split: str = "test",
    normalize: str = "mean",
    data_dir: str | None = None,
    path: str | None = None,
    train_split: str = "train",
    process_index: int | None = None,
    process_count: int | None = None,
    num_threads: int | None = None,
) -> Iterator[Batch]:
    """Returns an iterator making one ordered pass over `split`, without augmentation.

    Yields {"image", "label", "mask": bool (local_batch,)}: `batch_size` is global, like
    training's, and every process yields ceil(N / batch_size) batches of its slice. The
    last batch is padded with zero images, label 0 and mask False, so summing over
    `mask` counts every example exactly once. Normalisation statistics come from
    `train_split`, as in training. For imagenet2012, evaluate split="validation".
    """
    sources.check_dataset_name(dataset)
    _check_labelled(dataset, split)
    lo, hi = _process_slice(batch_size, process_index, process_count)
    mean, std = _normalization(dataset, train_split, data_dir, path, normalize)
    if dataset in RANDOM_ACCESS_TFDS:
        source = sources.encoded_image_source(sources.tfds_builder(dataset, data_dir), split)
        read = functools.partial(_read_imagenet_eval, source)
        num_examples = len(source)
    else:
        data = _eval_split(dataset, split, train_split, data_dir, path)
        read = functools.partial(_read_in_memory, data)
        num_examples = len(data.labels)
    batch_at = functools.partial(_eval_batch, read=read, num_examples=num_examples,
                                 batch_size=batch_size, lo=lo, hi=hi, mean=mean, std=std)
    num_batches = math.ceil(num_examples / batch_size)
    return _iterate(grain.MapDataset.range(num_batches).map(batch_at),
                    default_num_threads(dataset) if num_threads is None else num_threads)


def example_indices(positions: np.ndarray, num_examples: int, seed: int) -> np.ndarray:
    """Returns the example read at each global position: a fresh permutation per epoch."""
    epochs, offsets = np.divmod(positions, num_examples)
    indices = np.empty_like(positions)
    for epoch in np.unique(epochs):
        here = epochs == epoch
        indices[here] = _permutation(num_examples, seed, int(epoch))[offsets[here]]
    return indices


@functools.lru_cache(maxsize=4)  # A batch spans at most two epochs; threads may lag by one.
def _permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    return aug.generator(_SHUFFLE_STREAM, seed, epoch).permutation(num_examples)


def _steps(start_step: int, num_steps: int | None, global_batch: int) -> grain.MapDataset:
    """Returns the steps start_step, start_step + 1, ... (num_steps of them, or unbounded)."""
    if start_step < 0 or (num_steps is not None and num_steps < 0):
        raise ValueError(f"start_step ({start_step}) and num_steps ({num_steps}) must be >= 0.")
    # Unbounded: as many steps as global positions fit in an int64.
    stop = sys.maxsize // global_batch if num_steps is None else start_step + num_steps
    return grain.MapDataset.range(start_step, stop)


def _iterate(batches: grain.MapDataset, num_threads: int) -> Iterator[Batch]:
    """Returns an iterator over `batches`, in order, prepared ahead by `num_threads` threads."""
    options = grain.ReadOptions(num_threads=num_threads,
                                prefetch_buffer_size=_PREFETCH_PER_THREAD * max(num_threads, 1))
    return iter(batches.to_iter_dataset(options))


def _process_slice(
    global_batch: int, process_index: int | None, process_count: int | None
) -> tuple[int, int]:
    """Returns [lo, hi): the positions of the global batch that this process produces."""
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    if global_batch <= 0 or count <= 0 or not 0 <= index < count:
        raise ValueError(f"Need batch size > 0 and 0 <= process_index < process_count, got "
                         f"{global_batch}, {index}, {count}.")
    if global_batch % count:
        raise ValueError(f"The global batch size {global_batch} must be divisible by the "
                         f"number of processes {count}.")
    local = global_batch // count
    return index * local, (index + 1) * local


def _check_labelled(dataset: str, split: str) -> None:
    """Rejects ImageNet's test split, whose labels TFDS stores as -1."""
    if dataset in RANDOM_ACCESS_TFDS and split.startswith("test"):
        raise ValueError(f"{dataset}'s {split!r} split has no labels; evaluate 'validation'.")


def _eval_split(
    dataset: str, split: str, train_split: str, data_dir: str | None, path: str | None
) -> sources.ArraySplit:
    """Returns in-memory `split`, checked to have the training split's image shape."""
    data = sources.load_split(dataset, split, data_dir, path)
    train_shape = sources.load_split(dataset, train_split, data_dir, path).images.shape[1:]
    if data.images.shape[1:] != train_shape:
        raise sources.DataError(f"{dataset} split {split!r} has images of shape "
                                f"{data.images.shape[1:]}, but {train_split!r} has {train_shape}.")
    return data


@functools.lru_cache(maxsize=16)
def _normalization(
    dataset: str, split: str, data_dir: str | None, path: str | None, normalize: str
) -> tuple[np.ndarray, np.ndarray]:
    """Returns the per-channel (mean, std) used to normalise `dataset`, computed on `split`."""
    check_choice("normalize", normalize, NORMALIZATIONS)
    if dataset in RANDOM_ACCESS_TFDS:
        std = aug.IMAGENET_STD if normalize == "mean_std" else np.ones(3, np.float32)
        return aug.IMAGENET_MEAN, std
    return aug.channel_stats(sources.load_split(dataset, split, data_dir, path).images, normalize)


def _in_memory_train_batch(
    step: int, *, data: sources.ArraySplit, global_batch: int, lo: int, hi: int, seed: int,
    tier: str, mean: np.ndarray, std: np.ndarray, max_shift: int, flip: bool,
) -> Batch:
    """Returns this process's slice of the training batch of `step`."""
    indices = example_indices(step * global_batch + np.arange(lo, hi), len(data.labels), seed)
    images = aug.normalize_images(data.images[indices], mean, std)
    flips, shift = aug.sample_augment_params((_AUGMENT_STREAM, seed, step), global_batch,
                                             max_shift=max_shift, flip=flip)
    return {"image": aug.apply_augment(images, flips[lo:hi], shift[lo:hi], tier, max_shift),
            "label": data.labels[indices]}


def _imagenet_train_batch(
    step: int, *, source: Sequence[dict], global_batch: int, lo: int, hi: int, seed: int,
    mean: np.ndarray, std: np.ndarray, eval_transform: bool,
) -> Batch:
    """Returns this process's slice of the ImageNet batch of `step`: decoded and cropped (and
    flipped, unless `eval_transform`)."""
    indices = example_indices(step * global_batch + np.arange(lo, hi), len(source), seed)
    records = source.__getitems__(indices.tolist())
    images = [_imagenet_train_image(r["image"], (_AUGMENT_STREAM, seed, step, j), eval_transform)
              for j, r in zip(range(lo, hi), records)]
    return {"image": aug.normalize_images(np.stack(images), mean, std),
            "label": np.array([r["label"] for r in records], np.int32)}


def _imagenet_train_image(encoded: bytes, key: tuple[int, ...], eval_transform: bool
                          ) -> np.ndarray:
    """Decodes one training example: the random crop and flip drawn from `key`, or with
    `eval_transform` evaluation's central crop (no draw, so the image is fixed)."""
    image = aug.decode_image(encoded)
    if eval_transform:
        return aug.imagenet_eval_image(image)
    return aug.imagenet_train_image(image, aug.generator(*key))


def _read_in_memory(data: sources.ArraySplit, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Returns the images (0..255) and labels of examples `indices` of an in-memory split."""
    return data.images[indices], data.labels[indices]


def _read_imagenet_eval(source: Sequence[dict], indices: np.ndarray
                        ) -> tuple[np.ndarray, np.ndarray]:
    """Returns the central crops (0..255) and labels of ImageNet examples `indices`."""
    records = source.__getitems__(indices.tolist()) if len(indices) else []
    images = [aug.imagenet_eval_image(aug.decode_image(r["image"])) for r in records]
    shape = (len(records), aug.IMAGENET_SIZE, aug.IMAGENET_SIZE, 3)
    return (np.stack(images) if images else np.zeros(shape, np.uint8),
            np.array([r["label"] for r in records], np.int32))


def _eval_batch(
    k: int, *, read: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]], num_examples: int,
    batch_size: int, lo: int, hi: int, mean: np.ndarray, std: np.ndarray,
) -> Batch:
    """Returns this process's slice of eval batch `k`, padded with zero rows to hi - lo.

    A process whose slice of the last batch holds no example still gets an all-padding
    batch, so that every process runs as many steps.
    """
    positions = np.arange(k * batch_size + lo, min(k * batch_size + hi, num_examples))
    images, labels = read(positions)
    images = aug.normalize_images(images, mean, std)
    padding = hi - lo - len(labels)
    return {
        "image": np.concatenate([images, np.zeros((padding, *images.shape[1:]), np.float32)]),
        "label": np.concatenate([labels, np.zeros(padding, np.int32)]),
        "mask": np.arange(hi - lo) < len(labels),
    }
