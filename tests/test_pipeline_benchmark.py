"""The pipeline benchmark's machinery (its numbers are measured by running it, never asserted)."""

from experiments import pipeline_benchmark as bench
from fractal_jax.data import augment

def test_generated_jpegs_decode_to_photo_sized_images(tmp_path):
    source = bench.FolderSource(bench.write_jpegs(tmp_path, 3, size=(50, 40)))
    records = source.__getitems__([2, 0])
    assert [r["label"] for r in records] == [2, 0]
    assert augment.decode_image(records[0]["image"]).shape == (40, 50, 3)


def test_rows_report_a_rate_per_thread_count(tmp_path):
    rows = bench.cifar_rows(tmp_path, steps=2, examples=300)
    assert [r["threads"] for r in rows] == bench.thread_counts() * 2
    assert all(r["images_per_s"] > 0 for r in rows)
    assert sum(r["default"] for r in rows) == 2  # One default thread count per tier.
    table = bench.markdown(rows)
    assert table.count("\n") == len(rows) + 1 and "(default)" in table


def test_thread_counts_end_at_the_core_count(monkeypatch):
    monkeypatch.setattr(bench.os, "cpu_count", lambda: 6)
    assert bench.thread_counts() == [1, 2, 4, 6]
