"""Streaming range calibrators: streaming equals offline, O(1) memory, edge cases, and the ONNX Runtime driver."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgepack.errors import BadInputError
from edgepack.quantization import calibrators
from edgepack.quantization.calibrators import (
    CALIBRATORS,
    calibrator_options,
    clipped_range,
    collect_tensor_ranges,
    entropy_threshold,
    make_calibrator,
    mse_threshold,
)

ALL = ["entropy", "minmax", "moving-average-minmax", "mse", "percentile"]
HISTOGRAM = ["entropy", "mse", "percentile"]
NUM_BINS = 2048


def growing_batches(seed: int = 0, count: int = 20, size: int = 5000) -> list[np.ndarray]:
    """Uniform bulk whose scale grows from 0.25 to 1 across batches, plus one outlier of |x| in [5, 6] per batch.

    The first batch's max is the smallest, so the histogram must grow; the outliers sit far from the bulk, so the
    entropy and mse optima are well defined (the bulk edge, or a clear compromise) rather than flat plateaus.
    """
    rng = np.random.default_rng(seed)
    batches = []
    for index in range(count):
        batch = rng.uniform(-1.0, 1.0, size=size) * (0.25 + 0.75 * index / (count - 1))
        batch[0] = rng.uniform(5.0, 6.0) * rng.choice([-1.0, 1.0])
        batches.append(batch.astype(np.float32))
    batches[0][0] = 0.1  # keep the first batch small: later batches must grow the range
    return batches


def stream(name: str, batches: list[np.ndarray], tensor: str = "t", **options: object) -> calibrators.RangeCalibrator:
    calibrator = make_calibrator(name, **options)
    for sample, batch in enumerate(batches):
        calibrator.update(tensor, batch, sample=sample)
    return calibrator


def test_registry_holds_the_five_methods() -> None:
    assert CALIBRATORS.names() == ALL


def test_calibrator_options_are_the_defaults_a_build_is_keyed_by() -> None:
    """stages.quantize hashes these into its stage key (and RangeCache into its file name): a changed default
    (entropy's floor moved from 99.0 to 99.99) rebuilds instead of reusing ranges calibrated the old way."""
    assert calibrator_options("minmax") == {}
    assert calibrator_options("entropy") == {"num_bins": 2048, "num_quantized_bins": 128, "min_percentile": 99.99}
    for name in ALL:
        assert make_calibrator(name, **calibrator_options(name)).options == make_calibrator(name).options
    for name in ALL:
        assert make_calibrator(name).name == name


def test_minmax_streaming_equals_offline_exactly() -> None:
    batches = growing_batches()
    data = np.concatenate(batches)
    assert stream("minmax", batches).ranges() == {"t": (float(data.min()), float(data.max()))}


def test_moving_average_equals_offline_ema_of_batch_extremes() -> None:
    batches = growing_batches()
    momentum = 0.8
    low, high = float(batches[0].min()), float(batches[0].max())
    for batch in batches[1:]:
        low = momentum * low + (1 - momentum) * float(batch.min())
        high = momentum * high + (1 - momentum) * float(batch.max())
    result = stream("moving-average-minmax", batches, momentum=momentum).ranges()["t"]
    assert result == (low, high)
    minmax = stream("minmax", batches).ranges()["t"]
    assert minmax[0] < result[0] < result[1] < minmax[1]  # the average damps the outliers


def offline_range(name: str, data: np.ndarray) -> tuple[float, float]:
    """One pass over all data at once: exact percentile, or a one-shot NUM_BINS histogram over [0, max|x|]."""
    magnitudes = np.abs(data.astype(np.float64))
    top = float(magnitudes.max())
    counts, _ = np.histogram(magnitudes, bins=NUM_BINS, range=(0.0, top))
    if name == "percentile":
        threshold = float(np.percentile(magnitudes, 99.999))
    elif name == "entropy":
        threshold = entropy_threshold(counts, top, 128)
    else:
        threshold = mse_threshold(counts, top, signed=bool(data.min() < 0), num_bits=8)
    return clipped_range(threshold, float(data.min()), float(data.max()))


@pytest.mark.parametrize("name", HISTOGRAM)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_histogram_streaming_matches_offline_within_bin_width(name: str, seed: int) -> None:
    """Tolerance: the exact percentile is within one streaming bin width (top / num_bins, the coarser grid) of ours.
    Entropy and mse answers are bin edges of their own histograms, so each may sit up to one bin of its own grid
    from the common optimum: tolerance = streaming width + offline width (< 2 streaming widths)."""
    batches = growing_batches(seed)
    data = np.concatenate(batches)
    calibrator = stream(name, batches, **({"min_percentile": 0.0} if name == "entropy" else {}))  # TensorRT's search
    _, top = calibrator.histogram("t")
    assert top > np.abs(batches[0]).max()  # the range grew during streaming
    stream_width = top / NUM_BINS
    offline_width = float(np.abs(data).max()) / NUM_BINS
    tolerance = stream_width if name == "percentile" else stream_width + offline_width
    low, high = calibrator.ranges()["t"]
    expected_low, expected_high = offline_range(name, data)
    assert abs(low - expected_low) <= tolerance
    assert abs(high - expected_high) <= tolerance


def fake_quantize_mse(data: np.ndarray, low: float, high: float, bits: int = 8) -> float:
    """Mean squared error of a uniform `bits` quantiser on [low, high] (round to nearest, clip outside)."""
    step = (high - low) / (2**bits - 1)
    quantized = low + np.clip(np.round((data - low) / step), 0, 2**bits - 1) * step
    return float(np.mean((data - quantized) ** 2))


@pytest.mark.parametrize("signed", [True, False])
def test_mse_threshold_minimises_actual_quantisation_error(signed: bool) -> None:
    """Independent of the histogram model: fake-quantise the data itself on a grid of thresholds."""
    rng = np.random.default_rng(5)
    data = rng.laplace(size=50_000) if signed else rng.exponential(size=50_000)
    low, high = stream("mse", np.array_split(data, 10)).ranges()["t"]
    candidates = np.linspace(0.05, 1.0, 96) * np.abs(data).max()
    best = min(fake_quantize_mse(data, -t if signed else 0.0, t) for t in candidates)
    assert fake_quantize_mse(data, low, high) <= 1.05 * best
    assert high < np.abs(data).max()  # it clips the sparse tail


def test_entropy_clips_at_the_edge_of_the_bulk() -> None:
    """Uniform bulk up to |x| = 1 plus rare outliers at 5..6: the KL optimum is the bulk edge (TensorRT's rationale)."""
    batches = growing_batches(seed=4)
    calibrator = stream("entropy", batches, min_percentile=0.0)  # TensorRT's search as it is
    _, top = calibrator.histogram("t")
    bulk_edge = max(float(np.abs(batch[1:]).max()) for batch in batches)  # about 1.0
    low, high = calibrator.ranges()["t"]
    assert abs(high - bulk_edge) <= 2 * top / NUM_BINS and low == -high


@pytest.mark.parametrize("name", HISTOGRAM)
def test_merged_histogram_equals_one_shot_histogram_on_the_final_range(name: str) -> None:
    """The doubling merge loses nothing: the streamed counts are the histogram of all data on the final range."""
    batches = growing_batches(seed=3)
    calibrator = stream(name, batches)
    counts, top = calibrator.histogram("t")
    magnitudes = np.abs(np.concatenate(batches).astype(np.float64))
    expected, _ = np.histogram(magnitudes, bins=NUM_BINS, range=(0.0, top))
    np.testing.assert_array_equal(counts, expected)


@pytest.mark.parametrize("name", ALL)
def test_state_bytes_do_not_grow_with_batches(name: str) -> None:
    rng = np.random.default_rng(0)
    batches = [rng.normal(size=64) * (1 + index / 10) for index in range(1000)]
    few = stream(name, batches[:10], tensor="a")
    few.update("b", batches[0], sample=0)
    many = stream(name, batches, tensor="a")
    many.update("b", batches[0], sample=0)
    assert few.state_bytes() == many.state_bytes() > 0
    if name in HISTOGRAM:
        assert many.state_bytes() == 2 * (NUM_BINS * 8 + 40)  # two tensors: int64 counts + top, min, max, at_top, zeros


EDGE_CASES = {
    "constant": ([np.full((2, 3), 3.0, dtype=np.float32)] * 3, (3.0, 3.0)),
    "constant-negative": ([np.full(7, -2.0)] * 2, (-2.0, -2.0)),
    "all-zero": ([np.zeros((4, 4), dtype=np.float32)] * 3, (0.0, 0.0)),
    "single-element": ([np.array([-2.5], dtype=np.float32)], (-2.5, -2.5)),
    "integer": ([np.array([[0, 5, -3]], dtype=np.int64), np.array([1, 2], dtype=np.int32)], (-3.0, 5.0)),
    "zeros-then-values": ([np.zeros(10), np.array([0.0, 4.0, 2.0])], (0.0, 4.0)),
}


@pytest.mark.parametrize("case", sorted(EDGE_CASES))
@pytest.mark.parametrize("name", ALL)
def test_degenerate_tensors_give_finite_ordered_ranges(name: str, case: str) -> None:
    batches, (data_low, data_high) = EDGE_CASES[case]
    low, high = stream(name, batches).ranges()["t"]
    assert np.isfinite(low) and np.isfinite(high) and low <= high
    if name == "minmax":
        assert (low, high) == (data_low, data_high)
    if name == "moving-average-minmax":  # an average of batch extremes: inside the data range, exact if one batch
        assert data_low <= low <= high <= data_high
        assert len(batches) > 1 or (low, high) == (data_low, data_high)
        return
    # Every method stays inside the data range extended to 0, and reaches at least 99% of its far end
    # (mse may stop a few bins short of a lone spike: rounding noise there costs more than clipping it).
    assert min(data_low, 0.0) <= low and high <= max(data_high, 0.0)
    far_end = max(abs(data_low), abs(data_high))
    assert max(abs(low), abs(high)) >= 0.99 * far_end


def test_zeros_before_the_first_nonzero_stay_in_bin_zero() -> None:
    calibrator = stream("percentile", [np.zeros(10), np.array([0.0, 4.0, 2.0])])
    counts, top = calibrator.histogram("t")
    assert top == 4.0 and counts[0] == 11 and counts[NUM_BINS // 2] == 1 and counts[-1] == 1


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("name", ALL)
def test_non_finite_values_name_tensor_and_sample(name: str, bad: float) -> None:
    calibrator = make_calibrator(name)
    calibrator.update("encoder.out", np.ones(4), sample=0)
    values = np.ones((2, 3), dtype=np.float32)
    values[1, 2] = bad
    with pytest.raises(BadInputError, match=r"tensor 'encoder\.out'.*sample 7.*input data.*FP32"):
        calibrator.update("encoder.out", values, sample=7)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_are_found_anywhere_in_any_float_dtype(bad: float, dtype: type) -> None:
    """The check reads only min and max (NaN propagates into both, +-Inf is one of them): a lone bad value in the
    middle of a tensor is still caught, whatever the float width."""
    values = np.linspace(-1.0, 1.0, 1001).astype(dtype)
    values[500] = bad
    with pytest.raises(BadInputError, match=r"tensor 'x' holds NaN or Inf at calibration sample 3"):
        make_calibrator("percentile").update("x", values, sample=3)


def test_float32_activations_bin_exactly_as_their_float64_values() -> None:
    """float32 activations are no longer copied to float64, but the bin index is still computed in float64: the same
    values as float32 or float64 give the same histogram (bin edges, values at top and the moves of the doubling
    included), equal to np.histogram of all of them on the final range, and the same ranges."""
    edges = np.arange(-2048, 2049, dtype=np.float32) / 512  # every bin edge of [0, 4] in 2048 bins, both signs
    rng = np.random.default_rng(8)
    batches = [edges, (rng.normal(size=5000) * 0.5).astype(np.float32), np.array([6.0, -8.0], dtype=np.float32),
               edges * 2, np.array([9.0], dtype=np.float32)]  # top: 4 (2 values at it), 8 (3 at it), 16
    for name in HISTOGRAM:
        single = stream(name, batches)
        double = stream(name, [batch.astype(np.float64) for batch in batches])
        counts, top = single.histogram("t")
        double_counts, double_top = double.histogram("t")
        assert top == double_top == 16.0
        np.testing.assert_array_equal(counts, double_counts)
        magnitudes = np.abs(np.concatenate(batches).astype(np.float64))
        np.testing.assert_array_equal(counts, np.histogram(magnitudes, bins=NUM_BINS, range=(0.0, top))[0])
        assert single.ranges() == double.ranges(), name


def test_options_are_checked() -> None:
    with pytest.raises(BadInputError, match=r"unknown option 'percentil'.*did you mean 'percentile'"):
        make_calibrator("percentile", percentil=99.9)
    with pytest.raises(BadInputError, match="num_bins must be even"):
        make_calibrator("entropy", num_bins=2047)
    with pytest.raises(BadInputError, match="num_quantized_bins"):
        make_calibrator("entropy", num_bins=64, num_quantized_bins=128)
    with pytest.raises(BadInputError, match="percentile must be a number"):
        make_calibrator("percentile", percentile=120)
    with pytest.raises(BadInputError, match="momentum"):
        make_calibrator("moving-average-minmax", momentum=1.0)
    with pytest.raises(BadInputError, match=r"unknown calibrator 'entropi'.*did you mean 'entropy'"):
        make_calibrator("entropi")
    with pytest.raises(BadInputError, match=r"num_bins must be at most 2\*\*30"):
        make_calibrator("mse", num_bins=2**31)
    assert make_calibrator("mse", num_bits=4).options.num_bits == 4


def test_heavy_tailed_data_is_clipped_strictly_inside_minmax() -> None:
    rng = np.random.default_rng(7)
    batches = [rng.standard_t(2, size=5000).astype(np.float32) for _ in range(20)]  # 100k values
    data_low, data_high = stream("minmax", batches).ranges()["t"]
    options = {"percentile": {"percentile": 99.99}, "entropy": {}, "mse": {}}  # 99.99% of 100k: 10 values clipped
    for name, extra in options.items():
        low, high = stream(name, batches, **extra).ranges()["t"]
        assert data_low < low < 0.0 < high < data_high, name
    low, high = stream("entropy", batches, min_percentile=0.0).ranges()["t"]
    assert high < 0.2 * data_high  # KL (TensorRT's search, no floor) clips hard: the tail holds almost no mass
    # the default floor keeps every candidate at or above the 99.99th percentile of |x| (within one bin): the rare
    # large values stay inside the range (a CNN's signal; EfficientNet-Lite0, EntropyOptions.min_percentile)
    _, floored = stream("entropy", batches).ranges()["t"]
    _, top = stream("entropy", batches).histogram("t")
    floor = float(np.percentile(np.abs(np.concatenate(batches)), 99.99))
    assert floor - top / NUM_BINS <= floored < data_high and floored > 3 * high, (high, floored, floor)


# ------------------------------------------------------------------------ entropy: vectorised vs the former loop


def reference_divergence(counts: np.ndarray, index: int, num_quantized_bins: int) -> float:
    """KL(p || q) of candidate `index`, bin by bin: entropy_threshold's per-candidate step before it was vectorised
    (the reference the prefix-sum version must reproduce: same levels, eps smoothing and renormalisation)."""
    weights = counts.astype(np.float64)
    kept = weights[:index]
    reference = kept.copy()
    reference[-1] += weights[index:].sum()
    nonzero = reference != 0  # (i,)
    level = np.arange(index) * num_quantized_bins // index  # (i,)
    level_counts = np.bincount(level, weights=kept, minlength=num_quantized_bins)
    level_nonzero = np.bincount(level, weights=nonzero, minlength=num_quantized_bins)
    candidate = np.where(nonzero, level_counts[level] / np.maximum(level_nonzero[level], 1.0), 0.0)
    if candidate.sum() <= 0.0:
        return np.inf
    p = np.where(reference == 0, calibrators._KL_EPS, reference)
    q = np.where(candidate == 0, calibrators._KL_EPS, candidate)
    p, q = p / p.sum(), q / q.sum()
    return float(np.sum(p * np.log(p / q)))


def reference_entropy_index(counts: np.ndarray, num_quantized_bins: int) -> int:
    """The former loop over candidates: the first index with the smallest KL (strict <: the smallest index wins
    ties), 0 for an empty histogram."""
    if not counts.any():
        return 0
    last = int(np.flatnonzero(counts)[-1]) + 1
    best_index, best_divergence = num_quantized_bins, np.inf
    for index in range(num_quantized_bins, max(last, num_quantized_bins) + 1):
        divergence = reference_divergence(counts, index, num_quantized_bins)
        if divergence < best_divergence:
            best_index, best_divergence = index, divergence
    return best_index


def one_shot(values: np.ndarray, num_bins: int, overshoot: float = 1.0) -> np.ndarray:
    """Counts of |values| in `num_bins` bins over [0, overshoot * max|x|] (overshoot > 1: empty bins on top)."""
    magnitudes = np.abs(values)
    return np.histogram(magnitudes, bins=num_bins, range=(0.0, overshoot * magnitudes.max()))[0]


def spike(num_bins: int, at: int, count: int = 37) -> np.ndarray:
    counts = np.zeros(num_bins, dtype=np.int64)
    counts[at] = count
    return counts


ENTROPY_CASES: dict[str, Callable[[np.random.Generator], np.ndarray]] = {  # name -> counts from a seeded rng
    # 2048 bins (the default) for the realistic shapes; 512 elsewhere keeps the reference loop quick.
    "gaussian-2048": lambda rng: one_shot(rng.normal(size=200_000), 2048),
    "student-t2-2048": lambda rng: one_shot(rng.standard_t(2, size=200_000), 2048, overshoot=1.6),
    "streamed-2048": lambda rng: stream("entropy", growing_batches(seed=5)).histogram("t")[0],
    "laplace-overshoot": lambda rng: one_shot(rng.laplace(size=50_000), 512, overshoot=1.9),
    "few-values": lambda rng: one_shot(rng.exponential(size=40), 512),  # mostly empty bins
    "sparse": lambda rng: (rng.integers(1, 4, size=512) * (rng.random(512) < 0.03)).astype(np.int64),
    "two-spikes": lambda rng: spike(512, 40, 1000) + spike(512, 400, 1),
    "spike-below-levels": lambda rng: spike(512, 5),  # the only non-empty bin lies below num_quantized_bins
    "spike-middle": lambda rng: spike(512, 300),
    "spike-last": lambda rng: spike(512, 511),
    "empty": lambda rng: np.zeros(512, dtype=np.int64),
}


@pytest.mark.parametrize("num_quantized_bins", [2, 128, 256])
@pytest.mark.parametrize("case", sorted(ENTROPY_CASES))
def test_vectorised_entropy_search_equals_the_per_candidate_loop(case: str, num_quantized_bins: int) -> None:
    """The threshold is the former loop's. The KL now comes from prefix sums, other float sums in another order
    (agreeing to ~1e-14): should two candidates tie that closely, the chosen ones may differ (none does here), and
    then their KLs, bin by bin, must agree to 1e-12 relative. With top = num_bins the threshold is the index itself."""
    counts = ENTROPY_CASES[case](np.random.default_rng(11))
    index = entropy_threshold(counts, float(counts.size), num_quantized_bins)
    expected = reference_entropy_index(counts, num_quantized_bins)
    if index != expected:
        chosen = reference_divergence(counts, int(index), num_quantized_bins)
        best = reference_divergence(counts, expected, num_quantized_bins)
        assert math.isclose(chosen, best, rel_tol=1e-12), (index, expected, chosen, best)


def test_compensated_cumsum_keeps_what_a_running_sum_rounds_away() -> None:
    values = np.array([1e16, 1.0, -1e16, 1.0, 0.5])
    exact = [math.fsum(values[: k + 1]) for k in range(values.size)]  # correctly rounded prefixes
    assert np.cumsum(values)[2:].tolist() == [0.0, 1.0, 1.5]  # the first 1.0 is lost
    assert calibrators._compensated_cumsum(values).tolist() == exact


# ------------------------------------------------------------------------------------ collect_tensor_ranges


def tiny_mlp(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """x (B, 4) -> MatMul W1 (4, 8) -> h -> Relu -> r -> MatMul W2 (8, 3) -> y; returns (W1, W2)."""
    rng = np.random.default_rng(0)
    w1 = rng.normal(size=(4, 8)).astype(np.float32)
    w2 = rng.normal(size=(8, 3)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h"]),
            helper.make_node("Relu", ["h"], ["r"]),
            helper.make_node("MatMul", ["r", "w2"], ["y"]),
        ],
        "tiny_mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
        initializer=[numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return w1, w2


def mlp_feeds() -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(1)
    return [{"x": (rng.normal(size=(3, 4)) * (index + 1)).astype(np.float32)} for index in range(6)]


def test_collect_tensor_ranges_matches_numpy(tmp_path: Path) -> None:
    model_path = tmp_path / "mlp.onnx"
    w1, w2 = tiny_mlp(model_path)
    before = model_path.read_bytes()
    feeds = mlp_feeds()
    ranges = collect_tensor_ranges(model_path, iter(feeds), tensors=["x", "h", "r", "y"],
                                   calibrator=make_calibrator("minmax"))
    x = np.concatenate([feed["x"] for feed in feeds])  # (18, 4)
    h = x @ w1
    r = np.maximum(h, 0)
    expected = {"x": x, "h": h, "r": r, "y": r @ w2}
    assert list(ranges) == list(expected)
    for name, values in expected.items():
        np.testing.assert_allclose(ranges[name], (values.min(), values.max()), rtol=1e-5, err_msg=name)
    assert ranges["x"] == (float(x.min()), float(x.max()))  # inputs pass through untouched: exact
    assert ranges["r"][0] == 0.0
    assert model_path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["mlp.onnx"]


def test_collect_tensor_ranges_external_data_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Above the protobuf limit the augmented copy keeps weights in external data; the ranges are the same."""
    model_path = tmp_path / "mlp.onnx"
    tiny_mlp(model_path)
    inline = collect_tensor_ranges(model_path, mlp_feeds(), tensors=["h", "y"], calibrator=make_calibrator("mse"),
                                   total=6)
    monkeypatch.setenv("EDGEPACK_EXTERNAL_DATA_BYTES", "0")  # the one threshold (onnx_files), lowered
    external = collect_tensor_ranges(model_path, mlp_feeds(), tensors=["h", "y"], calibrator=make_calibrator("mse"))
    assert inline == external and set(inline) == {"h", "y"}


def test_collect_tensor_ranges_rejects_unknown_tensor_and_bad_feed(tmp_path: Path) -> None:
    model_path = tmp_path / "mlp.onnx"
    tiny_mlp(model_path)
    with pytest.raises(BadInputError, match=r"tensor 'hh' is not an activation of .*mlp\.onnx.*did you mean 'h'"):
        collect_tensor_ranges(model_path, mlp_feeds(), tensors=["h", "hh"], calibrator=make_calibrator("minmax"))
    with pytest.raises(BadInputError, match=r"tensor 'w1' is not an activation"):  # weights are not calibrated
        collect_tensor_ranges(model_path, mlp_feeds(), tensors=["w1"], calibrator=make_calibrator("minmax"))
    with pytest.raises(BadInputError, match=r"calibration sample 0 .*missing: \['x'\].*unknown: \['input'\]"):
        collect_tensor_ranges(model_path, [{"input": np.zeros((1, 4), np.float32)}], tensors=["h"],
                              calibrator=make_calibrator("minmax"))


def _log_model(path: Path) -> Path:
    """x (1, 4) -> Log -> y: a zero in x gives -Inf in y."""
    graph = helper.make_graph([helper.make_node("Log", ["x"], ["y"], name="log")], "log",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_threaded_folding_equals_serial_updates_and_reports_the_bad_sample(tmp_path):
    model = _log_model(tmp_path / "log.onnx")
    rng = np.random.default_rng(5)
    feeds = [{"x": rng.uniform(0.1, 10.0, size=(1, 4)).astype(np.float32)} for _ in range(9)]
    got = collect_tensor_ranges(model, iter(feeds), tensors=["x", "y"], calibrator=make_calibrator("entropy"))
    serial = make_calibrator("entropy")
    for sample, feed in enumerate(feeds):
        serial.update("x", feed["x"], sample=sample)
        serial.update("y", np.log(feed["x"]), sample=sample)
    assert got["x"] == serial.ranges()["x"]
    assert got["y"] == pytest.approx(serial.ranges()["y"], rel=1e-6)  # ORT's Log vs NumPy's: last-bit differences
    feeds[2]["x"][0, 1] = 0.0
    with pytest.raises(BadInputError, match=r"tensor 'y' holds NaN or Inf at calibration sample 2"):
        collect_tensor_ranges(model, iter(feeds), tensors=["y"], calibrator=make_calibrator("minmax"))


def test_collect_tensor_ranges_of_no_tensors_runs_nothing(tmp_path: Path) -> None:
    model_path = tmp_path / "mlp.onnx"
    tiny_mlp(model_path)
    assert collect_tensor_ranges(model_path, mlp_feeds(), tensors=[], calibrator=make_calibrator("minmax")) == {}
