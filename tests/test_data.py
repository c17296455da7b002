"""Tests of the input pipelines: sources, augmentation, determinism, resumption, multi-host."""
import time
from unittest import mock

import chex
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from fractal_jax.data import augment, digits, pipeline, sources


def _no_network():
    """Makes any attempt to open a network connection fail the test."""
    return mock.patch("socket.socket.connect", side_effect=AssertionError("network access"))


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
    """A data_dir with the digits dataset built in it, with the network cut off."""
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    with _no_network():
        digits.prepared_builder(data_dir)
    return data_dir


def _train(data_dir, **kwargs):
    """All batches of a short digits run, as a list."""
    args = dict(global_batch_size=64, seed=0, num_steps=30, data_dir=data_dir) | kwargs
    return list(pipeline.train_batches("digits", **args))


def _normalized(images, normalize="mean"):
    """Images normalised exactly as the pipeline does, statistics from the same images."""
    return augment.normalize_images(images, *augment.channel_stats(images, normalize)).numpy()


def _row_counts(images):
    """The multiset of images, as {bytes: count}."""
    rows, counts = np.unique(images.reshape(len(images), -1), axis=0, return_counts=True)
    return {r.tobytes(): c for r, c in zip(rows, counts)}


# ----- the digits dataset -------------------------------------------------------------

def test_digits_builds_offline_with_fixed_splits(digits_dir):
    info = pipeline.get_dataset_info("digits", data_dir=digits_dir)
    assert info == pipeline.DatasetInfo(
        "digits", 10, (8, 8, 1), 1500, 297, tuple(str(d) for d in range(10))
    )
    train = sources.load_split("digits", "train", digits_dir, None)
    assert train.images.dtype == np.uint8 and train.images.max() == 255
    assert len(np.unique(train.images.reshape(1500, -1), axis=0)) > 1000  # Real, varied images.
    assert set(train.labels) == set(range(10))
    split = digits.split_indices()
    assert not set(split["train"]) & set(split["test"])
    assert len(split["train"]) + len(split["test"]) == 1797
    start = time.perf_counter()
    assert digits.prepared_builder(digits_dir).is_prepared()  # Idempotent and quick.
    assert time.perf_counter() - start < 1.0


# ----- determinism, resumption, epochs ----------------------------------------------

@pytest.mark.parametrize("tier", ["+", "++"])
def test_resuming_at_a_step_gives_the_same_batches(digits_dir, tier):
    full = _train(digits_dir, augment=tier)
    for start in (1, 23, 24):  # Step 23 straddles the first epoch boundary (1500 / 64).
        resumed = _train(digits_dir, augment=tier, start_step=start, num_steps=3)
        chex.assert_trees_all_equal(resumed, full[start:start + 3])


def test_same_seed_same_batches_other_seed_other_batches(digits_dir):
    first = _train(digits_dir, augment="+", num_steps=3)
    chex.assert_trees_all_equal(first, _train(digits_dir, augment="+", num_steps=3))
    other = _train(digits_dir, augment="+", num_steps=3, seed=1)
    assert not np.array_equal(first[0]["label"], other[0]["label"])
    assert not np.array_equal(first[0]["image"], other[0]["image"])


def test_each_epoch_visits_every_training_example_once(digits_dir):
    batches = _train(digits_dir, global_batch_size=100, num_steps=30)  # Two epochs.
    chex.assert_shape(batches[0]["image"], (100, 8, 8, 1))
    assert batches[0]["image"].dtype == np.float32 and batches[0]["label"].dtype == np.int32
    train = sources.load_split("digits", "train", digits_dir, None)
    expected = _row_counts(_normalized(train.images))
    epochs = [batches[:15], batches[15:]]
    for epoch in epochs:
        images = np.concatenate([b["image"] for b in epoch])
        labels = np.concatenate([b["label"] for b in epoch])
        assert _row_counts(images) == expected
        np.testing.assert_array_equal(np.bincount(labels), np.bincount(train.labels))
    assert not np.array_equal(epochs[0][0]["label"], epochs[1][0]["label"])  # Reshuffled.


def test_pipeline_augments_with_the_step_seeded_parameters(digits_dir):
    plain = _train(digits_dir, num_steps=2, start_step=5)
    for tier in ("+", "++"):
        augmented = _train(digits_dir, num_steps=2, start_step=5, augment=tier)
        for step, (p, a) in enumerate(zip(plain, augmented), start=5):
            np.testing.assert_array_equal(p["label"], a["label"])  # Same examples.
            flip, shift = augment.sample_augment_params(tf.constant([0, step], tf.int64), 64)
            expected = augment.apply_augment(p["image"], flip, shift, tier)
            np.testing.assert_array_equal(a["image"], expected)


def test_normalization_modes(digits_dir):
    for normalize, expected_std in (("mean", None), ("mean_std", 1.0)):
        batch = _train(digits_dir, global_batch_size=1500, num_steps=1, normalize=normalize)[0]
        np.testing.assert_allclose(batch["image"].mean(), 0.0, atol=1e-5)
        if expected_std:
            np.testing.assert_allclose(batch["image"].std(), expected_std, rtol=1e-4)
    with pytest.raises(ValueError, match="normalize"):
        _train(digits_dir, normalize="std")
    with pytest.raises(ValueError, match="augment='\+\+\+' is invalid: it must be one of 'none'"):
        _train(digits_dir, augment="+++")


# ----- augmentation ----------------------------------------------------------------------

def _reference_augment(images, flip, shift, mode):
    """NumPy reference: flip, pad by 4 (zeros or reflection), crop to move content by shift."""
    out = []
    for image, f, (dy, dx) in zip(images, flip, shift):
        image = np.fliplr(image) if f else image
        padded = np.pad(image, [(4, 4), (4, 4), (0, 0)], mode=mode)
        h, w = image.shape[:2]
        out.append(padded[4 - dy:4 - dy + h, 4 - dx:4 - dx + w])
    return np.stack(out)


def test_augment_tiers_match_a_numpy_reference_exactly():
    images = np.arange(3 * 6 * 7 * 2, dtype=np.float32).reshape(3, 6, 7, 2) + 1.0
    flip = np.array([True, False, True])
    shift = np.array([[2, -3], [-4, 4], [0, 1]], np.int32)
    assert augment.apply_augment(images, flip, shift, "none") is images
    plus = augment.apply_augment(images, flip, shift, "+").numpy()
    np.testing.assert_array_equal(plus, _reference_augment(images, flip, shift, "constant"))
    assert (plus[0, :2] == 0).all() and (plus[0, :, -3:] == 0).all()  # Zero-filled border.
    assert (plus[0, 2:, :-3] != 0).all()
    reflect = augment.apply_augment(images, flip, shift, "++").numpy()
    np.testing.assert_array_equal(reflect, _reference_augment(images, flip, shift, "reflect"))
    # Reflection mirrors without repeating the edge: row -1 is row 1.
    np.testing.assert_array_equal(reflect[1, 0, 4:], reflect[1, 2, 4:])
    chex.assert_equal_shape([images, plus, reflect])


def test_augment_params_are_seeded_and_bounded():
    seed = tf.constant([3, 7], tf.int64)
    flip, shift = augment.sample_augment_params(seed, 2000)
    again = augment.sample_augment_params(seed, 2000)
    chex.assert_trees_all_equal((flip, shift), again)
    assert set(np.unique(shift)) == set(range(-4, 5))  # Every offset in [-4, 4], no other.
    assert 0.4 < np.mean(flip) < 0.6
    # Flipping alone really mirrors the examples where a flip was drawn.
    images = np.random.default_rng(0).normal(size=(8, 5, 5, 3)).astype(np.float32)
    flip, _ = augment.sample_augment_params(seed, 8)
    out = augment.apply_augment(images, flip, np.zeros((8, 2), np.int32), "+").numpy()
    assert flip.numpy().any() and not flip.numpy().all()
    for image, f, o in zip(images, flip.numpy(), out):
        np.testing.assert_array_equal(o, np.fliplr(image) if f else image)


def test_imagenet_preprocessing_shapes():
    image = tf.cast(tf.random.stateless_uniform([300, 400, 3], [0, 0], maxval=255), tf.uint8)
    train = augment.imagenet_train_image(image, tf.constant([1, 2], tf.int64))
    chex.assert_shape(train, (224, 224, 3))
    chex.assert_shape(augment.imagenet_eval_image(image), (224, 224, 3))
    # Eval: resize 300x400 -> 256x341, central crop; the crop's centre pixel is the image's.
    resized = tf.image.resize(image, [256, 341])
    np.testing.assert_allclose(augment.imagenet_eval_image(image), resized[16:240, 58:282])


# ----- evaluation and multi-host ---------------------------------------------------------

def test_eval_covers_each_example_once_with_mask(digits_dir):
    batches = list(pipeline.eval_batches("digits", batch_size=64, data_dir=digits_dir))
    assert len(batches) == 5  # ceil(297 / 64)
    masks = np.concatenate([b["mask"] for b in batches])
    assert masks.dtype == bool and masks.sum() == 297 and masks[:297].all()
    test = sources.load_split("digits", "test", digits_dir, None)
    train = sources.load_split("digits", "train", digits_dir, None)
    mean, std = augment.channel_stats(train.images, "mean")  # Training statistics.
    images = np.concatenate([b["image"] for b in batches])[masks]
    np.testing.assert_array_equal(images, augment.normalize_images(test.images, mean, std))
    np.testing.assert_array_equal(np.concatenate([b["label"] for b in batches])[masks],
                                  test.labels)
    assert (batches[-1]["image"][~batches[-1]["mask"]] == 0).all()


def test_processes_together_give_the_single_process_batch(digits_dir):
    single = _train(digits_dir, augment="++", num_steps=3, start_step=20)
    parts = [
        _train(digits_dir, augment="++", num_steps=3, start_step=20,
               process_index=p, process_count=2)
        for p in (0, 1)
    ]
    for step in range(3):
        chex.assert_trees_all_equal(
            single[step],
            {k: np.concatenate([parts[0][step][k], parts[1][step][k]]) for k in single[step]},
        )
    eval_single = list(pipeline.eval_batches("digits", batch_size=64, data_dir=digits_dir))
    eval_parts = [list(pipeline.eval_batches("digits", batch_size=64, data_dir=digits_dir,
                                             process_index=p, process_count=2)) for p in (0, 1)]
    for k, batch in enumerate(eval_single):
        chex.assert_trees_all_equal(
            batch, {key: np.concatenate([eval_parts[0][k][key], eval_parts[1][k][key]])
                    for key in batch})
    with pytest.raises(ValueError, match="divisible"):
        _train(digits_dir, global_batch_size=63, process_index=0, process_count=2)


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


def _write_png(file, image):
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_bytes(tf.io.encode_png(image).numpy())


def test_image_folder_source(tmp_path):
    for split, count in (("train", 3), ("test", 1)):
        for label, value in (("cat", 10), ("dog", 200)):
            for i in range(count):
                _write_png(tmp_path / split / label / f"{i}.png", np.full((4, 6, 3), value + i,
                                                                            np.uint8))
    info = pipeline.get_dataset_info("image_folder", path=str(tmp_path))
    assert (info.class_names, info.image_shape, info.num_train_examples,
            info.num_eval_examples) == (("cat", "dog"), (4, 6, 3), 6, 2)
    test = sources.load_split("image_folder", "test", None, str(tmp_path))
    np.testing.assert_array_equal(test.labels, [0, 1])
    np.testing.assert_array_equal(test.images[:, 0, 0, 0], [10, 200])


@pytest.mark.parametrize("defect, match", [
    ("corrupt", r"broken\.png: cannot read image"),
    ("size", r"big\.png: image shape \(5, 5, 3\) differs"),
    ("empty", r"empty"),
])
def test_image_folder_bad_data_errors_name_the_file(tmp_path, defect, match):
    if defect != "empty":
        _write_png(tmp_path / "train" / "a" / "ok.png", np.zeros((4, 4, 3), np.uint8))
    if defect == "corrupt":
        (tmp_path / "train" / "b").mkdir(parents=True)
        (tmp_path / "train" / "b" / "broken.png").write_bytes(b"not a png")
    elif defect == "size":
        _write_png(tmp_path / "train" / "b" / "big.png", np.zeros((5, 5, 3), np.uint8))
    else:
        (tmp_path / "train" / "a").mkdir(parents=True)
    with pytest.raises(sources.DataError, match=match):
        sources.load_split("image_folder", "train", None, str(tmp_path))


# ----- TFDS datasets that are not on disk, names -------------------------------------------

def test_missing_cifar10_fails_fast_with_instructions(tmp_path):
    start = time.perf_counter()
    with _no_network(), pytest.raises(sources.DatasetNotFoundError) as error:
        pipeline.train_batches("cifar10", global_batch_size=10, seed=0, data_dir=str(tmp_path))
    assert time.perf_counter() - start < 10
    message = str(error.value)
    assert "'cifar10'" in message and str(tmp_path) in message
    assert f"tfds build cifar10 --data_dir {tmp_path}" in message
    assert isinstance(error.value, ValueError)


def test_unknown_dataset_suggests_the_closest_name():
    with pytest.raises(ValueError, match=r"Did you mean 'cifar100'\?.*svhn_cropped"):
        pipeline.get_dataset_info("cifar_100")


# ----- streamed ImageNet, on TFDS's mock data ------------------------------------------------

def test_imagenet_stream_is_resumable_and_eval_is_padded(tmp_path):
    splits = {"validation": mock.Mock(num_examples=13, num_bytes=0)}
    with tfds.testing.mock_data(num_examples=13), \
            mock.patch.object(tfds.core.DatasetBuilder, "is_prepared", return_value=True):
        args = dict(global_batch_size=4, seed=1, data_dir=str(tmp_path))
        full = list(pipeline.train_batches("imagenet2012", num_steps=5, **args))
        resumed = list(pipeline.train_batches("imagenet2012", num_steps=2, start_step=3, **args))
        chex.assert_shape(full[0]["image"], (4, 224, 224, 3))
        chex.assert_trees_all_equal(resumed, full[3:])
        halves = [list(pipeline.train_batches("imagenet2012", num_steps=1, process_index=p,
                                              process_count=2, **args)) for p in (0, 1)]
        np.testing.assert_array_equal(
            np.concatenate([halves[0][0]["image"], halves[1][0]["image"]]), full[0]["image"])
        with mock.patch.object(tfds.core.DatasetInfo, "splits", splits):
            for count in (1, 2):  # With 2 processes, process 1 gets no example of the last batch.
                masks = [np.concatenate([b["mask"] for b in pipeline.eval_batches(
                    "imagenet2012", split="validation", batch_size=4, data_dir=str(tmp_path),
                    process_index=p, process_count=count)]) for p in range(count)]
                assert [len(m) for m in masks] == [16 // count] * count
                assert sum(m.sum() for m in masks) == 13
        with pytest.raises(ValueError, match="no labels"):
            pipeline.eval_batches("imagenet2012", batch_size=4, data_dir=str(tmp_path))


def test_translation_range_and_flips_are_configurable():
    seed = tf.constant([3, 4], tf.int64)
    flip, shift = augment.sample_augment_params(seed, 2000, max_shift=1, flip=False)
    assert not flip.numpy().any()
    assert set(np.unique(shift.numpy())) == {-1, 0, 1}
    images = tf.reshape(tf.range(1, 17, dtype=tf.float32), (1, 4, 4, 1))
    out = augment.apply_augment(images, tf.constant([False]), tf.constant([[1, -1]]), "+",
                                max_shift=1).numpy()[0, ..., 0]
    np.testing.assert_array_equal(out[0], 0)  # moved down one row: zero row on top
    np.testing.assert_array_equal(out[1:, :3], images.numpy()[0, :3, 1:, 0])  # and left
