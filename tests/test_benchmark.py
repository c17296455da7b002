"""The benchmark's machinery (its numbers are measured by running it, never asserted here)."""
import json

import pytest

from experiments import benchmark

TINY = benchmark.Setup(widths=(4, 4, 8, 8, 8), batch_size=4, steps_per_window=2, windows=2)


def test_a_train_row_reports_rates_spread_compile_time_and_memory():
    row = benchmark.bench_train(TINY, "tiny local", p_local=0.15, p_global=0.0, skip=False)
    assert row["name"] == "tiny local"
    assert 0 < row["min"] <= row["images_per_s"] <= row["max"]
    assert row["compile_s"] >= 0 and row["temp_mb"] > 0


def fake_rows(k):
    names = ["train, paper mix, skip on", "train, paper mix, skip off",
             "train, global-only, skip on", "train, global-only, skip off",
             "train, paper mix, lax.switch (one program)", f"sweep: {k} models vmapped in one step",
             f"sweep: {k} models sequentially (masked step)",
             "train, paper mix, skip on, bfloat16", "train, paper mix, skip on, remat",
             "train, local-only plans"]
    rates = dict(zip(names, [150.0, 100.0, 300.0, 100.0, 50.0, 90.0, 100.0, 75.0, 120.0, 100.0]))
    return [{"name": n, "images_per_s": r, "min": r, "max": r, "compile_s": 1.0,
             "temp_mb": 2.0 if "remat" in n else 4.0} for n, r in rates.items()]


def test_ratios_compare_the_variants_side_by_side():
    ratios = benchmark.ratios(fake_rows(4), 4)
    assert ratios["skip_speedup"] == pytest.approx(1.5)
    assert ratios["skip_speedup_even_mix"] == pytest.approx(1 / (0.5 + 0.5 / 3))
    assert ratios["global_skip_speedup"] == pytest.approx(3.0)
    assert ratios["vmap_speedup"] == pytest.approx(0.9)
    assert ratios["bfloat16_speedup"] == pytest.approx(0.5)
    assert ratios["remat_temp_memory"] == pytest.approx(0.5)


def test_markdown_has_every_row_and_ratio():
    rows = fake_rows(4)
    ratios = benchmark.ratios(rows, 4)
    text = benchmark.markdown("quick", TINY, {"platform": "cpu"}, rows, ratios,
                              {"cold_s": 3.0, "cached_s": 0.5}, [])
    for row in rows:
        assert f"| {row['name']} |" in text
    assert "| skip_speedup | 1.50 |" in text
    assert "3.0 s cold, 0.5 s from the persistent compilation cache" in text
    json.dumps(ratios)  # the last printed line is this object
