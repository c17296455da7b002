"""Tests of the input pipelines: sources, augmentation, determinism, resumption, multi-host."""
import io
import os
import subprocess
import sys
import time
from unittest import mock

import chex
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from experiments.configs import imagenet
from fractal_jax.data import augment, digits, pipeline, prepare, sources
from fractal_jax.training import experiment

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _no_network():
    """Makes any attempt to open a network connection fail the test."""
    return mock.patch("socket.socket.connect", side_effect=AssertionError("network access"))


def _train(**kwargs):
    """All batches of a short digits run, as a list."""
    args = dict(global_batch_size=64, seed=0, num_steps=30) | kwargs
    return list(pipeline.train_batches("digits", **args))


def _normalized(images, normalize="mean"):
    """Images normalised exactly as the pipeline does, statistics from the same images."""
    return augment.normalize_images(images, *augment.channel_stats(images, normalize))


def _row_counts(images):
    """The multiset of images, as {bytes: count}."""
    rows, counts = np.unique(images.reshape(len(images), -1), axis=0, return_counts=True)
    return {r.tobytes(): c for r, c in zip(rows, counts)}


def _encode(image, format="PNG"):
    buffer = io.BytesIO()
    Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image).save(buffer, format)
    return buffer.getvalue()


# ----- the digits dataset -------------------------------------------------------------

def test_digits_loads_offline_with_fixed_splits():
    with _no_network():
        info = pipeline.get_dataset_info("digits")
    assert info == pipeline.DatasetInfo(
        "digits", 10, (8, 8, 1), 1500, 297, tuple(str(d) for d in range(10))
    )
    train = sources.load_split("digits", "train", None, None)
    assert train.images.dtype == np.uint8 and train.images.max() == 255
    assert len(np.unique(train.images.reshape(1500, -1), axis=0)) > 1000  # Real, varied images.
    assert set(train.labels) == set(range(10))
    split = digits.split_indices()
    assert not set(split["train"]) & set(split["test"])
    assert len(split["train"]) + len(split["test"]) == 1797
    start = time.perf_counter()
    images, labels = digits.load("test")
    assert time.perf_counter() - start < 1.0  # Read straight from scikit-learn's file.
    chex.assert_shape((images, labels), ((297, 8, 8, 1), (297,)))
    with pytest.raises(ValueError, match="splits"):
        digits.load("validation")


def test_digits_are_scikit_learns():
    from sklearn.datasets import load_digits

    data, index = load_digits(), digits.split_indices()["train"]
    images, labels = digits.load("train")
    np.testing.assert_array_equal(images, digits.to_uint8(data.images[index]))
    np.testing.assert_array_equal(labels, data.target[index])


# ----- determinism, resumption, epochs ----------------------------------------------

@pytest.mark.parametrize("tier", ["+", "++"])
def test_resuming_at_a_step_gives_the_same_batches(tier):
    full = _train(augment=tier)
    for start in (1, 23, 24):  # Step 23 straddles the first epoch boundary (1500 / 64).
        resumed = _train(augment=tier, start_step=start, num_steps=3)
        chex.assert_trees_all_equal(resumed, full[start:start + 3])


def test_batches_do_not_depend_on_the_thread_count():
    batches = [_train(augment="++", num_steps=6, num_threads=n) for n in (0, 1, 3)]
    chex.assert_trees_all_equal(batches[0], batches[1], batches[2])


def test_same_seed_same_batches_other_seed_other_batches():
    first = _train(augment="+", num_steps=3)
    chex.assert_trees_all_equal(first, _train(augment="+", num_steps=3))
    other = _train(augment="+", num_steps=3, seed=1)
    assert not np.array_equal(first[0]["label"], other[0]["label"])
    assert not np.array_equal(first[0]["image"], other[0]["image"])


def test_each_epoch_visits_every_training_example_once():
    batches = _train(global_batch_size=100, num_steps=30)  # Two epochs.
    chex.assert_shape(batches[0]["image"], (100, 8, 8, 1))
    assert batches[0]["image"].dtype == np.float32 and batches[0]["label"].dtype == np.int32
    train = sources.load_split("digits", "train", None, None)
    expected = _row_counts(_normalized(train.images))
    epochs = [batches[:15], batches[15:]]
    for epoch in epochs:
        images = np.concatenate([b["image"] for b in epoch])
        labels = np.concatenate([b["label"] for b in epoch])
        assert _row_counts(images) == expected
        np.testing.assert_array_equal(np.bincount(labels), np.bincount(train.labels))
    assert not np.array_equal(epochs[0][0]["label"], epochs[1][0]["label"])  # Reshuffled.


def test_epoch_orders_differ_between_seeds_and_epochs():
    # A per-epoch seed of seed + epoch would make seed 1's first epoch seed 0's second.
    orders = [pipeline.example_indices(np.arange(100 * e, 100 * (e + 1)), 100, s)
              for s, e in ((0, 0), (0, 1), (1, 0))]
    for order in orders:
        np.testing.assert_array_equal(np.sort(order), np.arange(100))
    assert len({o.tobytes() for o in orders}) == 3


def test_pipeline_augments_with_the_step_keyed_parameters():
    plain = _train(num_steps=2, start_step=5)
    for tier in ("+", "++"):
        augmented = _train(num_steps=2, start_step=5, augment=tier)
        for step, (p, a) in enumerate(zip(plain, augmented), start=5):
            np.testing.assert_array_equal(p["label"], a["label"])  # Same examples.
            flip, shift = augment.sample_augment_params((pipeline._AUGMENT_STREAM, 0, step), 64)
            expected = augment.apply_augment(p["image"], flip, shift, tier)
            np.testing.assert_array_equal(a["image"], expected)


def test_normalization_modes():
    for normalize, expected_std in (("mean", None), ("mean_std", 1.0)):
        batch = _train(global_batch_size=1500, num_steps=1, normalize=normalize)[0]
        np.testing.assert_allclose(batch["image"].mean(), 0.0, atol=1e-5)
        if expected_std:
            np.testing.assert_allclose(batch["image"].std(), expected_std, rtol=1e-4)
    with pytest.raises(ValueError, match="normalize"):
        _train(normalize="std")
    with pytest.raises(ValueError, match="augment='\\+\\+\\+' is invalid: it must be one of 'none'"):
        _train(augment="+++")


# ----- augmentation ----------------------------------------------------------------------

def _reference_augment(images, flip, shift, mode):
    """Per-image reference: flip, pad by 4 (zeros or reflection), crop to move content by shift."""
    out = []
    for image, f, (dy, dx) in zip(images, flip, shift):
        image = np.fliplr(image) if f else image
        padded = np.pad(image, [(4, 4), (4, 4), (0, 0)], mode=mode)
        h, w = image.shape[:2]
        out.append(padded[4 - dy:4 - dy + h, 4 - dx:4 - dx + w])
    return np.stack(out)


def test_augment_tiers_match_a_per_image_reference_exactly():
    images = np.arange(3 * 6 * 7 * 2, dtype=np.float32).reshape(3, 6, 7, 2) + 1.0
    flip = np.array([True, False, True])
    shift = np.array([[2, -3], [-4, 4], [0, 1]], np.int32)
    assert augment.apply_augment(images, flip, shift, "none") is images
    plus = augment.apply_augment(images, flip, shift, "+")
    np.testing.assert_array_equal(plus, _reference_augment(images, flip, shift, "constant"))
    assert (plus[0, :2] == 0).all() and (plus[0, :, -3:] == 0).all()  # Zero-filled border.
    assert (plus[0, 2:, :-3] != 0).all()
    reflect = augment.apply_augment(images, flip, shift, "++")
    np.testing.assert_array_equal(reflect, _reference_augment(images, flip, shift, "reflect"))
    # Reflection mirrors without repeating the edge: row -1 is row 1.
    np.testing.assert_array_equal(reflect[1, 0, 4:], reflect[1, 2, 4:])
    chex.assert_equal_shape([images, plus, reflect])


def test_augment_params_are_keyed_and_bounded():
    flip, shift = augment.sample_augment_params((3, 7), 2000)
    chex.assert_trees_all_equal((flip, shift), augment.sample_augment_params((3, 7), 2000))
    assert set(np.unique(shift)) == set(range(-4, 5))  # Every offset in [-4, 4], no other.
    assert 0.4 < np.mean(flip) < 0.6
    assert not np.array_equal(flip, augment.sample_augment_params((3, 8), 2000)[0])
    # Flipping alone really mirrors the examples where a flip was drawn.
    images = np.random.default_rng(0).normal(size=(8, 5, 5, 3)).astype(np.float32)
    flip, _ = augment.sample_augment_params((3, 7), 8)
    out = augment.apply_augment(images, flip, np.zeros((8, 2), np.int32), "+")
    assert flip.any() and not flip.all()
    for image, f, o in zip(images, flip, out):
        np.testing.assert_array_equal(o, np.fliplr(image) if f else image)


def test_translation_range_and_flips_are_configurable():
    flip, shift = augment.sample_augment_params((3, 4), 2000, max_shift=1, flip=False)
    assert not flip.any()
    assert set(np.unique(shift)) == {-1, 0, 1}
    images = np.arange(1, 17, dtype=np.float32).reshape(1, 4, 4, 1)
    out = augment.apply_augment(images, np.array([False]), np.array([[1, -1]]), "+",
                                max_shift=1)[0, ..., 0]
    np.testing.assert_array_equal(out[0], 0)  # moved down one row: zero row on top
    np.testing.assert_array_equal(out[1:, :3], images[0, :3, 1:, 0])  # and left


def test_imagenet_preprocessing():
    # A smooth image, so that resampling differences stay small.
    rows, cols = np.mgrid[0:300, 0:400]
    image = np.stack([rows * 255 // 300, cols * 255 // 400, (rows + cols) % 256], -1)
    image = image.astype(np.uint8)
    train = augment.imagenet_train_image(image, augment.generator(1, 2))
    chex.assert_shape(train, (224, 224, 3))
    np.testing.assert_array_equal(train, augment.imagenet_train_image(image,
                                                                      augment.generator(1, 2)))
    assert train.dtype == np.uint8
    crops = {augment.random_crop_box(300, 400, augment.generator(k)) for k in range(50)}
    assert len(crops) == 50
    for top, left, h, w in crops:
        assert 0 <= top <= 300 - h and 0 <= left <= 400 - w
        assert 0.08 * 120_000 * 0.9 <= h * w <= 120_000 and 0.7 < w / h < 1.4
    # Eval: resize 300x400 -> 256x341, central crop: the red channel (a function of the row)
    # runs from row 16 to row 240 of the resized image.
    evaluated = augment.imagenet_eval_image(image)
    chex.assert_shape(evaluated, (224, 224, 3))
    expected_red = (np.arange(16, 240) + 0.5) * 300 / 256 * 255 / 300
    np.testing.assert_allclose(evaluated[:, 112, 0], expected_red, atol=2.0)
    np.testing.assert_array_equal(augment.decode_image(_encode(image)), image)


# ----- evaluation and multi-host ---------------------------------------------------------

def test_eval_covers_each_example_once_with_mask():
    batches = list(pipeline.eval_batches("digits", batch_size=64))
    assert len(batches) == 5  # ceil(297 / 64)
    masks = np.concatenate([b["mask"] for b in batches])
    assert masks.dtype == bool and masks.sum() == 297 and masks[:297].all()
    test = sources.load_split("digits", "test", None, None)
    train = sources.load_split("digits", "train", None, None)
    mean, std = augment.channel_stats(train.images, "mean")  # Training statistics.
    images = np.concatenate([b["image"] for b in batches])[masks]
    np.testing.assert_array_equal(images, augment.normalize_images(test.images, mean, std))
    np.testing.assert_array_equal(np.concatenate([b["label"] for b in batches])[masks],
                                  test.labels)
    assert (batches[-1]["image"][~batches[-1]["mask"]] == 0).all()


def test_processes_together_give_the_single_process_batch():
    single = _train(augment="++", num_steps=3, start_step=20)
    parts = [_train(augment="++", num_steps=3, start_step=20, process_index=p, process_count=2)
             for p in (0, 1)]
    for step in range(3):
        chex.assert_trees_all_equal(
            single[step],
            {k: np.concatenate([parts[0][step][k], parts[1][step][k]]) for k in single[step]},
        )
    eval_single = list(pipeline.eval_batches("digits", batch_size=64))
    eval_parts = [list(pipeline.eval_batches("digits", batch_size=64, process_index=p,
                                             process_count=2)) for p in (0, 1)]
    for k, batch in enumerate(eval_single):
        chex.assert_trees_all_equal(
            batch, {key: np.concatenate([eval_parts[0][k][key], eval_parts[1][k][key]])
                    for key in batch})
    with pytest.raises(ValueError, match="divisible"):
        _train(global_batch_size=63, process_index=0, process_count=2)


# ----- local sources -----------------------------------------------------------------------

def _write_npz(file, images, labels, **extra):
    np.savez(file, images=images, labels=labels, **extra)
    return str(file)


def test_npz_source_loads_per_split_files_and_a_single_file(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(12, 5, 5), dtype=np.uint8)  # (N, H, W): grey.
    labels = np.arange(12) % 3
    _write_npz(tmp_path / "train.npz", images, labels)
    _write_npz(tmp_path / "test.npz", images[:5], labels[:5])
    info = pipeline.get_dataset_info("npz", path=str(tmp_path))
    assert (info.num_classes, info.image_shape, info.num_train_examples,
            info.num_eval_examples) == (3, (5, 5, 1), 12, 5)
    batch = next(pipeline.train_batches("npz", path=str(tmp_path), global_batch_size=12,
                                        seed=0))
    np.testing.assert_array_equal(np.sort(batch["label"]), np.sort(labels))
    single = _write_npz(tmp_path / "all.npz", images, labels, class_names=np.array(list("abcd")))
    info = pipeline.get_dataset_info("npz", path=single)
    assert info.class_names == ("a", "b", "c", "d") and info.num_eval_examples == 12


@pytest.mark.parametrize(
    "images, labels, extra, match",
    [
        (np.zeros((4, 3, 3), np.uint8), [0, 1, 5, 1], {"class_names": np.array(list("abc"))},
         r"label 5 of example 2 is out of range"),
        (np.zeros((4, 3, 3), np.uint8), [0, 1, -1, 1], {}, r"label -1 of example 2"),
        (np.zeros((4, 3, 3), np.uint8), [0, 1, 2], {}, r"4 images but 3 labels"),
        (np.zeros((0, 3, 3), np.uint8), np.zeros(0, int), {}, r"empty"),
        (np.zeros((4, 3, 3), np.float32), [0, 1, 2, 3], {}, r"must be uint8"),
    ],
)
def test_npz_bad_data_errors_name_the_file_and_index(tmp_path, images, labels, extra, match):
    file = _write_npz(tmp_path / "bad.npz", images, np.array(labels), **extra)
    with pytest.raises(sources.DataError, match=match) as error:
        sources.load_split("npz", "train", None, file)
    assert "bad.npz" in str(error.value)


def test_npz_missing_split_file_is_named(tmp_path):
    _write_npz(tmp_path / "train.npz", np.zeros((2, 3, 3), np.uint8), np.array([0, 1]))
    with pytest.raises(sources.DataError, match="test.npz"):
        pipeline.get_dataset_info("npz", path=str(tmp_path))


def _write_image(file, image, format="PNG"):
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_bytes(_encode(image, format))


def test_image_folder_source(tmp_path):
    for split, count in (("train", 3), ("test", 1)):
        for label, value in (("cat", 10), ("dog", 200)):
            for i in range(count):
                _write_image(tmp_path / split / label / f"{i}.png",
                             np.full((4, 6, 3), value + i, np.uint8))
    info = pipeline.get_dataset_info("image_folder", path=str(tmp_path))
    assert (info.class_names, info.image_shape, info.num_train_examples,
            info.num_eval_examples) == (("cat", "dog"), (4, 6, 3), 6, 2)
    test = sources.load_split("image_folder", "test", None, str(tmp_path))
    np.testing.assert_array_equal(test.labels, [0, 1])
    np.testing.assert_array_equal(test.images[:, 0, 0, 0], [10, 200])


def test_image_folder_keeps_greyscale_and_converts_palettes(tmp_path):
    grey = np.arange(20, dtype=np.uint8).reshape(4, 5, 1)
    _write_image(tmp_path / "train" / "a" / "grey.png", grey)
    np.testing.assert_array_equal(
        sources.load_split("image_folder", "train", None, str(tmp_path)).images[0], grey)
    palette = tmp_path / "p" / "train" / "a" / "palette.gif"
    palette.parent.mkdir(parents=True)
    Image.fromarray(np.full((4, 5, 3), 60, np.uint8)).convert("P").save(palette)
    images = sources.load_split("image_folder", "train", None, str(tmp_path / "p")).images
    chex.assert_shape(images, (1, 4, 5, 3))


@pytest.mark.parametrize("defect, match", [
    ("corrupt", r"broken\.png: cannot read image"),
    ("size", r"big\.png: image shape \(5, 5, 3\) differs"),
    ("empty", r"empty"),
])
def test_image_folder_bad_data_errors_name_the_file(tmp_path, defect, match):
    if defect != "empty":
        _write_image(tmp_path / "train" / "a" / "ok.png", np.zeros((4, 4, 3), np.uint8))
    if defect == "corrupt":
        (tmp_path / "train" / "b").mkdir(parents=True)
        (tmp_path / "train" / "b" / "broken.png").write_bytes(b"\x89PNG truncated")
    elif defect == "size":
        _write_image(tmp_path / "train" / "b" / "big.png", np.zeros((5, 5, 3), np.uint8))
    else:
        (tmp_path / "train" / "a").mkdir(parents=True)
    with pytest.raises(sources.DataError, match=match):
        sources.load_split("image_folder", "train", None, str(tmp_path))


# ----- TFDS datasets: preparation errors, names ----------------------------------------------

def test_missing_cifar10_fails_fast_with_the_build_command(tmp_path):
    start = time.perf_counter()
    with _no_network(), pytest.raises(sources.DatasetNotFoundError) as error:
        pipeline.train_batches("cifar10", global_batch_size=10, seed=0, data_dir=str(tmp_path))
    assert time.perf_counter() - start < 10
    message = str(error.value)
    assert "'cifar10'" in message and str(tmp_path) in message
    assert f"python -m fractal_jax.data.prepare cifar10 --data_dir {tmp_path}`" in message
    assert isinstance(error.value, ValueError)


def test_a_tfrecord_dataset_gets_the_command_that_rebuilds_it(tmp_path):
    # A prepared builder without ArrayRecord files: TFDS's default format is TFRecord.
    with mock.patch.object(tfds.core.DatasetBuilder, "is_prepared", return_value=True), \
            pytest.raises(sources.DatasetNotFoundError, match="stored as tfrecord") as error:
        pipeline.get_dataset_info("cifar10", data_dir=str(tmp_path))
    assert (f"`python -m fractal_jax.data.prepare cifar10 --data_dir {tmp_path} --rebuild`"
            in str(error.value))


def test_unknown_dataset_suggests_the_closest_name():
    with pytest.raises(ValueError, match=r"Did you mean 'cifar100'\?.*svhn_cropped"):
        pipeline.get_dataset_info("cifar_100")


# ----- TFDS datasets read by random access, from a stand-in for tfds.data_source -----------

class _Source(list):
    """A random-access source like TFDS's ArrayRecordDataSource; counts the records it reads."""

    reads = 0

    def __getitems__(self, keys):
        type(self).reads += len(keys)
        return [self[k] for k in keys]


def _tfds_builder(images, labels, num_classes):
    """A stand-in for a prepared TFDS builder: metadata and `as_data_source` over `images`."""

    def as_data_source(split, decoders=None):
        encoded = decoders is not None  # Images stay encoded (SkipDecoding).
        return _Source({"image": _encode(i, "JPEG") if encoded else i, "label": l}
                       for i, l in zip(images[split], labels[split]))

    builder = mock.Mock(as_data_source=as_data_source)
    builder.info.features = {"label": mock.Mock(names=[str(c) for c in range(num_classes)]),
                             "image": mock.Mock(shape=images["train"].shape[1:])}
    builder.info.splits = {s: mock.Mock(num_examples=len(v)) for s, v in labels.items()}
    return builder


def _fake_tfds(shape, counts, num_classes=5):
    rng = np.random.default_rng(0)
    images = {s: rng.integers(0, 256, (n, *shape), np.uint8) for s, n in counts.items()}
    labels = {s: rng.integers(0, num_classes, n) for s, n in counts.items()}
    builder = _tfds_builder(images, labels, num_classes)
    return images, labels, mock.patch.object(sources, "tfds_builder", return_value=builder)


def test_small_tfds_datasets_are_read_into_memory():
    images, labels, fake = _fake_tfds((4, 4, 3), {"train": 20, "test": 7})
    with fake:
        info = pipeline.get_dataset_info("cifar100", data_dir="unused")
        assert (info.image_shape, info.num_train_examples, info.num_classes) == ((4, 4, 3), 20, 5)
        batches = list(pipeline.eval_batches("cifar100", batch_size=8, data_dir="unused"))
    mean, std = augment.channel_stats(images["train"], "mean")
    np.testing.assert_array_equal(batches[0]["image"][:7],
                                  augment.normalize_images(images["test"], mean, std))
    np.testing.assert_array_equal(batches[0]["label"][:7], labels["test"])


def test_imagenet_reads_only_its_batches_resumes_and_pads_eval():
    _, _, fake = _fake_tfds((40, 50, 3), {"train": 13, "validation": 13})
    args = dict(global_batch_size=4, seed=1, data_dir="unused")
    with fake:
        full = list(pipeline.train_batches("imagenet2012", num_steps=5, **args))
        _Source.reads = 0
        resumed = list(pipeline.train_batches("imagenet2012", num_steps=2, start_step=3, **args))
        assert _Source.reads == 8  # Resuming reads the resumed steps' examples, nothing else.
        chex.assert_shape(full[0]["image"], (4, 224, 224, 3))
        chex.assert_trees_all_equal(resumed, full[3:])
        _Source.reads = 0
        halves = [list(pipeline.train_batches("imagenet2012", num_steps=1, process_index=p,
                                              process_count=2, **args)) for p in (0, 1)]
        assert _Source.reads == 4  # Each process read only its own 2 examples.
        chex.assert_trees_all_equal(
            {k: np.concatenate([halves[0][0][k], halves[1][0][k]]) for k in full[0]}, full[0])
        far = next(pipeline.train_batches("imagenet2012", start_step=10**9, **args))
        chex.assert_shape(far["image"], (4, 224, 224, 3))  # Late steps cost the same.
        for count in (1, 2):  # With 2 processes, process 1 gets no example of the last batch.
            masks = [np.concatenate([b["mask"] for b in pipeline.eval_batches(
                "imagenet2012", split="validation", batch_size=4, data_dir="unused",
                process_index=p, process_count=count)]) for p in range(count)]
            assert [len(m) for m in masks] == [16 // count] * count
            assert sum(m.sum() for m in masks) == 13
        with pytest.raises(ValueError, match="no labels"):
            pipeline.eval_batches("imagenet2012", batch_size=4, data_dir="unused")


def test_imagenet_calibration_is_the_eval_transform_of_the_training_images_in_order():
    """The ImageNet config's precise-BatchNorm calibration set is its first training examples in
    the run's order, preprocessed as evaluation does (resize + central crop, no randomness),
    the same at every call; its training batches keep their random crops and flips."""
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (10, 40, 50, 3), np.uint8), rng.integers(0, 5, 10)
    # "validation" holds the training images in stored order: evaluation's own pipeline then
    # gives the eval transform of each training image.
    builder = _tfds_builder({"train": images, "validation": images},
                            {"train": labels, "validation": labels}, 5)
    config = imagenet.get_config()
    assert config.data.augment == "none"  # the tier ImageNet trains with, on random crops
    config.update({"data_dir": "unused", "batch_size": 4, "num_train_steps": 1})
    config.precise_bn.update({"num_examples": 6, "batch_size": 3})
    with mock.patch.object(sources, "tfds_builder", return_value=builder):
        first = experiment.calibration_batches(config, len(images))
        second = experiment.calibration_batches(config, len(images))
        evaluated = next(pipeline.eval_batches("imagenet2012", batch_size=10, split="validation",
                                               normalize=config.data.normalize,
                                               data_dir="unused"))["image"]
        trained = next(experiment.train_batches(config, 0))["image"]
        with pytest.raises(ValueError, match="needs augment='none', got augment='\\+'"):
            pipeline.train_batches("imagenet2012", global_batch_size=4, seed=0, augment="+",
                                   eval_transform=True, data_dir="unused")
    order = pipeline.example_indices(np.arange(10), 10, config.seed)
    assert [b.shape for b in first] == [(3, 224, 224, 3)] * 2
    np.testing.assert_array_equal(np.concatenate(first), evaluated[order[:6]])
    chex.assert_trees_all_equal(first, second)
    assert not np.allclose(trained, evaluated[order[:4]], atol=0.1)  # random crops, not central


class _TinyImages(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A 3-split TFDS dataset of random 6x8 RGB images, for building real ArrayRecord files."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(6, 8, 3)),
            "label": tfds.features.ClassLabel(num_classes=3)}), disable_shuffling=True)

    def _split_generators(self, dl_manager):
        return {split: self._generate_examples(split) for split in ("train", "validation", "test")}

    def _generate_examples(self, split):
        rng = np.random.default_rng(len(split))
        for i in range(10):
            yield i, {"image": rng.integers(0, 256, (6, 8, 3), np.uint8), "label": i % 3}


@pytest.mark.slow
def test_prepare_writes_array_record_files_that_are_read_by_random_access(tmp_path):
    pytest.importorskip("tensorflow", reason="TFDS needs TensorFlow to build a dataset")
    data_dir = str(tmp_path)
    _TinyImages(data_dir=data_dir).download_and_prepare()  # TFDS's default: TFRecord files.
    stored = [e for _, e in _TinyImages(data_dir=data_dir)._generate_examples("train")]
    tiny = lambda name, data_dir, **kwargs: _TinyImages(data_dir=data_dir, **kwargs)  # noqa: E731
    with mock.patch.object(tfds, "builder", side_effect=tiny):
        for attempt in (lambda: pipeline.get_dataset_info("cifar10", data_dir=data_dir),
                        lambda: prepare.prepare("cifar10", data_dir)):
            with pytest.raises(sources.DatasetNotFoundError, match="stored as tfrecord") as error:
                attempt()
            assert f"prepare cifar10 --data_dir {data_dir} --rebuild" in str(error.value)
        prepare.main(["cifar10", "--data_dir", data_dir, "--rebuild"])
        info = pipeline.get_dataset_info("cifar10", data_dir=data_dir)
        assert (info.image_shape, info.num_train_examples, info.num_classes) == ((6, 8, 3), 10, 3)
        train = sources.load_split("cifar10", "train", data_dir, None)
        np.testing.assert_array_equal(train.images, np.stack([e["image"] for e in stored]))
        np.testing.assert_array_equal(train.labels, [e["label"] for e in stored])
        batch = next(pipeline.train_batches("imagenet2012", global_batch_size=4, seed=0,
                                            data_dir=data_dir))
    chex.assert_shape(batch["image"], (4, 224, 224, 3))
    assert set(batch["label"]) <= {0, 1, 2}
    with pytest.raises(ValueError, match="not a TFDS dataset"):
        prepare.prepare("digits", data_dir)


# ----- no TensorFlow in a training process -----------------------------------------------------

@pytest.mark.slow
def test_loading_a_config_and_training_import_no_tensorflow(tmp_path):
    script = f"""
import runpy, sys
from fractal_jax import config
from experiments.configs import digits
config.validate(digits.get_config())
assert "tensorflow" not in sys.modules, "loading a config imported TensorFlow"
sys.argv = ["main", "--config={ROOT}/tests/tiny_config.py", "--workdir={tmp_path}/run",
            "--config.num_train_steps=6"]
try:
    runpy.run_module("fractal_jax.main", run_name="__main__")
finally:
    print("TensorFlow imported:", "tensorflow" in sys.modules)
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "TensorFlow imported: False" in result.stdout
