"""Per-layer sensitivity and budgeted mixed precision.

Neither onnxruntime.quantization nor Optimum offers this for static QDQ (ORT's `qdq_loss_debug` compares
activations but does not choose a precision per layer), so it is ours. It is driven by two callables, so it
knows nothing about how a model is quantized:

- `build(excluded)` writes a QDQ model with the named weight nodes left in float and returns its path
  (the calibrated tensor ranges are reused: no recalibration per candidate);
- `score(path)` returns fidelity vs FP32 on held-out feeds ({"cosine_mean", "cosine_min", "sqnr_db"}).

Sensitivity of a layer = how much the output cosine recovers when that layer alone goes back to float
("leave one out"), so the ranking directly answers "which fallback buys the most". The fallback is greedy:
most sensitive first, until the budget holds or `max_fallback_layers` is reached, so the model stays as small
as the budget allows.

Fallback is to FP32, not weight-only INT8: onnxruntime (1.32) rewrites a weight DequantizeLinear -> MatMul into
MatMulNBits at session creation, and 8-bit MatMulNBits (block 32, or ORT's MatMulNBitsQuantizer with accuracy
level 4, i.e. dynamic INT8 activations) ran all-MiniLM-L6-v2 in 33-36 ms against 23 ms for FP32 on an AVX2 CPU
(cosine 0.9998 / 0.9996): a smaller file for a slower layer. A layer that must leave INT8 goes to float.

>>> scores = {frozenset(): 0.990, frozenset({"a"}): 0.996, frozenset({"b"}): 0.991}
>>> result = fit_budget(["a", "b"], build=lambda ex: ex, score=lambda p: {"cosine_mean": scores[p]},
...                     budget=QuantBudget(max_cosine_drop=0.005))
>>> result.excluded, result.met
(('a',), True)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from edgepack.errors import GateFailedError
from edgepack.reporter import get_reporter

Build = Callable[[frozenset[str]], Any]
Score = Callable[[Any], dict[str, float]]


@dataclass(frozen=True)
class QuantBudget:
    """Accuracy budget of the INT8 model vs FP32, measured on held-out calibration feeds."""

    max_cosine_drop: float | None = 0.005  # 1 - mean embedding cosine
    max_fallback_layers: int = 12

    def met(self, scores: dict[str, float]) -> bool:
        return self.max_cosine_drop is None or 1.0 - scores["cosine_mean"] <= self.max_cosine_drop


@dataclass(frozen=True)
class LayerSensitivity:
    node: str
    cosine_mean: float  # output cosine with this node alone in float
    gain: float  # cosine_mean - that of the fully quantized model


@dataclass
class FallbackResult:
    excluded: tuple[str, ...]
    scores: dict[str, float]
    met: bool
    sensitivity: list[LayerSensitivity] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)
    artifact: Any = None


def measure_sensitivity(candidates: Sequence[str], *, build: Build, score: Score,
                        baseline: float) -> list[LayerSensitivity]:
    """Leave-one-out sensitivity of every candidate node, most sensitive first."""
    out = []
    for node in get_reporter().track(candidates, total=len(candidates), title="per-layer sensitivity"):
        cosine = score(build(frozenset({node})))["cosine_mean"]
        out.append(LayerSensitivity(node, cosine, cosine - baseline))
    return sorted(out, key=lambda s: s.gain, reverse=True)


def fit_budget(candidates: Sequence[str], *, build: Build, score: Score, budget: QuantBudget,
               rank_always: bool = False) -> FallbackResult:
    """Quantize everything; if the budget fails, fall back the most sensitive layers one at a time.

    `rank_always`: measure the per-layer sensitivity even when the fully quantized model meets the budget (for the
    report; one build and score per candidate).
    """
    artifact = build(frozenset())
    scores = score(artifact)
    history = [{"excluded": [], **scores}]
    if budget.met(scores) or not candidates:
        ranking = (measure_sensitivity(candidates, build=build, score=score, baseline=scores["cosine_mean"])
                   if rank_always and candidates else [])
        return FallbackResult((), scores, budget.met(scores), ranking, history, artifact)
    ranking = measure_sensitivity(candidates, build=build, score=score, baseline=scores["cosine_mean"])
    excluded: list[str] = []
    for layer in ranking[: budget.max_fallback_layers]:
        excluded.append(layer.node)
        artifact = build(frozenset(excluded))
        scores = score(artifact)
        history.append({"excluded": list(excluded), **scores})
        if budget.met(scores):
            return FallbackResult(tuple(excluded), scores, True, ranking, history, artifact)
    return FallbackResult(tuple(excluded), scores, False, ranking, history, artifact)


def raise_unmet(result: FallbackResult, budget: QuantBudget) -> None:
    """Exit 3 with the best fidelity reached and the layers that were tried."""
    best = max(result.history, key=lambda h: h["cosine_mean"])
    tried = ", ".join(result.excluded) or "none"
    raise GateFailedError(
        f"quantize.budget.max_cosine_drop {budget.max_cosine_drop} not met: best cosine {best['cosine_mean']:.4f} "
        f"with {len(best['excluded'])} layer(s) in float (tried: {tried}); raise max_fallback_layers, relax the "
        "budget, or use another calibrator")
