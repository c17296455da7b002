"""Deterministic, resumable, multi-host input pipelines for training and evaluation.

Training batches are step-indexed: the batch at step s is a pure function of (seed, s),
so resuming at step s reproduces exactly the batches of an uninterrupted run.

In-memory datasets (all but ImageNet): global example position i = s * global_batch + j
(j in 0..global_batch-1) reads example `index_shuffle(i mod N)` of a permutation seeded by
(seed, epoch = i // N), so every epoch visits each example exactly once; the augmentation
of the whole global batch is drawn from the seed (seed, s) and row j goes to position j.

ImageNet (streamed from TFDS): a fixed-seed file order, interleave and shuffle buffer give
a reproducible example stream; resuming skips the first start_step * global_batch records
(they are read but not decoded, so a late resume costs some I/O time). Position j of step s
is augmented with the seed fold_in((seed, s), j).

Multi-host: each process yields only its slice, positions [p * local, (p + 1) * local) of
each global batch (local = global_batch / process_count), computed exactly as a single
process would, so the processes' slices concatenate to the single-process global batch.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Iterator

import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from fractal_jax.checks import check_choice
from fractal_jax.config import LOCAL_DATASETS, NORMALIZATIONS, TIERS
from fractal_jax.data import augment as aug
from fractal_jax.data import sources

Batch = dict[str, np.ndarray]
_SHUFFLE_STREAM = 0x5EED  # First word of the 3-word index_shuffle seed (seed, epoch follow).
_IMAGENET_SHUFFLE_BUFFER = 10_000


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
    prepared in `data_dir`, and DataError for malformed local data.
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
    if dataset in sources.STREAMING_TFDS:
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


def train_batches(
    dataset: str,
    *,
    global_batch_size: int,
    seed: int,
    start_step: int = 0,
    num_steps: int | None = None,
    augment: str = "none",
    max_shift: int = aug.MAX_SHIFT,
    flip: bool = True,
    normalize: str = "mean",
    data_dir: str | None = None,
    path: str | None = None,
    split: str = "train",
    process_index: int | None = None,
    process_count: int | None = None,
) -> Iterator[Batch]:
    """Returns an iterator over training batches for steps start_step, start_step + 1, ...

    Each batch is {"image": float32 (local_batch, H, W, C), "label": int32 (local_batch,)},
    this process's slice of the global batch. The iterator is infinite unless `num_steps`
    is given. `augment` is a tier of `augment.TIERS` (translations up to `max_shift` px,
    horizontal flips if `flip`; ImageNet always uses its own crops), `normalize` one of
    `augment.NORMALIZATIONS` (statistics from `split`). Errors in the arguments or the
    data are raised here, not at the first `next()`.
    """
    sources.check_dataset_name(dataset)
    check_choice("augment", augment, TIERS)
    if not 0 <= max_shift:
        raise ValueError(f"max_shift must be >= 0 pixels, got {max_shift}.")
    if start_step < 0 or (num_steps is not None and num_steps < 0):
        raise ValueError(f"start_step ({start_step}) and num_steps ({num_steps}) must be >= 0.")
    lo, hi = _process_slice(global_batch_size, process_index, process_count)
    mean, std = _normalization(dataset, split, data_dir, path, normalize)
    if dataset in sources.STREAMING_TFDS:
        batches = _imagenet_train(
            sources.tfds_builder(dataset, data_dir), split, global_batch_size, lo, hi,
            seed, start_step, num_steps, mean, std,
        )
    else:
        steps = (
            tf.data.Dataset.counter(start_step)
            if num_steps is None
            else tf.data.Dataset.range(start_step, start_step + num_steps)
        )
        batch_at = _in_memory_train_fn(
            sources.load_split(dataset, split, data_dir, path),
            global_batch_size, lo, hi, seed, augment, mean, std, max_shift, flip,
        )
        batches = steps.map(batch_at, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return batches.prefetch(tf.data.AUTOTUNE).as_numpy_iterator()


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
    if dataset in sources.STREAMING_TFDS:
        return _imagenet_eval(
            sources.tfds_builder(dataset, data_dir), split, batch_size, lo, hi, mean, std
        )
    data = _eval_split(dataset, split, train_split, data_dir, path)
    num_batches = math.ceil(len(data.labels) / batch_size)
    batch_at = _in_memory_eval_fn(data, batch_size, lo, hi, mean, std)
    batches = tf.data.Dataset.range(num_batches).map(batch_at, num_parallel_calls=tf.data.AUTOTUNE)
    return batches.prefetch(tf.data.AUTOTUNE).as_numpy_iterator()


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
    if dataset in sources.STREAMING_TFDS and split.startswith("test"):
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
    if dataset in sources.STREAMING_TFDS:
        std = aug.IMAGENET_STD if normalize == "mean_std" else np.ones(3, np.float32)
        return aug.IMAGENET_MEAN, std
    return aug.channel_stats(sources.load_split(dataset, split, data_dir, path).images, normalize)


def _shuffled_indices(positions: tf.Tensor, num_examples: int, seed: int) -> tf.Tensor:
    """Returns the example read at each global position (int64): a fresh permutation per epoch.

    tf.random.experimental.index_shuffle pads a batch of [n, 2] seeds along the wrong axis
    (TF 2.21), so the raw op is called with its native 3-word seeds (stream, seed, epoch).
    """
    epochs = positions // num_examples
    seeds = tf.stack(
        [tf.fill(tf.shape(positions), tf.constant(_SHUFFLE_STREAM, tf.int64)),
         tf.fill(tf.shape(positions), tf.constant(seed, tf.int64)),
         epochs],
        axis=-1,
    )
    return tf.raw_ops.RandomIndexShuffle(
        index=positions % num_examples,
        seed=seeds,
        max_index=tf.constant(num_examples - 1, tf.int64),
        rounds=4,
    )


def _in_memory_train_fn(
    data: sources.ArraySplit, global_batch: int, lo: int, hi: int, seed: int, tier: str,
    mean: np.ndarray, std: np.ndarray, max_shift: int, flip: bool,
):
    """Returns step (int64 scalar) -> this process's batch of that step, as TF ops."""
    images, labels = tf.constant(data.images), tf.constant(data.labels)
    offsets = tf.range(lo, hi, dtype=tf.int64)
    seed_t = tf.constant(seed, tf.int64)

    def batch_at(step: tf.Tensor) -> dict[str, tf.Tensor]:
        indices = _shuffled_indices(step * global_batch + offsets, len(data.labels), seed)
        x = aug.normalize_images(tf.gather(images, indices), mean, std)
        flips, shift = aug.sample_augment_params(tf.stack([seed_t, step]), global_batch,
                                                 max_shift=max_shift, flip=flip)
        return {
            "image": aug.apply_augment(x, flips[lo:hi], shift[lo:hi], tier, max_shift),
            "label": tf.gather(labels, indices),
        }

    return batch_at


def _in_memory_eval_fn(
    data: sources.ArraySplit, batch_size: int, lo: int, hi: int,
    mean: np.ndarray, std: np.ndarray,
):
    """Returns batch number k -> this process's slice of examples [k * B, (k + 1) * B)."""
    images, labels = tf.constant(data.images), tf.constant(data.labels)
    num_examples = len(data.labels)
    offsets = tf.range(lo, hi, dtype=tf.int64)

    def batch_at(k: tf.Tensor) -> dict[str, tf.Tensor]:
        positions = k * batch_size + offsets
        mask = positions < num_examples
        indices = tf.minimum(positions, num_examples - 1)  # Padding rows: any valid index.
        x = aug.normalize_images(tf.gather(images, indices), mean, std)
        return {
            "image": tf.where(mask[:, None, None, None], x, 0.0),
            "label": tf.where(mask, tf.gather(labels, indices), 0),
            "mask": mask,
        }

    return batch_at


def _imagenet_records(
    builder: tfds.core.DatasetBuilder, split: str, shuffle_seed: int | None
) -> tf.data.Dataset:
    """Returns (position, (encoded image, label)) of `split` in a reproducible order.

    Files are shuffled with `shuffle_seed` (each epoch differently, yet the same on every
    run), or read in order when it is None. Images stay encoded so that skipped records
    are never decoded.
    """
    options = tf.data.Options()
    options.deterministic = True
    read_config = tfds.ReadConfig(
        shuffle_seed=shuffle_seed, interleave_cycle_length=16, interleave_block_length=1,
        options=options,
    )
    records = builder.as_dataset(
        split=split, shuffle_files=shuffle_seed is not None, read_config=read_config,
        decoders={"image": tfds.decode.SkipDecoding()},
    ).map(lambda ex: (ex["image"], tf.cast(ex["label"], tf.int32)))
    if shuffle_seed is not None:
        records = records.shuffle(_IMAGENET_SHUFFLE_BUFFER, seed=shuffle_seed).repeat()
    return records.enumerate()


def _local_positions(records: tf.data.Dataset, batch: int, lo: int, hi: int) -> tf.data.Dataset:
    """Keeps the records whose position in their global batch lies in [lo, hi)."""
    return records.filter(lambda p, _: tf.logical_and(p % batch >= lo, p % batch < hi))


def _decode(encoded: tf.Tensor) -> tf.Tensor:
    """Returns the RGB uint8 (H, W, 3) image of an encoded JPEG / PNG."""
    return tf.io.decode_image(encoded, channels=3, expand_animations=False)


def _imagenet_train(
    builder: tfds.core.DatasetBuilder, split: str, global_batch: int, lo: int, hi: int,
    seed: int, start_step: int, num_steps: int | None, mean: np.ndarray, std: np.ndarray,
) -> tf.data.Dataset:
    """Returns the streamed ImageNet training batches of this process, from `start_step`."""
    records = _imagenet_records(builder, split, shuffle_seed=seed).skip(start_step * global_batch)
    if num_steps is not None:
        records = records.take(num_steps * global_batch)

    def example(position: tf.Tensor, record: tuple[tf.Tensor, tf.Tensor]) -> dict:
        step_seed = tf.stack([tf.constant(seed, tf.int64), position // global_batch])
        example_seed = tf.random.experimental.stateless_fold_in(step_seed, position % global_batch)
        image = aug.imagenet_train_image(_decode(record[0]), example_seed)
        return {"image": aug.normalize_images(image, mean, std), "label": record[1]}

    return (
        _local_positions(records, global_batch, lo, hi)
        .map(example, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        .batch(hi - lo, drop_remainder=True)
    )


def _imagenet_eval(
    builder: tfds.core.DatasetBuilder, split: str, batch_size: int, lo: int, hi: int,
    mean: np.ndarray, std: np.ndarray,
) -> Iterator[Batch]:
    """Yields this process's slices of ImageNet eval batches, padded and masked at the end."""

    def example(_: tf.Tensor, record: tuple[tf.Tensor, tf.Tensor]) -> dict:
        image = aug.imagenet_eval_image(_decode(record[0]))
        return {"image": aug.normalize_images(image, mean, std), "label": record[1]}

    batches = (
        _local_positions(_imagenet_records(builder, split, shuffle_seed=None), batch_size, lo, hi)
        .map(example, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        .batch(hi - lo)
        .prefetch(tf.data.AUTOTUNE)
        .as_numpy_iterator()
    )
    num_batches = math.ceil(builder.info.splits[split].num_examples / batch_size)
    image_shape = (aug.IMAGENET_SIZE, aug.IMAGENET_SIZE, 3)
    empty = {"image": np.zeros((0, *image_shape), np.float32), "label": np.zeros(0, np.int32)}
    for _ in range(num_batches):
        # A process whose slice of the last global batch is empty gets no batch from
        # tf.data; it still yields an all-padding one so every process runs as many steps.
        yield _padded(next(batches, empty), hi - lo)


def _padded(batch: Batch, size: int) -> Batch:
    """Returns `batch` padded with zero rows to `size`, plus a mask that marks the real rows."""
    n = len(batch["label"])
    padded = {k: np.concatenate([v, np.zeros((size - n, *v.shape[1:]), v.dtype)])
              for k, v in batch.items()}
    return padded | {"mask": np.arange(size) < n}
