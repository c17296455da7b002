"""TFDS builder for scikit-learn's handwritten digits: a small, real, offline dataset.

`sklearn.datasets.load_digits` reads 1,797 8x8 greyscale digit images (values 0..16)
that ship inside the scikit-learn wheel, so this dataset builds without any network
access. It exists so that the whole training stack can run end to end, and be tested,
on a machine that has never downloaded anything.

Splits are a fixed, seeded permutation of the examples: 297 for `test`, the remaining
1,500 for `train`. Examples keep their scikit-learn order within a split.
"""
from __future__ import annotations

import contextlib
import fcntl
import pathlib
from collections.abc import Iterator

import numpy as np
import tensorflow_datasets as tfds

NUM_TEST = 297
_SPLIT_SEED = 0  # Changing it changes the splits: bump VERSION if you do.


def split_indices() -> dict[str, np.ndarray]:
    """Returns the sorted scikit-learn example indices of each split, {"train", "test"}.

    A fixed-seed permutation keeps the splits identical on every machine.
    """
    perm = np.random.default_rng(_SPLIT_SEED).permutation(1797)
    return {"train": np.sort(perm[NUM_TEST:]), "test": np.sort(perm[:NUM_TEST])}


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Returns digits images (N, 8, 8) with values 0..16 as uint8 (N, 8, 8, 1) in 0..255."""
    return np.round(images.astype(np.float64) * 255.0 / 16.0).astype(np.uint8)[..., None]


class Digits(tfds.core.GeneratorBasedBuilder):
    """scikit-learn's 8x8 handwritten digits (UCI optdigits test set), 10 classes."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Fixed 1,500 / 297 train / test split (seed 0)."}

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="8x8 handwritten digits shipped with scikit-learn, rescaled to 0..255.",
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(8, 8, 1)),
                "label": tfds.features.ClassLabel(names=[str(d) for d in range(10)]),
            }),
            supervised_keys=("image", "label"),
            homepage="https://archive.ics.uci.edu/dataset/80",
            # Keep scikit-learn order so the on-disk order is easy to reason about.
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict:
        del dl_manager  # Nothing to download: the data is inside scikit-learn.
        from sklearn.datasets import load_digits  # Deferred: only needed to build.

        data = load_digits()
        images, labels = to_uint8(data.images), data.target
        return {
            name: self._generate_examples(images[idx], labels[idx], idx)
            for name, idx in split_indices().items()
        }

    def _generate_examples(
        self, images: np.ndarray, labels: np.ndarray, keys: np.ndarray
    ) -> Iterator[tuple[int, dict]]:
        for key, image, label in zip(keys, images, labels):
            yield int(key), {"image": image, "label": int(label)}


def data_dir_root(builder: tfds.core.DatasetBuilder) -> pathlib.Path:
    """Returns the data_dir a builder reads from (its files are in ROOT/NAME/VERSION)."""
    return pathlib.Path(builder.data_dir).parents[1]


@contextlib.contextmanager
def _exclusive(lock_path: pathlib.Path) -> Iterator[None]:
    """Holds an exclusive file lock, so concurrent processes don't build the same files."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def prepared_builder(data_dir: str | None = None) -> Digits:
    """Returns the digits builder for `data_dir` (TFDS default if None), building it if needed.

    Building takes about a second and needs no network; it is done once per data_dir and is
    safe when several processes (e.g. the hosts of a multi-host run) call it at once.
    """
    builder = Digits(data_dir=data_dir)
    if builder.is_prepared():
        return builder
    with _exclusive(data_dir_root(builder) / ".digits.lock"):
        builder = Digits(data_dir=data_dir)  # Another process may have built it meanwhile.
        if not builder.is_prepared():
            builder.download_and_prepare()
    return builder
