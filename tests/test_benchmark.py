"""The benchmark's machinery (its numbers are measured by running it, never asserted here)."""
import json

import pytest

from experiments import benchmark

TINY = benchmark.Setup(widths=(4, 4, 8, 8, 8), batch_size=4, steps_per_window=2, windows=2)


def test_train_rows_are_timed_in_interleaved_rounds_with_flops():
    order = []
    variants = [benchmark.Variant(name, lambda name=name: order.append(name), 8, {})
                for name in ("a", "b")]
    rows = benchmark.measure(variants, TINY)
    assert order == ["a", "b"] * (1 + TINY.windows)  # a warm-up, then A B per round
    assert [len(r["rates"]) for r in rows] == [TINY.windows] * 2

    row, = benchmark.measure([benchmark.train_variant(
        TINY, "tiny local", p_local=0.15, p_global=0.0, skip=False)], TINY)
    assert row["name"] == "tiny local"
    assert 0 < row["min"] <= row["images_per_s"] <= row["max"]
    assert row["compile_s"] >= 0 and row["temp_mb"] > 0
    assert all(g > 0 for g in row["gflops_per_s"])


def test_a_window_may_count_only_part_of_its_time():
    row, = benchmark.measure([benchmark.Variant("loop", lambda: 0.5, 10, {})], TINY)
    assert row["rates"] == [20.0] * TINY.windows


def fake_rows(k, rounds=3):
    mix = "train, paper mix, skip on"
    rates = {mix: 150.0, "train, paper mix, skip off": 100.0,
             "train, global-only, skip on": 300.0, "train, global-only, skip off": 100.0,
             f"{mix}, current code": 75.0, "train, full network (no drop-path)": 120.0,
             "train, full network (no drop-path), current code": 60.0,
             f"sweep: {k} models vmapped in one step": 90.0,
             f"sweep: {k} models sequentially (masked step)": 100.0,
             "train, local-only plans": 100.0,
             benchmark.LOOP: 90.0, benchmark.ISOLATED.format(3, 4): 100.0}
    rows = []
    for n, r in rates.items():
        # Round 2 runs under twice the load: every rate halves, the ratios do not move.
        row = {"name": n, "images_per_s": r, "min": r / 2, "max": r, "compile_s": 1.0,
               "rates": [r, r / 2, r][:rounds], "temp_mb": 4.0}
        if n == mix:
            row["gflops_per_s"] = [10.0, 5.0, 10.0][:rounds]
        rows.append(row)
    rows.append({"name": benchmark.MATMUL, "images_per_s": 0.0, "min": 0.0, "max": 0.0,
                 "rates": [0.0] * rounds, "gflops_per_s": [100.0, 50.0, 100.0][:rounds],
                 "compile_s": 0.1, "temp_mb": None})
    return rows


def test_ratios_are_medians_of_per_round_ratios():
    ratios, spread = benchmark.ratios(fake_rows(4), TINY)
    assert ratios["skip_speedup"] == pytest.approx(1.5)
    assert spread["skip_speedup"] == pytest.approx((1.5, 1.5))
    assert ratios["skip_speedup_even_mix"] == pytest.approx(1 / (0.5 + 0.5 / 3))
    assert ratios["global_skip_speedup"] == pytest.approx(3.0)
    assert ratios["paper_mix_speedup"] == pytest.approx(2.0)
    assert ratios["full_speedup"] == pytest.approx(2.0)
    assert ratios["matmul_fraction"] == pytest.approx(0.1)
    assert ratios["loop_fraction"] == pytest.approx(0.9)
    assert ratios["vmap_speedup"] == pytest.approx(0.9)
    assert "eval_speedup" not in ratios  # its rows were not measured


def test_markdown_has_every_row_ratio_and_matmul_share():
    rows = fake_rows(4)
    ratios, spread = benchmark.ratios(rows, TINY)
    local = {"dead": 0.15, "programs": {1: 0.01, 8: 0.05}}
    kernels = [{"name": "conv 2×2, 128→128", "xla ms": 6.0, "patches ms": 1.0, "speedup": 6.0,
                "gflops_per_s": 10.0}]
    profile = [{"name": "full network", "ms_per_step": {"convolution": 30.0, "batchnorm": 10.0}}]
    text = benchmark.markdown("quick", TINY, {"platform": "cpu"}, rows, ratios, spread,
                              {"cold_s": 3.0, "cached_s": 0.5}, [], profile, local, kernels)
    for row in rows:
        assert f"| {row['name']} |" in text
    assert "| skip_speedup | 1.50 | 1.50..1.50 |" in text
    assert "| train, paper mix, skip on | 150.0 | 75.0..150.0 | 10 |" in text
    assert "| convolution | 30.0 (75%) |" in text
    assert "| FLOPs skipped | 1.0% | 5.0% |" in text
    assert "| conv 2×2, 128→128 | 6.00 | 1.00 | 6.00 | 10 |" in text
    assert "3.0 s cold, 0.5 s from the persistent compilation cache" in text
    json.dumps(ratios)  # the last printed line is this object


def test_kernel_shapes_are_the_networks_convolutions():
    assert benchmark.kernel_shapes(benchmark.QUICK) == [
        (32, 3, 16), (32, 16, 16), (16, 16, 32), (16, 32, 32), (8, 32, 64), (8, 64, 64),
        (4, 64, 128), (4, 128, 128), (2, 128, 128)]


def test_profile_categories_follow_the_ops_jax_names():
    hlo = """HloModule m

ENTRY %main {
  %wrapped_iota = s32[4]{0} fusion(), kind=kLoop
  %rw = f32[4]{0} fusion(%wrapped_iota), metadata={op_name="jit(f)/block_0/reduce_window_max"}
  %c = f32[4]{0} convolution(%rw), metadata={op_name="jit(f)/block_0/unit_c1_p1/Conv_0/dot_general"}
  %bn = f32[4]{0} fusion(%c), metadata={op_name="jit(f)/block_0/unit_c1_p1/BatchNorm_0/mul"}
  %j = f32[4]{0} fusion(%bn), metadata={op_name="jit(f)/block_0/mul"}
}
"""
    ops = benchmark._hlo_ops(hlo)
    assert {n: benchmark._category(n, ops) for n in ops} == {
        "wrapped_iota": "max-pool", "rw": "max-pool", "c": "convolution", "bn": "batchnorm",
        "j": "joins"}


def test_sections_other_commands_write_are_replaced_in_place_or_appended():
    text = "# B\n\nrows\n\n## Multi-process\n\nold\n\n## GPU\n\ngpu table\n"
    new = benchmark._replace_section(text, benchmark.MULTIHOST_SECTION, "## Multi-process\n\nnew\n")
    assert new == "# B\n\nrows\n\n## Multi-process\n\nnew\n\n## GPU\n\ngpu table\n"
    assert benchmark._replace_section("# B\n", benchmark.GPU_SECTION, "## GPU\n\nx\n") == \
        "# B\n\n## GPU\n\nx\n"
