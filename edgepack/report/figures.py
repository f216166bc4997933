"""Report figures as PNG bytes, drawn by matplotlib's Agg canvas (no pyplot, no display, no global state).

Three figures, each with a caption that says how its numbers were obtained (on this device, emulated, or
by static analysis), because an emulated latency or a static coverage must never pass for a device figure:
- trade-off: accuracy (cosine vs the reference) against latency (device rows) and against size (all rows);
- memory: per-row breakdown (runtime baseline, weights, prepacked weights, activations, other);
- coverage: share of nodes on each EP, with partitions and MatMul counts;
- sensitivity: the quantize stage's per-layer ranking (when it ranked layers).

>>> [figure.name for figure in report_figures(report)]          # doctest: +SKIP
['tradeoff', 'memory', 'coverage']
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from edgepack.report.model import ProviderResult, Report

HOW_TEXT = {
    "device": "measured on the device",
    "emulated": "emulated (a simulator or software device: QNN HTP's simulator on an x86 host, WebGPU on a "
                "software Vulkan adapter; numerics and node assignment are real, timings are NOT device timings)",
    "static-analysis": "static analysis (ONNX Runtime's usability checker: partitions from op support lists, "
                       "nothing was run)",
}
HOW_MARKER = {"device": "o", "emulated": "^", "static-analysis": "s"}
HOW_HATCH = {"device": "", "emulated": "//", "static-analysis": ".."}
HOW_STYLE = {"device": "circles, plain bars", "emulated": "triangles, hatched bars",
             "static-analysis": "squares, dotted bars"}
MEMORY_PARTS = (("runtime_baseline", "runtime baseline"), ("weights", "weights"), ("prepacked", "prepacked weights"),
                ("activations", "activations"), ("other", "other"))


@dataclass(frozen=True)
class ReportFigure:
    name: str  # file stem: figures/<name>.png
    png: bytes
    caption: str


@dataclass(frozen=True)
class _Row:
    variant: str
    ep: str
    size_mb: float
    entry: ProviderResult

    @property
    def label(self) -> str:
        return f"{self.variant} · {self.ep}"

    @property
    def how(self) -> str:
        return self.entry.how

    @property
    def breakdown(self) -> dict[str, Any]:
        return dict(getattr(self.entry.memory_mb, "breakdown", None) or {})


def _rows(report: Report) -> Iterator[_Row]:
    """Every (variant, EP) row that finished ("ok"), in report order."""
    for variant, data in report.variants.items():
        for ep, entry in data.providers.items():
            if entry.status == "ok":
                yield _Row(variant, ep, data.size_bytes / 1e6, entry)


def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    FigureCanvasAgg(figure).print_png(buffer)
    return buffer.getvalue()


def _hows(rows: list[_Row]) -> str:
    """'measured on this device' for one kind of row; with several, which marker / bar style is which."""
    found = sorted({row.how for row in rows}, key=list(HOW_TEXT).index)
    if len(found) == 1:
        return HOW_TEXT[found[0]]
    return "; ".join(f"{HOW_STYLE[how]}: {HOW_TEXT[how]}" for how in found)


def tradeoff_figure(report: Report) -> ReportFigure | None:
    """Cosine vs p50 latency (device rows only) and cosine vs model size (every measured row)."""
    rows = [row for row in _rows(report) if row.entry.metrics.get("cosine_mean") is not None]
    if not rows:
        return None
    figure = Figure(figsize=(10, 4.2), layout="constrained")
    by_latency, by_size = figure.subplots(1, 2, sharey=True)
    eps = sorted({row.ep for row in rows})
    colors = {ep: f"C{index % 10}" for index, ep in enumerate(eps)}
    for row in rows:
        cosine = row.entry.metrics["cosine_mean"]
        style = {"color": colors[row.ep], "marker": HOW_MARKER[row.how], "s": 20 + 1.5 * row.size_mb, "alpha": 0.75}
        if row.how == "device" and row.entry.latency_ms is not None:
            by_latency.scatter(row.entry.latency_ms.p50, cosine, **style)
            by_latency.annotate(row.variant, (row.entry.latency_ms.p50, cosine), fontsize=7,
                                xytext=(4, 4), textcoords="offset points")
        by_size.scatter(row.size_mb, cosine, label=row.ep, **style)
        by_size.annotate(row.variant, (row.size_mb, cosine), fontsize=7, xytext=(4, 4), textcoords="offset points")
    by_latency.set(xlabel="p50 latency, ms (device rows only)", ylabel="cosine vs the parent variant (mean)",
                   title="accuracy vs latency")
    by_size.set(xlabel="model size, MB", title="accuracy vs size (marker area ~ size)")
    handles, labels = by_size.get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=True))
    by_size.legend(unique.values(), unique.keys(), fontsize=7, loc="lower right")
    emulated = " Emulated rows are left out of the latency panel: their timings are not device timings." \
        if any(row.how == "emulated" for row in rows) else ""
    caption = (f"Size vs accuracy vs latency per variant and EP. Latency: batch 1, p50 of the timed runs; accuracy: "
               "mean cosine of the primary output vs the variant it was made from (its parent) on the CPU EP. "
               f"How obtained: {_hows(rows)}.{emulated}")
    return ReportFigure("tradeoff", _png(figure), caption)


def memory_figure(report: Report) -> ReportFigure | None:
    """Stacked bars per row: where the process memory goes (MiB)."""
    rows = [row for row in _rows(report) if row.breakdown]
    if not rows:
        return None
    figure = Figure(figsize=(10, 0.45 * len(rows) + 1.6), layout="constrained")
    axes = figure.subplots()
    for index, row in enumerate(rows):
        left = 0.0
        for part, (key, label) in enumerate(MEMORY_PARTS):
            value = row.breakdown.get(key) or 0.0
            axes.barh(index, value, left=left, color=f"C{part}", hatch=HOW_HATCH[row.how], edgecolor="white",
                      label=label if index == 0 else None)
            left += value
        peak = row.entry.memory_mb.peak if row.entry.memory_mb is not None else left
        axes.text(left, index, f" {peak:.0f} peak", va="center", fontsize=7)
    axes.set_yticks(range(len(rows)), [row.label for row in rows], fontsize=8)
    axes.invert_yaxis()
    axes.set(xlabel="MiB", title="memory breakdown per variant and EP")
    axes.legend(fontsize=7, loc="lower right")
    methods = rows[0].breakdown.get("methods", {})
    caption = ("Memory of a fresh process per row. Runtime baseline: RSS after importing onnxruntime and numpy; "
               f"weights: {methods.get('weights', 'graph initializers')}; prepacked weights and activations: "
               "ORT profiler's CPU-allocator figures where the session has an arena, else activations estimated "
               "from RSS growth over the first run (lean profiles, non-CPU EPs); other: the rest of the session's "
               f"RSS. How obtained: {_hows(rows)}.")
    return ReportFigure("memory", _png(figure), caption)


def coverage_figure(report: Report) -> ReportFigure | None:
    """Share of nodes each EP runs, annotated with partitions and MatMuls on the EP."""
    rows = [row for row in _rows(report) if row.entry.coverage is not None and row.entry.coverage.nodes_total]
    if not rows:
        return None
    figure = Figure(figsize=(10, 0.45 * len(rows) + 1.6), layout="constrained")
    axes = figure.subplots()
    for index, row in enumerate(rows):
        coverage = row.entry.coverage.model_dump()  # contract keys and the extras (matmul counts)
        share = 100 * coverage["nodes_on_ep"] / coverage["nodes_total"]
        axes.barh(index, share, color="C0" if row.how == "device" else "C1" if row.how == "emulated" else "C2",
                  hatch=HOW_HATCH[row.how], edgecolor="white")
        partitions = coverage.get("partitions")
        axes.text(share, index, f" {coverage['nodes_on_ep']}/{coverage['nodes_total']} nodes, "
                  f"{'?' if partitions is None else partitions} partition(s), MatMul "
                  f"{coverage.get('matmul_on_ep', 0)}/{coverage.get('matmul_total', 0)}", va="center", fontsize=7)
    axes.set_yticks(range(len(rows)), [f"{row.label} ({row.how})" for row in rows], fontsize=8)
    axes.invert_yaxis()
    axes.set(xlim=(0, 160), xlabel="% of nodes on the EP", title="EP coverage")
    caption = ("Nodes assigned to each EP (after ONNX Runtime's graph optimizations), partitions (each extra "
               "partition is a round trip through the CPU) and MatMul-type nodes on the EP. Runs read ORT's "
               "recorded graph assignment; static rows replay ORT's partitioning over the EP's op list and do not "
               f"check per-op caveats. How obtained: {_hows(rows)}.")
    return ReportFigure("coverage", _png(figure), caption)


def sensitivity_figure(report: Report) -> ReportFigure | None:
    """The quantize stage's per-layer ranking: output cosine with that one layer kept in float, and its gain."""
    quantization = report.quantization.model_dump() if report.quantization is not None else {}
    ranked = list(quantization.get("sensitivity_top") or [])
    if not ranked:
        return None
    budget = quantization.get("budget") or {}
    baseline = (budget.get("check_fidelity") or {}).get("cosine_mean")
    figure = Figure(figsize=(10, 0.32 * len(ranked) + 1.6), layout="constrained")
    axes = figure.subplots()
    gains = [float(layer["gain"]) for layer in ranked]
    axes.barh(range(len(ranked)), gains, color=["C3" if gain > 0 else "C7" for gain in gains])
    for index, layer in enumerate(ranked):
        axes.text(max(gains[index], 0), index, f" cosine {layer['cosine_mean']:.4f}", va="center", fontsize=7)
    axes.set_yticks(range(len(ranked)), [_layer_label(str(layer["node"])) for layer in ranked], fontsize=7)
    axes.invert_yaxis()
    axes.set(xlabel="gain in mean output cosine vs FP32 with this layer alone in float",
             title="per-layer INT8 sensitivity (most sensitive first)")
    axes.margins(x=0.25)
    samples = budget.get("check_samples")
    caption = ("Leave-one-out sensitivity from the quantize stage: each quantized layer kept in float on its own, the "
               f"rest INT8, scored by mean cosine of the primary output vs FP32 on {samples or 'the'} calibration "
               "samples; the bar is the gain over the all-INT8 model"
               + (f" (cosine {baseline:.4f})" if baseline is not None else "") +
               ". Static measurement on this host's CPU EP; the layers an accuracy budget would keep in float first.")
    return ReportFigure("sensitivity", _png(figure), caption)


def _layer_label(node: str) -> str:
    """'/encoder/layer.3/attention/self/query/MatMul_quant' -> 'layer.3/attention/self/query/MatMul_quant'."""
    parts = [part for part in node.split("/") if part and part not in ("encoder", "model")]
    label = "/".join(parts) or node
    return label if len(label) <= 60 else "…" + label[-59:]


def auto_figure(report: Report) -> ReportFigure | None:
    """`edgepack auto`: the trials and their Pareto front (drawn in `report/auto.py`)."""
    from edgepack.report.auto import pareto_figure

    drawn = pareto_figure(report)
    return None if drawn is None else ReportFigure("pareto", _png(drawn[0]), drawn[1])


def report_figures(report: Report) -> list[ReportFigure]:
    """Every figure the report has data for, in reading order."""
    figures = (auto_figure(report), tradeoff_figure(report), memory_figure(report), coverage_figure(report),
               sensitivity_figure(report))
    where = device_sentence(report)
    return [ReportFigure(f.name, f.png, f.caption + where) for f in figures if f is not None]


def device_sentence(report: Report) -> str:
    """' Device: ssh://pi@host (raspberrypi, Cortex-A76, int8 ISA ARM dot-product, onnxruntime 1.22).'"""
    device = report.device
    if device is None:
        return ""
    return (f" Device: {device.label} ({device.hostname}, {device.cpu}, int8 ISA {device.int8_isa}, onnxruntime "
            f"{device.onnxruntime}).")
