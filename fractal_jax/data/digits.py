"""scikit-learn's handwritten digits: a small, real dataset that needs no download.

scikit-learn's wheel ships 1,797 8x8 greyscale digit images (values 0..16) in
`sklearn/datasets/data/digits.csv.gz`, the file `sklearn.datasets.load_digits` reads. The
dataset exists so that the whole training stack can run end to end, and be tested, on a
machine that has never downloaded anything. It is read straight into memory (about 0.1 MB)
instead of being built into a TFDS dataset first: there is nothing to prepare (a TFDS build
needs TensorFlow and took ~7 s), and the first run starts as fast as every later one.

Splits are a fixed, seeded permutation of the examples: 297 for `test`, the remaining
1,500 for `train`. Examples keep their scikit-learn order within a split.
"""
from __future__ import annotations

import importlib.util
import pathlib

import numpy as np

NUM_TEST = 297
CLASS_NAMES = tuple(str(d) for d in range(10))
SPLITS = ("train", "test")
_SPLIT_SEED = 0  # Changing it changes the splits, and with them every digits result.


def split_indices() -> dict[str, np.ndarray]:
    """Returns the sorted scikit-learn example indices of each split, {"train", "test"}.

    A fixed-seed permutation keeps the splits identical on every machine.
    """
    perm = np.random.default_rng(_SPLIT_SEED).permutation(1797)
    return {"train": np.sort(perm[NUM_TEST:]), "test": np.sort(perm[:NUM_TEST])}


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Returns digits images (N, 8, 8) with values 0..16 as uint8 (N, 8, 8, 1) in 0..255."""
    return np.round(images.astype(np.float64) * 255.0 / 16.0).astype(np.uint8)[..., None]


def load(split: str) -> tuple[np.ndarray, np.ndarray]:
    """Returns `split` ("train" or "test") as images uint8 (N, 8, 8, 1) and labels int32 (N,)."""
    if split not in SPLITS:
        raise ValueError(f"The digits dataset has splits {SPLITS}, not {split!r}.")
    data = np.loadtxt(_csv_file(), delimiter=",")  # One row per image: 64 pixels, then the label.
    rows = data[split_indices()[split]]
    return to_uint8(rows[:, :64].reshape(-1, 8, 8)), rows[:, 64].astype(np.int32)


def _csv_file() -> pathlib.Path:
    """Returns scikit-learn's digits file, found without importing scikit-learn (~2.5 s)."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("The digits dataset is read from scikit-learn's files; "
                                  "pip install -r requirements.txt.")
    return pathlib.Path(spec.submodule_search_locations[0], "datasets", "data", "digits.csv.gz")
