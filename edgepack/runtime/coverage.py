"""How much of a model an execution provider (EP) really runs: nodes on the EP, partitions, what fell back.

ONNX Runtime does the partitioning; this module only counts. Two sources, one result layout:
- a live session with `session.record_ep_graph_assignment_info` = "1": `get_provider_graph_assignment_info()`
  lists, per assigned subgraph, its EP and its nodes *after* graph optimization (fusions included), so the
  numbers describe the graph that actually runs (`coverage_from_assignment`);
- static analysis (NNAPI / CoreML where the runtime lacks the EP): `static_analysis.py` fills the same keys.

Stdlib only: the probe child imports this next to onnxruntime and numpy, and nothing else may inflate its memory.

>>> cov = coverage_from_assignment([("QNNExecutionProvider", ["MatMul", "Add"]), ("CPUExecutionProvider", ["Erf"]),
...                                 ("QNNExecutionProvider", ["MatMul"])], target="QNNExecutionProvider")
>>> cov["nodes_on_ep"], cov["nodes_total"], cov["partitions"], cov["fallback_ops"], cov["matmul_on_ep"]
(3, 4, 2, {'Erf': 1}, 2)
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

#: Op types that do a matrix multiply (plain, fused by ORT, or quantized). ORT's CPU fusions turn MatMul+Add
#: into Gemm / FusedMatMul, so counting "MatMul" alone would undercount what stayed on the CPU.
MATMUL_OPS = frozenset({
    "MatMul", "Gemm", "FusedMatMul", "MatMulInteger", "QLinearMatMul", "MatMulNBits", "DynamicQuantizeMatMul",
    "MatMulIntegerToFloat", "QGemm", "FusedGemm",
})

ASSIGNMENT_METHOD = "onnxruntime graph assignment (session.record_ep_graph_assignment_info), optimized graph"

#: EPs that run node by node with their own kernels: ORT lists each of their nodes as its own "subgraph", so
#: the subgraph count says nothing about partitions. Compiling EPs (QNN, TensorRT, NNAPI, CoreML) list one
#: subgraph per compiled partition.
KERNEL_EPS = frozenset({"CPUExecutionProvider", "CUDAExecutionProvider", "ROCMExecutionProvider",
                        "DmlExecutionProvider", "XnnpackExecutionProvider"})

#: (EP name, op types of the nodes in that subgraph), one item per assigned subgraph, in ORT's order.
Assignment = Sequence[tuple[str, Sequence[str]]]


def session_assignment(session: Any) -> list[tuple[str, list[str]]] | None:
    """(ep_name, [op_type, ...]) per subgraph of a session created with assignment recording on.

    None with an onnxruntime older than 1.32, which has no `get_provider_graph_assignment_info`.
    """
    if not hasattr(session, "get_provider_graph_assignment_info"):
        return None
    return [(subgraph.ep_name, [node.op_type for node in subgraph.get_nodes()])
            for subgraph in session.get_provider_graph_assignment_info()]


def coverage_from_assignment(assignment: Assignment, *, target: str) -> dict[str, Any]:
    """Coverage of `target` (an ORT EP name) in report.json's layout; {} when ORT recorded no nodes
    (it records none for ORT-format models).

    partitions: subgraphs assigned to `target` (each is one compiled graph on an NPU; every extra one is a
    round trip through the CPU). For a kernel EP: 1 when it runs every node, else None (unknown without the
    graph's edges). fallback_ops: op type -> count of nodes that ran on any other EP.
    """
    on_target: Counter[str] = Counter()
    elsewhere: Counter[str] = Counter()
    partitions = 0
    for ep_name, op_types in assignment:
        if ep_name == target:
            partitions += 1
            on_target.update(op_types)
        else:
            elsewhere.update(op_types)
    if not on_target and not elsewhere:
        return {}
    if target in KERNEL_EPS:
        return _coverage(on_target, elsewhere, partitions=None if elsewhere else 1, method=ASSIGNMENT_METHOD)
    return _coverage(on_target, elsewhere, partitions=partitions, method=ASSIGNMENT_METHOD)


def coverage_from_counts(supported: Iterable[str], unsupported: Iterable[str], *, partitions: int,
                         method: str) -> dict[str, Any]:
    """The same layout from op-type lists of supported / unsupported nodes (static analysis)."""
    return _coverage(Counter(supported), Counter(unsupported), partitions=partitions, method=method)


def _coverage(on_target: Counter[str], elsewhere: Counter[str], *, partitions: int | None, method: str) -> dict[str, Any]:
    nodes_on_ep, nodes_total = sum(on_target.values()), sum(on_target.values()) + sum(elsewhere.values())
    matmul_on_ep = sum(count for op, count in on_target.items() if op in MATMUL_OPS)
    matmul_total = matmul_on_ep + sum(count for op, count in elsewhere.items() if op in MATMUL_OPS)
    return {
        "nodes_on_ep": nodes_on_ep,
        "nodes_total": nodes_total,
        "partitions": partitions,
        "fallback_ops": dict(sorted(elsewhere.items(), key=lambda item: (-item[1], item[0]))),
        "matmul_on_ep": matmul_on_ep,
        "matmul_total": matmul_total,
        "method": method,
    }


def coverage_fraction(coverage: dict[str, Any], *, matmul: bool = False) -> float | None:
    """nodes_on_ep / nodes_total (or the MatMul share); None when there is nothing to count."""
    on, total = ("matmul_on_ep", "matmul_total") if matmul else ("nodes_on_ep", "nodes_total")
    return coverage[on] / coverage[total] if coverage.get(total) else None
