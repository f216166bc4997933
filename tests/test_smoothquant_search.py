"""Per-layer SmoothQuant alpha search: the INT8 error model against integer arithmetic, the row reservoir, the search."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from edgepack.errors import BadInputError
from edgepack.quantization.quantize import QuantizeOptions, quantize_static
from edgepack.quantization.recipes import plan_quantization
from edgepack.quantization.smoothquant import (
    ALPHA_GRID,
    ChannelStats,
    collect_channel_stats,
    int8_output_error,
    search_alphas,
    smoothing_scales,
)
from tests.test_quant_recipes import _encoder_block, _x


def _integer_reference(rows, low, high, weight, scale):
    """Plain integer arithmetic: uint8 x int8 products, and the AVX2 pairwise int16-saturating sum along C."""
    lo, hi = min(0.0, float((low / scale).min())), max(0.0, float((high / scale).max()))
    step = (hi - lo) / 255.0
    zero = int(np.round(-lo / step))
    xq = np.clip(np.round(rows / scale / step) + zero, 0, 255).astype(np.int64)     # (R, C)
    w = weight * scale[:, None]
    wstep = np.abs(w).max(axis=0) / 127.5
    wq = np.clip(np.round(w / wstep), -128, 127).astype(np.int64)                     # (C, N)
    pairs = xq[:, 0::2, None] * wq[None, 0::2] + xq[:, 1::2, None] * wq[None, 1::2]   # (R, C/2, N)
    zero_term = zero * wq.sum(axis=0)                                                 # (N,)
    exact = (pairs.sum(axis=1) - zero_term) * step * wstep
    saturated = (np.clip(pairs, -32768, 32767).sum(axis=1) - zero_term) * step * wstep
    reference = rows @ weight
    norm = np.sum(reference**2)
    return np.sum((exact - reference) ** 2) / norm, np.sum((saturated - reference) ** 2) / norm


@pytest.mark.parametrize("alpha", [None, 0.5, 0.95])
def test_int8_error_model_equals_integer_arithmetic(alpha):
    rng = np.random.default_rng(3)
    rows = rng.normal(size=(64, 16)).astype(np.float32)
    rows[:, 5] *= 30.0  # an outlier channel: heavy smoothing pushes it into the weights, where pairs saturate
    weight = rng.normal(size=(16, 12)).astype(np.float32)
    low, high = rows.min(axis=0), rows.max(axis=0)
    scale = (np.ones(16, np.float32) if alpha is None
             else smoothing_scales(np.abs(rows).max(axis=0), np.abs(weight).max(axis=1), alpha=alpha))
    exact, saturated = int8_output_error(rows, low, high, weight, None if alpha is None else scale)
    want_exact, want_saturated = _integer_reference(rows, low, high, weight, scale)
    assert exact == pytest.approx(want_exact, rel=1e-4)
    assert saturated == pytest.approx(want_saturated, rel=1e-4)
    if alpha == 0.95:
        assert saturated > 1.5 * exact  # the case the AVX2 model exists for (measured 1.64x)


def test_small_weights_never_saturate():
    rng = np.random.default_rng(4)
    rows = rng.normal(size=(32, 8)).astype(np.float32)
    weight = rng.normal(size=(8, 4)).astype(np.float32)
    weight[0::2] = 0.0  # every pair holds a zero weight: |pair| <= 255 * 128 < 32767
    exact, saturated = int8_output_error(rows, rows.min(0), rows.max(0), weight, None)
    assert exact == saturated


def test_row_reservoir_is_a_uniform_sample_and_the_channel_stats_are_exact():
    ids = np.arange(1000, dtype=np.float32)
    first_half = []
    for seed in range(40):
        rng = np.random.default_rng(seed)
        stats = ChannelStats.empty(2)
        for start in range(0, 1000, 7):  # batches (1, <=7, 2): channel 0 = row id, channel 1 = -id
            block = ids[start:start + 7]
            stats.fold(np.stack([block, -block], axis=-1)[None], rng, max_rows=100)
        kept = stats.rows[:, 0]
        assert kept.size == 100 and np.unique(kept).size == 100 and np.all(stats.rows[:, 1] == -kept)
        first_half.append(np.mean(kept < 500))
        np.testing.assert_array_equal(stats.low, [0, -999])
        np.testing.assert_array_equal(stats.high, [999, 0])
        np.testing.assert_array_equal(stats.absmax, [999, 999])
        assert stats.seen == 1000
    assert abs(np.mean(first_half) - 0.5) < 0.03  # 4000 draws: the standard error is ~0.008


def test_search_picks_the_smallest_error_and_smooths_the_outlier(tmp_path: Path):
    model = _encoder_block(float_input=True)
    path = tmp_path / "block.onnx"
    onnx.save(model, str(path))
    plan = plan_quantization(model)
    smoothed = [p for p in plan.branch_points if p.alpha is not None]
    stats = collect_channel_stats(path, [_x(seed) for seed in range(12)], tensors=[p.tensor for p in smoothed])
    choices = search_alphas(model, stats, points=plan.branch_points)
    assert [c.tensor for c in choices] == [p.tensor for p in smoothed]
    for choice in choices:
        assert len(choice.errors) == len(ALPHA_GRID)
        assert choice.error == min(max(e) for e in choice.errors.values()) <= choice.error_unsmoothed
    # LayerNorm gamma 12 on channel 3: smoothing must help exact integer kernels a lot (on this 8-channel toy the
    # outlier moved into the weights saturates AVX2's int16 pairs, so the choice itself may be no smoothing)
    qkv = next(c for c in choices if c.role == "qkv").errors
    best = min(qkv, key=lambda k: qkv[k][0])
    assert best != "none" and qkv[best][0] < 0.5 * qkv["none"][0]


def test_search_needs_statistics_for_each_point():
    model = _encoder_block(float_input=True)
    with pytest.raises(BadInputError, match="no channel statistics for tensor"):
        search_alphas(model, {}, points=plan_quantization(model).branch_points)


def test_unknown_smoothquant_mode_suggests_the_close_one():
    with pytest.raises(BadInputError, match=r"quantize.smoothquant: unknown mode 'serch' \(did you mean 'search'\?\)"):
        QuantizeOptions(smoothquant="serch")


def test_too_few_samples_for_a_histogram_method(tmp_path: Path):
    model = _encoder_block(float_input=True)
    path = tmp_path / "block.onnx"
    onnx.save(model, str(path))
    feeds = [_x(seed) for seed in range(4)]
    with pytest.raises(BadInputError, match=r"calibrator 'entropy' needs at least 16 calibration samples, got 4"):
        quantize_static(path, tmp_path / "q.onnx", calibration_feeds=lambda: iter(feeds), n_calibration=4,
                        options=QuantizeOptions(calibrator="entropy"))
    assert not (tmp_path / "q.onnx").exists()


@pytest.mark.parametrize("mode", ["search", "recipe", "off"])
def test_every_mode_quantizes_the_block_and_records_its_alphas(tmp_path: Path, mode: str):
    model = _encoder_block(float_input=True, gelu="op")  # a Gelu op: every Mul in the result is a smoothing Mul
    path = tmp_path / "block.onnx"
    onnx.save(model, str(path))
    feeds = [_x(seed) for seed in range(16)]
    metrics = quantize_static(path, tmp_path / "q.onnx", calibration_feeds=lambda: iter(feeds), n_calibration=16,
                              options=QuantizeOptions(smoothquant=mode))
    muls = [n.op_type for n in onnx.load(str(tmp_path / "q.onnx")).graph.node].count("Mul")
    layers = metrics["smoothquant"]["layers"]
    assert metrics["smoothquant"]["mode"] == mode
    if mode == "search":
        assert sorted(layer["role"] for layer in layers) == ["ffn_in", "ffn_out", "qkv"]
        assert muls == sum(layer["alpha"] is not None for layer in layers) >= 1
    else:
        assert layers == []
        assert muls == {"recipe": 3, "off": 0}[mode]


def test_range_cache_skips_calibration_on_a_rerun_with_another_budget(tmp_path: Path):
    """Same model + data: the second run reads alphas, max|x| and ranges back and writes the identical model."""
    from edgepack.quantization.quantize import RangeCache
    from edgepack.quantization.sensitivity import QuantBudget

    model = _encoder_block(float_input=True, gelu="op")
    path = tmp_path / "block.onnx"
    onnx.save(model, str(path))
    feeds = [_x(seed) for seed in range(16)]
    reads = []

    def calibration_feeds():
        reads.append(1)
        return iter(feeds)

    cache = RangeCache(tmp_path / "cache", data_key="16-seeded-blocks")
    first = quantize_static(path, tmp_path / "a.onnx", calibration_feeds=calibration_feeds, n_calibration=16,
                            cache=cache)
    assert first["range_cache"]["hit"] is False and len(reads) == 2  # statistics pass + range pass
    second = quantize_static(path, tmp_path / "b.onnx", calibration_feeds=calibration_feeds, n_calibration=16,
                             cache=cache, budget=QuantBudget(max_cosine_drop=0.5), check=(feeds[:4], "ln2"))
    assert second["range_cache"] == {**first["range_cache"], "hit": True} and len(reads) == 2
    assert second["tensor_ranges"] == first["tensor_ranges"]
    assert second["smoothquant"] == first["smoothquant"]
    a, b = (onnx.load(str(tmp_path / n)) for n in ("a.onnx", "b.onnx"))
    assert [n.op_type for n in a.graph.node] == [n.op_type for n in b.graph.node]
    assert {t.name: t.raw_data for t in a.graph.initializer} == {t.name: t.raw_data for t in b.graph.initializer}
    other = RangeCache(tmp_path / "cache", data_key="other-data")
    third = quantize_static(path, tmp_path / "c.onnx", calibration_feeds=calibration_feeds, n_calibration=16,
                            cache=other)
    assert third["range_cache"]["hit"] is False and len(reads) == 4


def test_a_damaged_range_cache_names_the_file_and_the_fix(tmp_path: Path):
    from edgepack.quantization.quantize import RangeCache

    model = _encoder_block(float_input=True)
    path = tmp_path / "block.onnx"
    onnx.save(model, str(path))
    feeds = [_x(seed) for seed in range(4)]
    cache = RangeCache(tmp_path / "cache", data_key="k")
    quantize_static(path, tmp_path / "a.onnx", calibration_feeds=lambda: iter(feeds), n_calibration=4, cache=cache)
    (cached,) = (tmp_path / "cache").glob("ranges-*.json")
    cached.write_text('{"alphas": {}')
    with pytest.raises(BadInputError, match=rf"{cached}: not a readable edgepack range cache .*delete the file"):
        quantize_static(path, tmp_path / "b.onnx", calibration_feeds=lambda: iter(feeds), n_calibration=4,
                        cache=cache)
    assert not (tmp_path / "b.onnx").exists()
