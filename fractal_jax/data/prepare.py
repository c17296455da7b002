"""Prepares TFDS datasets once, in the ArrayRecord format that the input pipelines read.

    python -m fractal_jax.data.prepare cifar10 [cifar100 ...] --data_dir DIR [--rebuild]

Needs TensorFlow (`pip install -r requirements-prepare.txt`): TFDS's builders use it to write
a dataset, while training only reads one and never imports it. Downloads what the dataset
needs (ImageNet's tar files must already be in DIR/downloads/manual). This stands in for
`tfds build NAME --file_format=array_record`: TFDS 4.9.10's command line does not start
without Apache Beam, whose requirements conflict with this project's pinned versions.
`--rebuild` replaces a dataset prepared earlier as TFRecord files, reusing its downloads.
"""
from __future__ import annotations

import argparse
import shutil

import tensorflow_datasets as tfds

from fractal_jax.config import TFDS
from fractal_jax.data import sources


def prepare(name: str, data_dir: str | None, *, rebuild: bool = False) -> str:
    """Builds TFDS dataset `name` as ArrayRecord files in `data_dir`; returns their directory.

    Does nothing if it is already prepared so. A dataset prepared only as TFRecord files is
    rebuilt if `rebuild`, else refused with DatasetNotFoundError.
    """
    if name not in TFDS:
        sources.check_dataset_name(name)
        raise ValueError(f"{name!r} is not a TFDS dataset: there is nothing to prepare.")
    builder = tfds.builder(name, data_dir=data_dir)
    formats = builder.info.available_file_formats() if builder.is_prepared() else set()
    if rebuild and formats and tfds.core.FileFormat.ARRAY_RECORD not in formats:
        # TFDS cannot add a format to a prepared dataset: its version folder goes, while the
        # downloaded files (DATA_DIR/downloads) stay and are reused.
        shutil.rmtree(builder.data_dir)
        builder = tfds.builder(name, data_dir=data_dir)
    builder.download_and_prepare(file_format="array_record")
    return str(sources.tfds_builder(name, data_dir).data_dir)  # Checks what the pipeline needs.


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="+", metavar="NAME", choices=TFDS,
                        help=f"TFDS datasets: {', '.join(TFDS)}")
    parser.add_argument("--data_dir", default=None, help="TFDS data_dir (default: TFDS's)")
    parser.add_argument("--rebuild", action="store_true",
                        help="replace a dataset prepared as TFRecord files")
    args = parser.parse_args(argv)
    for name in args.names:
        print(f"{name}: ArrayRecord files in {prepare(name, args.data_dir, rebuild=args.rebuild)}")


if __name__ == "__main__":
    main()
