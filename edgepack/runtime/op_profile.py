"""What ONNX Runtime actually runs: the graph after its optimizations, and time per op type from its profiler.

An INT8 model is only as fast as the kernels ORT ends up running. Whether its fusions (Attention,
SkipLayerNormalization, BiasGelu, MatMulIntegerToFloat, QDQ folding) matched is visible in the optimized graph that
`SessionOptions.optimized_model_filepath` writes, and where the time goes in the per-node events of ORT's profiler
(`SessionOptions.enable_profiling`). This module reads both; it adds no timing of its own.

>>> summarize_events([{"cat": "Node", "name": "a_kernel_time", "dur": 30, "args": {"op_name": "MatMul"}},
...                   {"cat": "Node", "name": "b_kernel_time", "dur": 10, "args": {"op_name": "Add"}}], runs=2)
{'MatMul': 0.015, 'Add': 0.005}
"""

from __future__ import annotations

import json
import tempfile
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


@dataclass(frozen=True)
class OpProfile:
    """One model under one session configuration: node counts by op type after ORT's optimizations, and ms per run
    by op type (mean over the profiled runs)."""

    nodes: dict[str, int]
    ms_per_op: dict[str, float]
    runs: int
    fused: dict[str, int] = field(default_factory=dict)   # fused / integer ops present (see FUSED_OPS)

    @property
    def total_ms(self) -> float:
        return sum(self.ms_per_op.values())

    def top(self, n: int = 6) -> list[tuple[str, float]]:
        return sorted(self.ms_per_op.items(), key=lambda kv: -kv[1])[:n]

    def describe(self, n: int = 6) -> str:
        """'MatMulIntegerToFloat 3.10 (36), Attention 1.20 (6), ...': ms per run and node count, costliest first."""
        return ", ".join(f"{op} {ms:.2f} ({self.nodes.get(op, 0)})" for op, ms in self.top(n))


#: Ops that show a fusion (or an integer kernel) took place; the rest are ONNX's plain ops.
FUSED_OPS = frozenset({
    "Attention", "QAttention", "MultiHeadAttention", "SkipLayerNormalization", "EmbedLayerNormalization",
    "QEmbedLayerNormalization", "BiasGelu", "FastGelu", "Gelu", "FusedMatMul", "MatMulIntegerToFloat",
    "DynamicQuantizeMatMul", "QLinearMatMul", "MatMulInteger", "QGemm", "MatMulNBits", "QOrderedAttention",
})


def summarize_events(events: Sequence[Mapping[str, Any]], *, runs: int) -> dict[str, float]:
    """ms per run by op type from ORT profiler events ("Node" events named '<node>_kernel_time', µs durations)."""
    totals: Counter[str] = Counter()
    for event in events:
        if event.get("cat") == "Node" and str(event.get("name", "")).endswith("_kernel_time"):
            totals[event["args"]["op_name"]] += float(event["dur"])
    return {op: us / 1e3 / max(runs, 1) for op, us in totals.most_common()}


def optimized_op_counts(model_path: Path, *, threads: int = 2) -> dict[str, int]:
    """Node count by op type of the graph ORT runs on the CPU EP (all optimizations, written back to disk)."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="edgepack-opt-") as tmp:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.log_severity_level = 3  # ORT warns that a serialized graph may hold host-specific fusions: it may
        options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
        graph = onnx.load(options.optimized_model_filepath, load_external_data=False).graph
        return dict(Counter(n.op_type for n in graph.node).most_common())


def profile_ops(model_path: Path, feed: Mapping[str, np.ndarray], *, threads: int = 2, warmup: int = 10,
                runs: int = 50) -> OpProfile:
    """Run `feed` `warmup` + `runs` times with ORT's profiler on (CPU EP); return op counts and ms per op type of the
    timed runs (the profile covers the whole session: events before the first timed `model_run` are dropped).

    The profiler adds a little overhead per node, so use these figures for where the time goes, and the harness's
    p50 (profiler off) for how long a run takes.
    """
    import onnxruntime as ort

    nodes = optimized_op_counts(model_path, threads=threads)
    with tempfile.TemporaryDirectory(prefix="edgepack-profile-") as tmp:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "profile")
        session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
        for _ in range(warmup + runs):
            session.run(None, dict(feed))
        events = json.loads(Path(session.end_profiling()).read_text())
    starts = sorted(e["ts"] for e in events if e.get("cat") == "Session" and e.get("name") == "model_run")
    first_timed = starts[warmup] if len(starts) > warmup else 0
    timed = [e for e in events if e.get("ts", 0) >= first_timed]
    return OpProfile(nodes, summarize_events(timed, runs=runs), runs,
                     {op: n for op, n in nodes.items() if op in FUSED_OPS})
