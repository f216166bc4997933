"""The causal-lm family's checks and scores: the export check against PyTorch, the probe tasks, the memory plan.

Export check: on each check text, ONNX Runtime's prefill logits against PyTorch's (max |diff| within `atol`, and
the next-token argmax agreeing on at least 99% of positions); then on the first text, a prefill of its first half
and token-by-token decode of the rest through the cache, against PyTorch's logits of the whole text.

Scores (`task_report`), against the parent variant's outputs on the same tokens:
- perplexity = exp(mean NLL) over every predicted token of the held-out windows; `perplexity_ratio` vs the parent;
- next_token_agreement: share of teacher-forced positions whose argmax is the parent's;
- generation_agreement: share of identical tokens, position by position, over the greedy continuations (one early
  difference changes the rest, so this is low for any lossy variant: judge by the teacher-forced agreement);
- ttft_ms (prefill of a prompt until the first token), decode_tokens_per_s (single-token steps of the greedy runs),
  prefill_tokens_per_s (a `validate.sequence_length`-token prefill), all batch 1 on the probe's threads;
- peak_rss_mb_ctx<N>: VmHWM of a fresh process whose cache was filled to N tokens.

Memory plan: weight bytes (the graph's initializers), KV bytes per token from the config (layers x kv_heads x
head_dim x 2 x bytes per element of the cache), the measured peaks, a least-squares line peak = fixed + slope x
context through them, the arithmetic prediction (first measured peak + 2 x KV bytes x added tokens: ONNX Runtime
holds the past it is given and the present it returns at once) beside each measurement, and for each budget the
longest context the line says fits (capped at max_position_embeddings).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgepack.calibration_data import Feed, Sample
from edgepack.errors import BadInputError
from edgepack.exporters.onnx import ExportMismatchError

if TYPE_CHECKING:
    from edgepack.families.causal_lm import CausalLM

MIB = 2**20
KV_COPIES = 2  # past (input) and present (output) are alive together during a step
DECODE_STEPS = 8  # single-token steps after the cache is filled, in each memory measurement
MIN_AGREEMENT = 0.99


# ------------------------------------------------------------------------------------------------- export check


def check_decoder(family: CausalLM, onnx_path: Path, *, feeds: Sequence[Feed], atol: float | None) -> dict[str, Any]:
    """ONNX Runtime vs PyTorch on prefill and on cached decode; one ExportMismatchError listing every miss."""
    import torch

    from edgepack.runtime.decoding import KVSession, cpu_session

    if not feeds:
        raise BadInputError("the causal-LM export check needs at least one text sample")
    tolerance = atol if atol is not None else family.io.output("logits").atol
    model = family.load_torch().model
    kv = KVSession(cpu_session(onnx_path))
    worst, agree, tokens = 0.0, 0, 0
    reference: list[np.ndarray] = []
    for feed in feeds:
        ids = feed["input_ids"][0]
        with torch.no_grad():
            want = model(input_ids=torch.from_numpy(ids[None])).logits[0].numpy()  # (T, V)
        got, _ = kv.step(ids, kv.empty(), 0)
        assert got is not None
        worst = max(worst, float(np.abs(got - want).max()))
        agree += int((got.argmax(-1) == want.argmax(-1)).sum())
        tokens += len(ids)
        reference.append(want)
    decode = _decode_check(kv, feeds[0]["input_ids"][0], reference[0])
    result = {"logits": {"max_abs_diff": worst, "atol": tolerance, "next_token_agreement": agree / tokens,
                         "tokens": tokens, "texts": len(feeds)},
              "decode": {"max_abs_diff": decode[0], "steps": decode[1], "atol": tolerance}}
    bad = []
    if worst > tolerance:
        bad.append(f"prefill logits max |diff| {worst:.3g} (atol {tolerance:g})")
    if agree / tokens < MIN_AGREEMENT:
        bad.append(f"next-token agreement {agree / tokens:.3f} (at least {MIN_AGREEMENT})")
    if decode[0] > tolerance:
        bad.append(f"cached decode logits max |diff| {decode[0]:.3g} over {decode[1]} steps (atol {tolerance:g})")
    if bad:
        raise ExportMismatchError(f"{onnx_path.name}: ONNX Runtime disagrees with PyTorch on {len(feeds)} texts: "
                                  + "; ".join(bad) + "; report the model")
    return result


def _decode_check(kv: Any, ids: np.ndarray, want: np.ndarray) -> tuple[float, int]:
    """Prefill the first half, then one token per step; max |diff| against the full-sequence logits."""
    half = max(1, len(ids) // 2)
    got, past = kv.step(ids[:half], kv.empty(), 0)
    worst = float(np.abs(got - want[:half]).max())
    for position in range(half, len(ids)):
        got, past = kv.step(ids[position: position + 1], past, position)
        worst = max(worst, float(np.abs(got[0] - want[position]).max()))
    return worst, len(ids) - half


# --------------------------------------------------------------------------------------------------- the tasks


def probe_tasks(family: CausalLM, samples: Sequence[Sample], *, settings: Any) -> list[Any]:
    """The quality task and one memory task per planning context (each a fresh process)."""
    from edgepack.runtime.probe import ProbeTask

    ev = family.options.evaluation  # type: ignore[attr-defined]
    for what, tokens in (("evaluation.perplexity_window", ev.perplexity_window),
                         ("generation (prompt_tokens + new_tokens)", ev.prompt_tokens + ev.new_tokens),
                         ("validate.sequence_length", settings.sequence_length),
                         *((f"evaluation.contexts {c}", c) for c in ev.contexts)):
        family.check_context(tokens, what=what)
    stream = family.stream(samples)
    arrays: dict[str, np.ndarray] = {}
    for index, start in enumerate(range(0, len(stream), ev.perplexity_window)):
        window = stream[start: start + ev.perplexity_window]
        if len(window) >= 2:
            arrays[f"window{index:04d}"] = window
    prompts = [family.token_ids(s.text)[: ev.prompt_tokens] for s in samples[: ev.prompts]]  # type: ignore[union-attr]
    for index, prompt in enumerate(p for p in prompts if len(p)):
        arrays[f"prompt{index:04d}"] = prompt
    arrays["prefill"] = family.stream(samples, at_least=settings.sequence_length)[: settings.sequence_length]
    shape = {"kv_heads": family.decoder.kv_heads, "head_dim": family.decoder.head_dim}
    tasks = [ProbeTask("quality", "edgepack.runtime.decoding",
                       {"task": "quality", "new_tokens": ev.new_tokens, "shared_cache": True, **shape},
                       arrays)]
    ids = family.stream(samples, at_least=max(ev.contexts))
    for context in ev.contexts:
        decode = min(DECODE_STEPS, context - 1)
        tasks.append(ProbeTask(f"memory-{context}", "edgepack.runtime.decoding",
                               {"task": "memory", "context": context - decode, "chunk": ev.prefill_chunk,
                                "decode": decode, **shape}, {"ids": ids[:context]}))
    return tasks


# -------------------------------------------------------------------------------------------------- the report


def _quality_vs(quality: Any, parent: Any | None) -> dict[str, float]:
    if parent is None or parent.status != "ok":
        return {}
    ours, theirs = quality.arrays, parent.arrays
    out = {"perplexity_ratio": quality.metrics["perplexity"] / parent.metrics["perplexity"]}
    if ours["argmax"].shape == theirs["argmax"].shape:
        out["next_token_agreement"] = float(np.mean(ours["argmax"] == theirs["argmax"]))
    if ours["generated"].shape == theirs["generated"].shape:
        out["generation_agreement"] = float(np.mean(ours["generated"] == theirs["generated"]))
    return out


def task_report(family: CausalLM, results: Mapping[str, Any], reference: Mapping[str, Any] | None, *,
                model: Path) -> dict[str, Any]:
    """Metrics for report.json's `providers.<ep>.metrics`, the memory plan, and any task's error."""
    errors = {name: r.error for name, r in results.items() if r.status != "ok"}
    metrics: dict[str, float] = {}
    quality = results.get("quality")
    if quality is not None and quality.status == "ok":
        metrics.update({k: float(v) for k, v in quality.metrics.items()})
        metrics.update(_quality_vs(quality, (reference or {}).get("quality")))
    points = []
    for name, result in results.items():
        if name.startswith("memory-") and result.status == "ok":
            context = int(result.metrics["context"])
            metrics[f"peak_rss_mb_ctx{context}"] = result.memory_mb["peak"]
            parent = (reference or {}).get(name)
            if parent is not None and parent.status == "ok":
                metrics[f"peak_rss_ratio_ctx{context}"] = result.memory_mb["peak"] / parent.memory_mb["peak"]
            points.append((context, result))
    plan = memory_plan(family, model, points) if points else None
    return {"metrics": metrics, "memory_plan": plan, "errors": errors}


@dataclass(frozen=True)
class CacheGeometry:
    """The KV cache a graph takes, read from its past inputs (a distilled student's differs from its teacher's)."""

    names: tuple[str, ...]  # past_key_values.N.key / .value, in graph order
    kv_heads: int
    head_dim: int
    dtype: str

    @property
    def layers(self) -> int:
        return len(self.names) // 2

    @property
    def element_bytes(self) -> int:
        return int(np.dtype(self.dtype).itemsize)

    def bytes_per_token(self) -> int:
        """layers x kv_heads x head_dim x 2 (key and value) x bytes per element."""
        return self.layers * self.kv_heads * self.head_dim * 2 * self.element_bytes

    def empty(self) -> dict[str, np.ndarray]:
        return {name: np.zeros((1, self.kv_heads, 0, self.head_dim), self.dtype) for name in self.names}


def cache_geometry(model: Path, *, kv_heads: int, head_dim: int) -> CacheGeometry:
    """`model`'s cache inputs; symbolic head dims (a graph from another exporter) fall back to the given ones."""
    import onnx

    graph = onnx.load(str(model), load_external_data=False).graph
    past = [i for i in graph.input if i.name.startswith("past_key_values.")]
    dims = [d.dim_value if d.HasField("dim_value") else None for d in past[0].type.tensor_type.shape.dim]
    dtype = onnx.helper.tensor_dtype_to_np_dtype(past[0].type.tensor_type.elem_type)
    return CacheGeometry(tuple(i.name for i in past), kv_heads=dims[1] or kv_heads, head_dim=dims[3] or head_dim,
                         dtype=str(dtype))


def memory_plan(family: CausalLM, model: Path, points: Sequence[tuple[int, Any]]) -> dict[str, Any]:
    """Weights + KV arithmetic against the measured peaks; the longest context per budget."""
    from edgepack.runtime.fixed_shape import initializer_bytes

    cfg = family.decoder
    cache = cache_geometry(model, kv_heads=cfg.kv_heads, head_dim=cfg.head_dim)  # the variant's own (a teacher's)
    dtype, size, per_token = cache.dtype, cache.element_bytes, cache.bytes_per_token()
    points = sorted(points, key=lambda p: p[0])
    contexts = np.array([c for c, _ in points], dtype=np.float64)
    peaks = np.array([r.memory_mb["peak"] for _, r in points])
    if len(points) >= 2:
        slope, fixed = np.polyfit(contexts, peaks, 1)
    else:
        slope, fixed = KV_COPIES * per_token / MIB, peaks[0] - KV_COPIES * per_token * contexts[0] / MIB
    first_context, first_peak = contexts[0], peaks[0]
    rows = []
    for (context, result), peak in zip(points, peaks, strict=True):
        predicted = first_peak + KV_COPIES * per_token * (context - first_context) / MIB
        rows.append({"context": context, "peak_rss_mb": float(peak), "predicted_mb": float(predicted),
                     "cache_mb": result.metrics["cache_bytes"] / MIB,
                     "after_session_mb": result.memory_mb["after_session"],
                     "baseline_mb": result.memory_mb["baseline"]})
    fits = []
    for budget in family.options.evaluation.budgets_mb:  # type: ignore[attr-defined]
        longest = int((budget - fixed) // slope) if slope > 0 else cfg.max_positions
        fits.append({"budget_mb": float(budget), "longest_context": int(min(max(longest, 0), cfg.max_positions)),
                     "fits": bool(longest > 0)})
    return {
        "weight_bytes": int(initializer_bytes(model)), "kv_dtype": dtype, "kv_bytes_per_token": int(per_token),
        "kv_formula": (f"layers {cache.layers} x kv_heads {cache.kv_heads} x head_dim {cache.head_dim} x 2 (key, value) "
                       f"x {size} bytes = {per_token} bytes/token"),
        "fixed_mb": float(fixed), "measured_bytes_per_token": float(slope * MIB), "kv_copies_predicted": KV_COPIES,
        "points": rows, "fits": fits, "max_positions": cfg.max_positions,
        "method": ("peak RSS (VmHWM) of one fresh process per context: cache filled in prefill chunks of "
                   f"{family.options.evaluation.prefill_chunk} tokens, then up to {DECODE_STEPS} single-token "  # type: ignore[attr-defined]
                   "decode steps; longest context = (budget - fixed) / measured slope"),
    }
