"""Where examples come from: TFDS datasets (ArrayRecord), digits, an image folder, `.npz` files.

Small datasets (everything but ImageNet) are loaded whole into memory as uint8 arrays,
once per process, so that the training pipeline can index them at random. ImageNet is
read by random access from its ArrayRecord files, one example at a time. Every loader
checks its data and raises `DataError` naming the file or example index at fault, and a
TFDS dataset that is not on disk in ArrayRecord format raises `DatasetNotFoundError`
with the command that prepares it (`prepare.py`): nothing here downloads or imports
TensorFlow.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import pathlib
import zipfile
from collections.abc import Sequence

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from fractal_jax.config import DATASETS, IN_MEMORY_TFDS, RANDOM_ACCESS_TFDS
from fractal_jax.data import digits

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif")


class DatasetNotFoundError(ValueError):
    """A TFDS dataset is not prepared, in ArrayRecord format, in the data directory."""


class DataError(ValueError):
    """The data on disk is malformed: the message names the file or example at fault."""


@dataclasses.dataclass(frozen=True, eq=False)
class ArraySplit:
    """One split held in memory: images (N, H, W, C) uint8 and labels (N,) int32."""

    images: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...]


def check_dataset_name(dataset: str) -> None:
    """Raises ValueError for an unknown dataset name, listing the valid ones."""
    if dataset in DATASETS:
        return
    close = difflib.get_close_matches(dataset, DATASETS, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"Unknown dataset {dataset!r}.{hint} Valid names: {', '.join(DATASETS)}.")


def tfds_builder(name: str, data_dir: str | None) -> tfds.core.DatasetBuilder:
    """Returns the TFDS builder of `name`, prepared in ArrayRecord format in `data_dir`.

    Raises DatasetNotFoundError, instead of downloading, when the data is not on disk or is
    stored only as TFRecord files (which need TensorFlow and cannot be read by random access);
    the message gives the one command that fixes it.
    """
    builder = tfds.builder(name, data_dir=data_dir)
    root = pathlib.Path(builder.data_dir).parents[1]  # Files are in ROOT/NAME/VERSION.
    if not builder.is_prepared():
        manual = (
            f" ImageNet's build also needs the ILSVRC2012 tar files in {root}/downloads/manual."
            if name == "imagenet2012"
            else ""
        )
        raise DatasetNotFoundError(
            f"Dataset {name!r} is not prepared in data_dir {root} (looked for "
            f"{builder.data_dir}), and training never downloads. Prepare it once, on a machine "
            f"with internet access and TensorFlow (pip install -r requirements-prepare.txt), "
            f"with `{prepare_command(name, root)}`, copy that directory here if needed, and "
            f"pass data_dir=<that directory>.{manual}"
        )
    formats = builder.info.available_file_formats()
    if tfds.core.FileFormat.ARRAY_RECORD not in formats:
        raise DatasetNotFoundError(
            f"Dataset {name!r} in {builder.data_dir} is stored as "
            f"{', '.join(sorted(f.value for f in formats))} files, which cannot be read by "
            f"random access. Rebuild it once as ArrayRecord files, reusing its downloads, with "
            f"TensorFlow installed (pip install -r requirements-prepare.txt): "
            f"`{prepare_command(name, root)} --rebuild`."
        )
    return builder


def prepare_command(name: str, root: pathlib.Path | str) -> str:
    """Returns the command that prepares TFDS dataset `name` in data_dir `root` (`prepare.py`)."""
    return f"python -m fractal_jax.data.prepare {name} --data_dir {root}"


def tfds_class_names(builder: tfds.core.DatasetBuilder) -> tuple[str, ...]:
    """Returns the label names of a TFDS classification dataset."""
    return tuple(builder.info.features["label"].names)


def encoded_image_source(builder: tfds.core.DatasetBuilder, split: str) -> Sequence[dict]:
    """Returns `split` as a random-access sequence of {"image": encoded bytes, "label": int}.

    Images stay encoded so that a reader decodes only the examples it uses.
    """
    return builder.as_data_source(split=split, decoders={"image": tfds.decode.SkipDecoding()})


@functools.lru_cache(maxsize=16)
def load_split(dataset: str, split: str, data_dir: str | None, path: str | None) -> ArraySplit:
    """Returns `split` of an in-memory dataset, loaded and checked once per process.

    `data_dir` locates TFDS datasets; `path` locates "image_folder" and "npz" data.
    The arrays are read-only because the cached copy is shared by every caller.
    """
    check_dataset_name(dataset)
    if dataset in RANDOM_ACCESS_TFDS:
        raise ValueError(f"{dataset!r} is too large to hold in memory; it is read by random "
                         "access instead.")
    if dataset == "digits":
        images, labels = digits.load(split)
        loaded = ArraySplit(images, labels, digits.CLASS_NAMES)
    elif dataset in IN_MEMORY_TFDS:
        loaded = _load_tfds(dataset, split, data_dir)
    elif dataset == "image_folder":
        loaded = _load_image_folder(_require_path(dataset, path), split)
    else:
        loaded = _load_npz(_require_path(dataset, path), split)
    loaded.images.setflags(write=False)
    loaded.labels.setflags(write=False)
    return loaded


def _require_path(dataset: str, path: str | None) -> pathlib.Path:
    if path is None:
        raise ValueError(f"Dataset {dataset!r} needs path=... (where its files are).")
    return pathlib.Path(path)


def _load_tfds(name: str, split: str, data_dir: str | None) -> ArraySplit:
    builder = tfds_builder(name, data_dir)
    source = builder.as_data_source(split=split)
    examples = source.__getitems__(range(len(source)))
    return ArraySplit(
        images=np.stack([e["image"] for e in examples]),
        labels=np.array([e["label"] for e in examples], np.int32),
        class_names=tfds_class_names(builder),
    )


def _check_examples(images: np.ndarray, labels: np.ndarray, num_classes: int, source: str) -> None:
    """Raises DataError if the images and labels of `source` cannot form a split."""
    if len(images) != len(labels):
        raise DataError(f"{source}: {len(images)} images but {len(labels)} labels.")
    if len(labels) == 0:
        raise DataError(f"{source}: the split is empty.")
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if bad.size:
        i = int(bad[0])
        raise DataError(f"{source}: label {int(labels[i])} of example {i} is out of range "
                        f"(expected 0..{num_classes - 1}).")


def _load_image_folder(root: pathlib.Path, split: str) -> ArraySplit:
    """Loads ROOT/split/LABEL/*.{png,jpg,...}.

    The classes are the sorted names of all LABEL folders found under every split folder
    of ROOT, so a class index means the same in every split even if a split lacks a class.
    All images must have the same height, width and number of channels.
    """
    split_dir = root / split
    if not split_dir.is_dir():
        raise DataError(f"Image folder split {split!r} not found: {split_dir} is not a directory.")
    class_names = tuple(sorted({d.name for s in root.iterdir() if s.is_dir()
                                for d in s.iterdir() if d.is_dir()}))
    files = [
        (f, label)
        for label, name in enumerate(class_names)
        if (split_dir / name).is_dir()
        for f in sorted((split_dir / name).iterdir())
        if f.suffix.lower() in IMAGE_SUFFIXES
    ]
    if not files:
        raise DataError(f"{split_dir}: the split is empty (no {'/'.join(IMAGE_SUFFIXES)} files "
                        "in its label folders).")
    images = [_decode_image(f) for f, _ in files]
    for (f, _), image in zip(files, images):
        if image.shape != images[0].shape:
            raise DataError(f"{f}: image shape {image.shape} differs from {images[0].shape} "
                            f"of {files[0][0]}; all images must have the same size.")
    labels = np.array([label for _, label in files], np.int32)
    return ArraySplit(np.stack(images), labels, class_names)


def _decode_image(file: pathlib.Path) -> np.ndarray:
    """Returns the image in `file` as uint8 (H, W, C), or raises DataError naming the file.

    Greyscale stays one channel and RGBA four; any other mode (palette, 16-bit, CMYK...)
    becomes RGB, as TensorFlow's decoder did.
    """
    try:
        with Image.open(file) as image:
            if image.mode not in ("L", "RGB", "RGBA"):
                image = image.convert("RGBA" if "A" in image.getbands() else "RGB")
            array = np.asarray(image)
    except (OSError, SyntaxError, ValueError) as e:  # PIL's errors for unreadable files.
        raise DataError(f"{file}: cannot read image ({e}).") from None
    return array[..., None] if array.ndim == 2 else array


def _load_npz(path: pathlib.Path, split: str) -> ArraySplit:
    """Loads an .npz with `images` (N, H, W[, C]) uint8, `labels` (N,) ints, optional `class_names`.

    `path` is either a directory holding one file per split, PATH/SPLIT.npz, or a single
    .npz file that then serves every split (handy for smoke tests; train == eval).
    Without `class_names`, the classes are 0..max label over all the splits' files.
    """
    file = path / f"{split}.npz" if path.is_dir() else path
    arrays = _read_npz(file, ("images", "labels"))
    images, labels = arrays["images"], arrays["labels"]
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.dtype != np.uint8:
        raise DataError(f"{file}: `images` must be uint8 (N, H, W) or (N, H, W, C), "
                        f"got {images.dtype} {images.shape}.")
    if "class_names" in arrays:
        names = tuple(str(n) for n in arrays["class_names"])
    else:
        files = sorted(path.glob("*.npz")) if path.is_dir() else [path]
        num_classes = 1 + max(int(np.max(_read_npz(f, ("labels",))["labels"], initial=-1))
                              for f in files)
        names = tuple(str(c) for c in range(num_classes))
    _check_examples(images, labels, len(names), str(file))
    return ArraySplit(images, labels.astype(np.int32), names)


def _read_npz(file: pathlib.Path, keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Returns the arrays `keys` (required) and `class_names` (if present) stored in `file`."""
    if not file.is_file():
        raise DataError(f"{file}: no such .npz file.")
    try:
        with np.load(file, allow_pickle=False) as data:
            arrays = {k: data[k] for k in (*keys, "class_names") if k in data.files}
            stored = data.files
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise DataError(f"{file}: cannot read .npz ({e}).") from None
    missing = sorted(set(keys) - set(arrays))
    if missing:
        raise DataError(f"{file}: missing array(s) {missing}; it has {stored}.")
    labels = arrays.get("labels")
    if labels is not None and (labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer)):
        raise DataError(f"{file}: `labels` must be a 1-D integer array, "
                        f"got {labels.dtype} {labels.shape}.")
    return arrays
