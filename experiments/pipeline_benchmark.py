"""Input-pipeline throughput: the images/s the grain pipelines deliver, to set beside the train
step's images/s (experiments/benchmark.py), so that the input pipeline is never the bottleneck.

    python experiments/pipeline_benchmark.py [--steps 40] [--out DIR]

Rows: CIFAR-shaped (32×32×3) in-memory data with the "+" and "++" augmentation tiers, batch 128;
and ImageNet-style training batches (JPEG decode, random-resized crop to 224, flip), batch 64, from
a small folder of generated 500×375 JPEGs. Each row at 1, 2, ... cpu_count grain threads; "default"
marks `pipeline.default_num_threads`. Writes OUT/pipeline_benchmark.json, prints a Markdown table.
"""
import os
import sys

# Run as a script: make the repository importable without installing it.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Iterator  # noqa: E402

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from fractal_jax.data import pipeline  # noqa: E402

CIFAR_EXAMPLES = 10_000
JPEG_EXAMPLES = 256
JPEG_SIZE = (500, 375)  # (width, height): ImageNet's most common size.


class FolderSource:
    """A random-access source of {"image": JPEG bytes, "label": int} over the files of a folder."""

    def __init__(self, files: list[pathlib.Path]):
        self.files = files

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict:
        return {"image": self.files[index].read_bytes(), "label": index % 10}

    def __getitems__(self, indices: list[int]) -> list[dict]:
        return [self[i] for i in indices]


def write_jpegs(root: pathlib.Path, count: int, size: tuple[int, int] = JPEG_SIZE
                ) -> list[pathlib.Path]:
    """Writes `count` photo-like JPEGs (smooth gradients plus noise, quality 90) under `root`."""
    rng = np.random.default_rng(0)
    width, height = size
    rows, cols = np.mgrid[0:height, 0:width]
    files = []
    for i in range(count):
        base = np.stack([rows * 255 // height, cols * 255 // width, (rows + cols + 7 * i) % 256],
                        axis=-1)
        image = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, "JPEG", quality=90)
        files.append(root / f"{i:05d}.jpg")
        files[-1].write_bytes(buffer.getvalue())
    return files


def images_per_second(batches: Iterator[dict], steps: int) -> float:
    """Images/s of `steps` batches after two untimed ones (start-up and the first prefetch)."""
    for _ in range(2):
        next(batches)
    start = time.perf_counter()
    images = sum(len(next(batches)["label"]) for _ in range(steps))
    return images / (time.perf_counter() - start)


def thread_counts() -> list[int]:
    """1, 2, 4, ... up to and including this machine's core count."""
    cores = os.cpu_count() or 1
    return sorted({min(2**k, cores) for k in range(cores.bit_length() + 1)})


def cifar_rows(root: pathlib.Path, steps: int, examples: int = CIFAR_EXAMPLES) -> list[dict]:
    """Rows for CIFAR-shaped npz data, augmentation "+" and "++", batch 128."""
    rng = np.random.default_rng(0)
    np.savez(root / "cifar.npz", images=rng.integers(0, 256, (examples, 32, 32, 3), np.uint8),
             labels=np.arange(examples) % 10)
    rows = []
    for tier in ("+", "++"):
        for threads in thread_counts():
            batches = pipeline.train_batches("npz", path=str(root / "cifar.npz"), augment=tier,
                                             global_batch_size=128, seed=0, num_threads=threads)
            rows.append(_row(f"CIFAR 32x32, augment {tier!r}, batch 128", threads,
                             pipeline.default_num_threads("npz"),
                             images_per_second(batches, steps)))
    return rows


def jpeg_rows(root: pathlib.Path, steps: int, examples: int = JPEG_EXAMPLES) -> list[dict]:
    """Rows for ImageNet-style training batches from generated JPEGs, batch 64."""
    source = FolderSource(write_jpegs(root, examples))
    rows = []
    for threads in thread_counts():
        batches = pipeline.encoded_image_train_batches(source, global_batch_size=64, seed=0,
                                                       num_threads=threads)
        rows.append(_row("ImageNet-style JPEG 500x375 -> crop 224, batch 64", threads,
                         pipeline.default_num_threads("imagenet2012"),
                         images_per_second(batches, steps)))
    return rows


def _row(name: str, threads: int, default: int, rate: float) -> dict:
    row = {"name": name, "threads": threads, "default": threads == default, "images_per_s": rate}
    print(f"{name}, {threads} threads: {rate:,.0f} images/s", file=sys.stderr, flush=True)
    return row


def markdown(rows: list[dict]) -> str:
    lines = ["| pipeline | grain threads | images/s |", "|---|---:|---:|"]
    for r in rows:
        threads = f"{r['threads']} (default)" if r["default"] else str(r["threads"])
        lines.append(f"| {r['name']} | {threads} | {r['images_per_s']:,.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40, help="timed batches per row")
    parser.add_argument("--out", default=".", help="directory for pipeline_benchmark.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = cifar_rows(pathlib.Path(tmp), args.steps) + jpeg_rows(pathlib.Path(tmp), args.steps)
    result = {"cpu_count": os.cpu_count(), "rows": rows}
    pathlib.Path(args.out, "pipeline_benchmark.json").write_text(json.dumps(result, indent=1))
    print(markdown(rows))


if __name__ == "__main__":
    main()
