"""Streaming activation-range calibrators: O(1) memory in the number of calibration samples.

Why our own: onnxruntime.quantization's calibrators fail on real transformers. Its Percentile and Entropy methods
crash on all-MiniLM-L6-v2 ("Too many bins for data range"), and its histogram collectors keep every activation of
every sample until the end, so memory grows linearly with the sample count. Here each calibrator folds one
activation batch at a time into a fixed-size state; ONNX Runtime runs the model (`collect_tensor_ranges`) and the
ranges go to onnxruntime.quantization's own QDQ quantizer (we never write a quantizer).

>>> import numpy as np
>>> calibrator = make_calibrator("percentile", percentile=99.0, num_bins=256)
>>> for sample in range(4):
...     calibrator.update("relu_out", np.abs(np.random.default_rng(sample).normal(size=1000)), sample=sample)
>>> low, high = calibrator.ranges()["relu_out"]
>>> low == 0.0 and 2.0 < high < 3.5
True

Histogram calibrators (`percentile`, `entropy`, `mse`) keep, per tensor, `num_bins` counts of |x| over [0, top],
plus the exact min and max. When a batch holds a value above `top`, `top` doubles until it covers the value and each
pair of neighbouring bins merges into one (bins 2j and 2j+1 -> bin j; the upper half starts empty). Every new bin
edge k * 2top / num_bins is an old edge, so each old bin falls wholly inside one new bin: the merge loses nothing,
and the merged counts equal the histogram the whole stream would have had on the new range from the start (values
exactly at the old top, kept in the closed last bin, are moved to their new bin; a test checks equality with
np.histogram). The cost is resolution: top is the first batch's max|x| doubled k times, so it ends in
[max|x|, 2 max|x|) and the final bin width is up to twice that of a one-shot histogram. A threshold is chosen from the |x| histogram, then turned into a range that is symmetric about 0
for signed tensors (min < 0) and [0, threshold] otherwise, each end clipped to the observed min / max. Ranges are
data ranges: making them contain 0 is left to the quantizer (onnxruntime does it).
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import onnx
import onnxruntime as ort

from edgepack.errors import BadInputError, did_you_mean
from edgepack.onnx_files import save_onnx
from edgepack.registry import Registry
from edgepack.reporter import get_reporter

if TYPE_CHECKING:
    from edgepack.calibration_data import Feed

#: Smoothing mass (in counts) given to empty bins before a KL divergence, as in TensorRT / MXNet.
_KL_EPS = 1e-4
#: AbsHistogram computes bin indices (up to num_bins) as int32, the cheapest float -> int cast.
_MAX_BINS = 2**30
#: Elements per (candidates, levels) block in entropy_threshold: its float64 arrays (128 KiB each) stay in a
#: 512 KiB L2 cache; blocks of 2**16 or more (or one block of all ~2000 candidates) made the search ~2x slower.
_KL_BLOCK = 2**14


class RangeCalibrator(ABC):
    """Folds activation batches into per-tensor (low, high) ranges with memory independent of the sample count.

    Subclasses set `name` and `Options` (a frozen dataclass) and implement `_update`, `ranges` and `state_bytes`.
    """

    name: ClassVar[str]
    Options: ClassVar[type]

    def __init__(self, options: object | None = None) -> None:
        self.options = options if options is not None else self.Options()

    def update(self, tensor: str, values: np.ndarray, *, sample: int) -> None:
        """Fold one activation batch of `tensor` (any shape, any real dtype) observed on calibration `sample`."""
        data, low, high = _checked_values(tensor, values, sample)
        if data.size:  # an empty batch says nothing about the range
            self._update(tensor, data, low, high)

    @abstractmethod
    def _update(self, tensor: str, data: np.ndarray, low: float, high: float) -> None:
        """`data`: (N,) float32 or float64, finite, N >= 1; `low`, `high`: its min and max (computed once)."""

    @abstractmethod
    def ranges(self) -> dict[str, tuple[float, float]]:
        """Tensor name -> (low, high) for every tensor that received data so far; the state is left as is."""

    @abstractmethod
    def state_bytes(self) -> int:
        """Bytes of state held (arrays and scalars), to show that memory does not grow with the sample count."""


CALIBRATORS: Registry[type[RangeCalibrator]] = Registry("calibrator")


def make_calibrator(name: str, **options: object) -> RangeCalibrator:
    """The calibrator registered as `name`, built with its frozen options dataclass; unknown options are errors."""
    cls = CALIBRATORS.get(name)
    known = [field.name for field in dataclasses.fields(cls.Options)]
    for key in options:
        if key not in known:
            raise BadInputError(
                f"unknown option '{key}' for calibrator '{name}'{did_you_mean(key, known)}; "
                f"known: {', '.join(known) or 'none'}"
            )
    return cls(cls.Options(**options))


def calibrator_options(name: str) -> dict[str, object]:
    """The option values calibrator `name` runs with (its Options defaults), e.g. for a content hash."""
    return dataclasses.asdict(CALIBRATORS.get(name).Options())


def _checked_values(tensor: str, values: np.ndarray, sample: int) -> tuple[np.ndarray, float, float]:
    """Flatten to (N,) float32 or float64 and refuse NaN / Inf, naming the tensor and the sample; with min and max.

    float32 stays float32: copying every activation to float64 was a large share of the per-sample cost, and
    min, max and the bin index (computed in float64 from the float32 values) are the same either way. Other dtypes
    (integers, float16) become float64, which holds them exactly. The finiteness check reads min and max, which
    NaN propagates into and +-Inf is one of, instead of building an (N,) boolean array; the calibrators reuse
    them (one pass each over the data per sample and tensor, not two).
    """
    data = np.asarray(values)
    if data.dtype != np.float32 and data.dtype != np.float64:
        data = data.astype(np.float64)
    data = data.reshape(-1)
    if not data.size:
        return data, math.inf, -math.inf
    low, high = float(data.min()), float(data.max())
    if not (math.isfinite(low) and math.isfinite(high)):
        raise BadInputError(
            f"tensor '{tensor}' holds NaN or Inf at calibration sample {sample}; check the input data, "
            "and calibrate the model in FP32 (FP16 activations can overflow to Inf)"
        )
    return data, low, high


# ----------------------------------------------------------------------------------------------- option checks


def _check_int(option: str, value: object, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise BadInputError(f"calibrator option {option} must be an integer >= {minimum}, got {value!r}")


def _check_float(option: str, value: object, *, low: float, high: float, closed_low: bool) -> None:
    number = value if isinstance(value, (int, float)) and not isinstance(value, bool) else None
    inside = number is not None and (low <= number if closed_low else low < number) and number <= high
    if not inside:
        bracket = "[" if closed_low else "("
        raise BadInputError(f"calibrator option {option} must be a number in {bracket}{low}, {high}], got {value!r}")


def _check_num_bins(num_bins: object) -> None:
    _check_int("num_bins", num_bins, minimum=2)
    if num_bins % 2:  # type: ignore[operator]
        raise BadInputError(f"calibrator option num_bins must be even (pairs of bins merge), got {num_bins}")
    if num_bins > _MAX_BINS:  # type: ignore[operator]
        raise BadInputError(f"calibrator option num_bins must be at most 2**30 (bin indices are int32), got {num_bins}")


@dataclass(frozen=True)
class NoOptions:
    """minmax takes no options."""


@dataclass(frozen=True)
class MovingAverageOptions:
    #: Weight of the running value: low <- momentum * low + (1 - momentum) * batch_min (likewise high).
    momentum: float = 0.9

    def __post_init__(self) -> None:
        _check_float("momentum", self.momentum, low=0.0, high=1.0, closed_low=True)
        if self.momentum == 1.0:
            raise BadInputError("calibrator option momentum must be below 1 (1 would keep the first batch forever)")


@dataclass(frozen=True)
class PercentileOptions:
    #: Percentile of |x| kept inside the range (the rest is clipped).
    percentile: float = 99.999
    num_bins: int = 2048

    def __post_init__(self) -> None:
        _check_float("percentile", self.percentile, low=0.0, high=100.0, closed_low=False)
        _check_num_bins(self.num_bins)


@dataclass(frozen=True)
class EntropyOptions:
    num_bins: int = 2048
    #: Levels of the quantised distribution compared with the reference (128 as in TensorRT for |x|).
    num_quantized_bins: int = 128
    #: No candidate threshold below this percentile of the non-zero |x| (0 = TensorRT's search as it is). On a
    #: sparse, comb-like histogram (activations of piecewise-constant images, few distinct values) the KL curve
    #: is jagged and its minimum clipped 85% of a ReLU6 output's non-zero values (measured). KL weighs a bin by
    #: its mass, not by how far its values move when clipped, so it also clips the rare large activations that
    #: carry a CNN's signal: with a 1% floor the ReLU6 outputs of EfficientNet-Lite0's last blocks were clipped
    #: at 3.1-4.7 of 6, calibration-crop logit cosine 0.9934; floors of 99.9 / 99.99 gave 0.9983 / 0.9985 on the
    #: same crops (chosen there; held-out top-1 agreement 0.911 -> 0.955 / 0.964, docs/benchmarks.md `vision`).
    #: The search then keeps TensorRT's rationale (clip the sparse tail) for the last 0.01% of the values.
    min_percentile: float = 99.99

    def __post_init__(self) -> None:
        _check_num_bins(self.num_bins)
        _check_int("num_quantized_bins", self.num_quantized_bins, minimum=2)
        _check_float("min_percentile", self.min_percentile, low=0.0, high=100.0, closed_low=True)
        if self.num_quantized_bins > self.num_bins:
            raise BadInputError(
                f"calibrator option num_quantized_bins ({self.num_quantized_bins}) must not exceed "
                f"num_bins ({self.num_bins})"
            )


@dataclass(frozen=True)
class MseOptions:
    num_bins: int = 2048
    #: Bits of the uniform quantiser whose error is minimised.
    num_bits: int = 8

    def __post_init__(self) -> None:
        _check_num_bins(self.num_bins)
        _check_int("num_bits", self.num_bits, minimum=2)


# ------------------------------------------------------------------------------------------------- min / max


@CALIBRATORS.register("minmax")
class MinMaxCalibrator(RangeCalibrator):
    """Exact running min and max over every value seen."""

    name = "minmax"
    Options = NoOptions

    def __init__(self, options: NoOptions | None = None) -> None:
        super().__init__(options)
        self._ranges: dict[str, tuple[float, float]] = {}

    def _update(self, tensor: str, data: np.ndarray, low: float, high: float) -> None:
        if tensor in self._ranges:
            old_low, old_high = self._ranges[tensor]
            low, high = min(low, old_low), max(high, old_high)
        self._ranges[tensor] = (low, high)

    def ranges(self) -> dict[str, tuple[float, float]]:
        return dict(self._ranges)

    def state_bytes(self) -> int:
        return 16 * len(self._ranges)  # two float64 per tensor


@CALIBRATORS.register("moving-average-minmax")
class MovingAverageMinMaxCalibrator(RangeCalibrator):
    """Exponential moving average of each batch's min and max (the first batch initialises it), as in PyTorch's
    MovingAverageMinMaxObserver; it damps the effect of one outlier batch."""

    name = "moving-average-minmax"
    Options = MovingAverageOptions

    def __init__(self, options: MovingAverageOptions | None = None) -> None:
        super().__init__(options)
        self._ranges: dict[str, tuple[float, float]] = {}

    def _update(self, tensor: str, data: np.ndarray, low: float, high: float) -> None:
        if tensor in self._ranges:
            momentum = self.options.momentum
            old_low, old_high = self._ranges[tensor]
            low = momentum * old_low + (1.0 - momentum) * low
            high = momentum * old_high + (1.0 - momentum) * high
        self._ranges[tensor] = (low, high)

    def ranges(self) -> dict[str, tuple[float, float]]:
        return dict(self._ranges)

    def state_bytes(self) -> int:
        return 16 * len(self._ranges)


# ------------------------------------------------------------------------------------------------- histograms


class AbsHistogram:
    """`num_bins` counts of |x| over [0, top], plus the exact min and max; see the module docstring for the merge."""

    __slots__ = ("counts", "top", "low", "high", "at_top", "zeros")

    def __init__(self, num_bins: int) -> None:
        self.counts = np.zeros(num_bins, dtype=np.int64)  # (num_bins,)
        self.top = 0.0  # 0 while every value seen is exactly 0: those sit in bin 0 whatever top becomes
        self.low = np.inf
        self.high = -np.inf
        # How many counted values equal top exactly. Bins are half-open [k w, (k+1) w) except the last, which
        # is closed (as in np.histogram) and so also holds |x| == top; after a doubling those values belong to
        # bin num_bins // 2, not to the merged last bin, and this count lets the merge move them there.
        self.at_top = 0
        # How many values were exactly 0 (all in bin 0): ReLU / ReLU6 outputs are mostly zeros, which every
        # quantizer represents exactly (ORT keeps 0 on the grid), so the entropy and MSE searches leave them out.
        self.zeros = 0

    def add(self, data: np.ndarray, low: float, high: float) -> None:
        """`data`: (N,) float32 or float64, finite, N >= 1, with its min `low` and max `high`."""
        self.low = min(self.low, low)
        self.high = max(self.high, high)
        if low <= 0.0 <= high:
            self.zeros += data.size - int(np.count_nonzero(data))
        largest = max(-low, high)  # max |x|, without an (N,) array of magnitudes
        self._grow_to(largest)
        num_bins = self.counts.size
        if self.top == 0.0:
            self.counts[0] += data.size
            return
        # Bin index floor(|x| * num_bins / top), the product taken in float64 whatever data's dtype (a float32
        # product rounds differently and would move values across bin edges) and cast straight to int32 (~3x
        # faster than to int64 without AVX-512), with no (N,) float64 temporary. Truncating x * scale, then taking
        # abs, is the same: rounding and truncation are symmetric about 0. |x| <= top keeps the index <= num_bins
        # <= _MAX_BINS, which int32 holds.
        index = np.multiply(data, num_bins / self.top, dtype=np.float64, out=np.empty(data.size, dtype=np.int32),
                            casting="unsafe")  # (N,)
        np.abs(index, out=index)
        binned = np.bincount(index, minlength=num_bins + 1)  # (num_bins + 1,)
        self.counts += binned[:num_bins]
        self.counts[-1] += binned[num_bins]  # |x| == top lands on index num_bins: it belongs to the closed last bin
        if largest == self.top:  # largest is one of data's values, so comparing in data's dtype is exact
            self.at_top += int(np.count_nonzero(np.abs(data) == largest))

    def _grow_to(self, magnitude: float) -> None:
        if magnitude <= self.top:
            return
        if self.top == 0.0:
            self.top = magnitude
            return
        while self.top < magnitude:
            self.top *= 2.0
            merged = self.counts.reshape(-1, 2).sum(axis=1)  # (num_bins // 2,): bins 2j and 2j+1 -> j
            self.counts[: merged.size] = merged
            self.counts[merged.size :] = 0
            # Values at the old top sit on the new edge (num_bins // 2) * w: move them up from the bin below.
            self.counts[merged.size - 1] -= self.at_top
            self.counts[merged.size] += self.at_top
            self.at_top = 0

    @property
    def nbytes(self) -> int:
        return self.counts.nbytes + 5 * 8  # counts + top, low, high, at_top, zeros

    def nonzero_counts(self) -> np.ndarray:
        """The counts without the exact zeros (bin 0 keeps only the values in (0, width))."""
        counts = self.counts.copy()
        counts[0] -= self.zeros
        return counts


class _HistogramCalibrator(RangeCalibrator):
    """Shared state for histogram methods; subclasses choose a threshold on |x| from (counts, top, signed).

    `exclude_zeros`: the threshold search sees the histogram without the exact zeros. After a ReLU / ReLU6 most
    values are exactly 0; in the KL search that spike dominates, and the best candidate was always the smallest
    (128 bins of 2048: a ReLU6 output clipped at 0.375 instead of 6, EfficientNet-Lite0 at 0.00 top-1 agreement).
    Zeros are quantized exactly whatever the range, so they carry no information about the threshold.
    """

    exclude_zeros: ClassVar[bool] = False

    def __init__(self, options: object | None = None) -> None:
        super().__init__(options)
        self._histograms: dict[str, AbsHistogram] = {}

    def _update(self, tensor: str, data: np.ndarray, low: float, high: float) -> None:
        if tensor not in self._histograms:
            self._histograms[tensor] = AbsHistogram(self.options.num_bins)
        self._histograms[tensor].add(data, low, high)

    @abstractmethod
    def _threshold(self, counts: np.ndarray, top: float, *, signed: bool) -> float: ...

    def histogram(self, tensor: str) -> tuple[np.ndarray, float]:
        """A copy of `tensor`'s |x| counts (num_bins,) and the range top: bin k covers [k, k+1) * top / num_bins."""
        if tensor not in self._histograms:
            raise BadInputError(f"no calibration data for tensor '{tensor}'{did_you_mean(tensor, self._histograms)}")
        histogram = self._histograms[tensor]
        return histogram.counts.copy(), histogram.top

    def ranges(self) -> dict[str, tuple[float, float]]:
        result = {}
        for tensor, histogram in self._histograms.items():
            signed = histogram.low < 0.0
            counts = histogram.nonzero_counts() if self.exclude_zeros else histogram.counts
            threshold = self._threshold(counts, histogram.top, signed=signed)
            result[tensor] = clipped_range(threshold, histogram.low, histogram.high)
        return result

    def state_bytes(self) -> int:
        return sum(histogram.nbytes for histogram in self._histograms.values())


def clipped_range(threshold: float, low: float, high: float) -> tuple[float, float]:
    """(-t, t) for a signed tensor (low < 0), (0, t) otherwise, each end clipped to the observed [low, high].

    When every value is below -t (an all-negative tensor whose threshold fell short of its max), the window and
    the data do not overlap and the range collapses to (-t, -t) rather than turning inside out.
    """
    if low >= 0.0:
        return 0.0, float(min(threshold, high))
    clipped_low = max(-threshold, low)
    return float(clipped_low), float(max(min(threshold, high), clipped_low))


@CALIBRATORS.register("percentile")
class PercentileCalibrator(_HistogramCalibrator):
    """The `percentile`-th percentile of |x|, read from the streaming histogram."""

    name = "percentile"
    Options = PercentileOptions

    def _threshold(self, counts: np.ndarray, top: float, *, signed: bool) -> float:
        return percentile_threshold(counts, top, self.options.percentile)


@CALIBRATORS.register("entropy")
class EntropyCalibrator(_HistogramCalibrator):
    """KL-divergence threshold on the |x| histogram, as in TensorRT (and onnxruntime's entropy method)."""

    name = "entropy"
    Options = EntropyOptions
    exclude_zeros = True

    def _threshold(self, counts: np.ndarray, top: float, *, signed: bool) -> float:
        floor = percentile_threshold(counts, top, self.options.min_percentile) if self.options.min_percentile else 0.0
        return entropy_threshold(counts, top, self.options.num_quantized_bins, min_threshold=floor)


@CALIBRATORS.register("mse")
class MseCalibrator(_HistogramCalibrator):
    """Threshold minimising the expected squared error of a uniform `num_bits` quantiser, from the histogram."""

    name = "mse"
    Options = MseOptions
    exclude_zeros = True

    def _threshold(self, counts: np.ndarray, top: float, *, signed: bool) -> float:
        return mse_threshold(counts, top, signed=signed, num_bits=self.options.num_bits)


# --------------------------------------------------------------------- threshold selection on a |x| histogram
# Each takes counts (num_bins,) of |x| over [0, top] (bin width top / num_bins) and returns a threshold on |x|.


def percentile_threshold(counts: np.ndarray, top: float, percentile: float) -> float:
    """Smallest t with `percentile`% of the counts in [0, t], interpolating linearly inside the bin that crosses it."""
    total = int(counts.sum())
    if total == 0 or top == 0.0:
        return 0.0
    width = top / counts.size
    target = percentile / 100.0 * total
    cumulative = np.cumsum(counts)  # (num_bins,)
    index = min(int(np.searchsorted(cumulative, target, side="left")), counts.size - 1)
    below = int(cumulative[index - 1]) if index else 0
    fraction = (target - below) / counts[index] if counts[index] else 1.0
    return float((index + min(fraction, 1.0)) * width)


def entropy_threshold(counts: np.ndarray, top: float, num_quantized_bins: int, *, min_threshold: float = 0.0) -> float:
    """TensorRT's calibration (Migacz, GTC 2017): for each candidate i, fold the counts above bin i into bin i-1
    (reference p), quantise bins [0, i) into `num_quantized_bins` levels and expand back (candidate q), and keep
    the i with the smallest KL(p || q); the threshold is the upper edge i * width.

    Bins are assigned to levels evenly (bin j of i -> level j * levels // i, as NVIDIA's pytorch-quantization does)
    rather than giving the last level the whole remainder (TensorRT / onnxruntime): the remainder rule makes the
    KL curve a saw-tooth that favours multiples of `num_quantized_bins` bins, so the threshold jumped with the bin
    width (streaming vs one-shot histograms disagreed by tens of bins on Gaussian data; evenly, mostly by < 2).
    Candidates stop at the bin holding the largest |x|: every threshold past it clips to the max anyway, and
    stopping there makes the answer independent of how far the streaming range overshoots the max.
    We smooth empty bins with eps counts and renormalise (MXNet also takes eps from the non-empty bins, which can
    turn fractional q counts negative). Ties keep the smallest threshold.
    The KL of all candidates is computed at once from prefix sums (`_clipping_divergences`): one numpy pass per
    candidate, bin by bin, took ~80 ms per tensor (~2000 candidates), seconds per model. `min_threshold` drops the
    candidates below it (`EntropyOptions.min_percentile`).
    """
    if top == 0.0 or not counts.any():
        return 0.0
    levels = num_quantized_bins
    last = int(np.flatnonzero(counts)[-1]) + 1
    first = max(levels, min(last, int(np.ceil(min_threshold * counts.size / top))))
    candidates = np.arange(first, max(last, levels) + 1)  # (C,): candidate i keeps bins [0, i)
    sums = _PrefixSums(counts)
    rows = max(1, _KL_BLOCK // (levels + 1))
    divergence = np.concatenate([_clipping_divergences(sums, candidates[start : start + rows], levels)
                                 for start in range(0, candidates.size, rows)])  # (C,)
    return float(candidates[int(np.argmin(divergence))] * top / counts.size)  # argmin: the first of equal minima


class _PrefixSums:
    """Sums over bins [0, k) of a histogram for every k: each candidate's levels then cost O(1) instead of O(i)."""

    def __init__(self, counts: np.ndarray) -> None:
        self.weights = counts.astype(np.float64)  # (num_bins,)
        # Integer counts below 2**53: these float64 sums are exact, whatever the order of summation.
        self.counts = np.concatenate([[0.0], np.cumsum(self.weights)])  # (num_bins + 1,)
        self.nonzero = np.concatenate([[0], np.cumsum(counts != 0)])  # (num_bins + 1,)
        self.entropy = np.concatenate([[0.0], _compensated_cumsum(_xlogx(self.weights))])  # (num_bins + 1,)
        self.total = float(self.counts[-1])


def _compensated_cumsum(values: np.ndarray) -> np.ndarray:
    """np.cumsum with each step's rounding error added back, so each prefix is off by about one rounding.

    The KL is a small difference of two sums of size ~W log W (W counts): with a plain running sum of w log w over
    2048 bins it differed from the bin-by-bin sum of p log(p / q) by up to ~5e-14 (absolute), compensated ~7e-15.
    TwoSum: np.cumsum adds in order, so total[k] = total[k-1] + values[k] rounded, and `error` is that rounding.
    """
    total = np.cumsum(values)  # (n,)
    previous = np.concatenate([[0.0], total[:-1]])  # (n,)
    virtual = total - previous
    error = (previous - (total - virtual)) + (values - virtual)  # (n,): exact rounding error of each addition
    return total + np.cumsum(error)


def _xlogx(counts: np.ndarray) -> np.ndarray:
    """counts * log(counts), 0 for 0: counts are integers, so max(counts, 1) only replaces the zeros."""
    return counts * np.log(np.maximum(counts, 1.0))


def _clipping_divergences(sums: _PrefixSums, candidates: np.ndarray, levels: int) -> np.ndarray:
    """KL(p || q) of each candidate i in `candidates` (c,): keep bins [0, i), folding the counts above into bin i - 1.

    O(levels) work per candidate instead of O(i). With P the reference counts, P_l their sum over level l, Q_l the
    count q gives each non-empty bin of level l (its kept count / its non-empty bins, eps if it kept nothing) and
    Zp, Zq the smoothed totals: the bins empty in p are empty in q too, their eps terms only enter Zp and Zq, so
        KL = (sum_j P_j log P_j - sum_l P_l log Q_l) / Zp + log(Zq / Zp).
    sum_j P_j log P_j is a prefix sum plus bin i - 1; the per-level sums are differences of prefix sums.
    """
    size = candidates[:, None]  # (c, 1)
    # Level l holds bins [starts[l], starts[l + 1]), the j with j * levels // i == l; starts[levels] == i.
    starts = (np.arange(levels + 1) * size + levels - 1) // levels  # (c, levels + 1)
    kept = np.diff(sums.counts[starts], axis=1)  # (c, levels): counts of bins [0, i) per level
    occupied = np.diff(sums.nonzero[starts], axis=1)  # (c, levels): non-empty bins per level
    clipped = sums.total - sums.counts[candidates]  # (c,)
    last_bin = sums.weights[candidates - 1]  # (c,)
    lifted = (last_bin == 0.0) & (clipped > 0.0)  # (c,): bin i - 1 is non-empty in p only through the clipped counts
    occupied[:, -1] += lifted
    mass = kept.copy()  # (c, levels): P_l
    mass[:, -1] += clipped
    # Spread each level's count evenly over its non-empty bins (a quantiser cannot create mass in empty ones); a
    # level with no kept counts is all eps in q (only bin i - 1, when lifted, holds p mass there).
    quantized = np.where(kept > 0.0, kept / np.maximum(occupied, 1), _KL_EPS)  # (c, levels): Q_l smoothed
    cross = np.sum(mass * np.log(quantized), axis=1)  # (c,)
    entropy = sums.entropy[candidates - 1] + _xlogx(last_bin + clipped)  # (c,)
    p_total = sums.total + _KL_EPS * (candidates - sums.nonzero[candidates] - lifted)  # (c,): Zp
    q_nonzero = np.sum(np.where(kept > 0.0, occupied, 0), axis=1)  # (c,)
    q_total = sums.counts[candidates] + _KL_EPS * (candidates - q_nonzero)  # (c,): Zq
    divergence = (entropy - cross) / p_total + np.log(q_total / p_total)  # (c,)
    return np.where(sums.counts[candidates] > 0.0, divergence, np.inf)  # no kept counts: q has no mass, refused


def mse_threshold(counts: np.ndarray, top: float, *, signed: bool, num_bits: int = 8) -> float:
    """The bin edge t minimising the expected squared error of a uniform quantiser on [-t, t] (signed) or [0, t].

    Values inside the range contribute the rounding noise step^2 / 12 (step = range / (2^bits - 1)); values
    above t are clipped and contribute (centre - t)^2, taking each bin's values at its centre.
    """
    if top == 0.0 or not counts.any():
        return 0.0
    num_bins = counts.size
    width = top / num_bins
    weights = counts.astype(np.float64)  # (num_bins,)
    centres = (np.arange(num_bins) + 0.5) * width
    thresholds = np.arange(1, num_bins + 1) * width  # candidate i keeps bins [0, i)

    def above(values: np.ndarray) -> np.ndarray:  # (num_bins,): sum over bins j >= i for candidate i = 1..num_bins
        return np.concatenate([np.cumsum(values[::-1])[::-1], [0.0]])[1:]

    step = (2.0 if signed else 1.0) * thresholds / (2**num_bits - 1)
    rounding = np.cumsum(weights) * step**2 / 12.0
    clipping = above(weights * centres**2) - 2.0 * thresholds * above(weights * centres) + thresholds**2 * above(weights)
    error = rounding + np.maximum(clipping, 0.0)  # max: cancellation can leave -1e-12 where nothing is clipped
    return float(thresholds[int(np.argmin(error))])


# ----------------------------------------------------------------------------------------- running the model


def collect_tensor_ranges(model_path: Path, feeds: Iterable[Feed], *, tensors: Sequence[str],
                          calibrator: RangeCalibrator, providers: Sequence[str] = ("CPUExecutionProvider",),
                          total: int | None = None) -> dict[str, tuple[float, float]]:
    """Run `feeds` one at a time through ONNX Runtime and fold the `tensors` activations into `calibrator`.

    The model is copied into a temporary folder (tempfile) with the requested tensors added as graph outputs
    (name-only ValueInfo: ONNX Runtime infers their types); weights go to one external data file when they exceed
    protobuf's 2 GiB. Each feed's outputs are handed to `calibrator.update` and dropped before the next feed, so
    memory does not grow with the number of feeds. Returns `calibrator.ranges()`.

    Folding runs on one worker thread, a sample behind ONNX Runtime (which releases the GIL while it computes), so
    binning overlaps the next inference; at most two samples' activations are alive at once, and they are folded
    in sample order, so the result equals the serial one.
    """
    model_path = Path(model_path)
    model = onnx.load(str(model_path))  # also loads external data, so the copy is self-contained
    names = list(dict.fromkeys(tensors))  # (K,) unique, order kept
    if not names:  # session.run([]) would return every graph output
        return calibrator.ranges()
    _check_tensor_names(model, names, model_path)
    initializers = {tensor.name for tensor in model.graph.initializer}
    input_names = [value.name for value in model.graph.input if value.name not in initializers]

    def fold(sample: int, outputs: list[np.ndarray]) -> None:
        for name, values in zip(names, outputs, strict=True):
            calibrator.update(name, values, sample=sample)

    options = ort.SessionOptions()
    # Idle intra-op threads would spin on the core the folding thread needs (measured ~15% slower with spinning).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    with tempfile.TemporaryDirectory(prefix="edgepack-calibration-") as folder, \
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="edgepack-fold") as folder_thread:
        session = ort.InferenceSession(str(save_augmented(model, names, Path(folder))), options,
                                       providers=list(providers))
        feed_iter = get_reporter().track(feeds, total=total, title=f"calibrating ({calibrator.name})")
        pending: Future[None] | None = None
        for sample, feed in enumerate(feed_iter):
            _check_feed(feed, input_names, sample)
            outputs = session.run(names, feed)  # K arrays, each (batch, ...) for this one feed
            if pending is not None:
                pending.result()  # in order, one sample behind; re-raises its NaN / Inf error here
            pending = folder_thread.submit(fold, sample, outputs)
            del outputs
        if pending is not None:
            pending.result()
        del session
    return calibrator.ranges()


def _activation_names(model: onnx.ModelProto) -> list[str]:
    """Graph inputs (not initializers) and top-level node outputs: the tensors ONNX Runtime can return."""
    initializers = {tensor.name for tensor in model.graph.initializer}
    inputs = [value.name for value in model.graph.input if value.name not in initializers]
    outputs = [output for node in model.graph.node for output in node.output if output]
    return inputs + outputs


def _check_tensor_names(model: onnx.ModelProto, names: Sequence[str], model_path: Path) -> None:
    known = _activation_names(model)
    known_set = set(known)
    for name in names:
        if name not in known_set:
            raise BadInputError(
                f"tensor '{name}' is not an activation of {model_path}{did_you_mean(name, known)}; "
                "pass graph input or node output names"
            )


def save_augmented(model: onnx.ModelProto, names: Sequence[str], folder: Path) -> Path:
    """Save `model` with `names` added as graph outputs into `folder`; the caller's model file is not touched."""
    existing = {value.name for value in model.graph.output}
    model.graph.output.extend(onnx.ValueInfoProto(name=name) for name in names if name not in existing)
    return save_onnx(model, folder / "augmented.onnx")


def _check_feed(feed: Feed, input_names: Sequence[str], sample: int) -> None:
    missing = [name for name in input_names if name not in feed]
    unknown = [name for name in feed if name not in input_names]
    if missing or unknown:
        raise BadInputError(
            f"calibration sample {sample} does not match the model inputs (missing: {missing or 'none'}, "
            f"unknown: {unknown or 'none'}); feed keys must be the ONNX input names {list(input_names)}"
        )
