"""How much of a model an execution provider (EP) really runs: nodes on the EP, partitions, what fell back.

ONNX Runtime does the partitioning; this module only counts. Two sources, one result layout:
- a live session with `session.record_ep_graph_assignment_info` = "1": `get_provider_graph_assignment_info()`
  lists, per assigned subgraph, its EP and its nodes *after* graph optimization (fusions included), so the
  numbers describe the graph that actually runs (`coverage_from_assignment`);
- static analysis (NNAPI / CoreML where the runtime lacks the EP): `static_analysis.py` fills the same keys.

The counting of a live session is `probe_child.coverage_from_assignment` (the child runs on remote devices and must
stand alone); this module re-exports it and adds the static-analysis entry point.

>>> cov = coverage_from_assignment([("QNNExecutionProvider", ["MatMul", "Add"]), ("CPUExecutionProvider", ["Erf"]),
...                                 ("QNNExecutionProvider", ["MatMul"])], target="QNNExecutionProvider")
>>> cov["nodes_on_ep"], cov["nodes_total"], cov["partitions"], cov["fallback_ops"], cov["matmul_on_ep"]
(3, 4, 2, {'Erf': 1}, 2)
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Any

# The count of a live session lives in the standalone probe child (it runs on remote devices too); one copy.
from edgepack.runtime.probe_child import (
    ASSIGNMENT_METHOD,
    KERNEL_EPS,
    MATMUL_OPS,
    Assignment,
    coverage_counts,
    coverage_from_assignment,
    session_assignment,
)

__all__ = ["ASSIGNMENT_METHOD", "KERNEL_EPS", "MATMUL_OPS", "Assignment", "coverage_fraction",
           "coverage_from_assignment", "coverage_from_counts", "session_assignment"]


def coverage_from_counts(supported: Iterable[str], unsupported: Iterable[str], *, partitions: int,
                         method: str) -> dict[str, Any]:
    """The same layout from op-type lists of supported / unsupported nodes (static analysis)."""
    return coverage_counts(Counter(supported), Counter(unsupported), partitions=partitions, method=method)


def coverage_fraction(coverage: dict[str, Any], *, matmul: bool = False) -> float | None:
    """nodes_on_ep / nodes_total (or the MatMul share); None when there is nothing to count."""
    on, total = ("matmul_on_ep", "matmul_total") if matmul else ("nodes_on_ep", "nodes_total")
    return coverage[on] / coverage[total] if coverage.get(total) else None
