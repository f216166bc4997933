"""Static partition analysis for EPs this runtime cannot run (NNAPI off Android, CoreML off Apple).

onnxruntime.tools.mobile_helpers.usability_checker does the analysis: it replays ORT's partitioning
(`CreateSupportedPartitionNodeGroups`) over the op lists ORT ships for each EP and returns a `PartitioningInfo`
(supported nodes, partitions, unsupported ops). We call its functions rather than parse its log, prepare the
model the way ORT Mobile would see it (fixed shapes, then ORT's BASIC optimizations, then ONNX shape
inference), and count fallback nodes per op type, which the helper only gives as a set.

What it cannot see: per-op caveats (e.g. "only 2D Conv") are listed in `caveats`, not checked; so the figures
are an upper bound on what the real EP takes. The report labels them how = "static-analysis".
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import onnx
from onnxruntime.tools.mobile_helpers import usability_checker
from onnxruntime.tools.onnx_model_utils import optimize_model

from edgepack.errors import EdgepackError
from edgepack.runtime.coverage import coverage_from_counts
from edgepack.runtime.fixed_shape import make_shapes_fixed

#: EP -> the supported-op list ORT ships for it; CoreML is analysed as an ML Program (the format ORT now prefers).
CHECKERS = {
    "nnapi": "nnapi_supported_ops.md",
    "coreml": "coreml_supported_mlprogram_ops.md",
}


def _partitioning(model: onnx.ModelProto, ep: str) -> Any:
    if ep == "nnapi":
        return usability_checker.check_nnapi_partitions(model, require_fixed_input_sizes=True)
    return usability_checker.check_coreml_partitions(model, require_fixed_input_sizes=True,
                                                     config_filename=CHECKERS[ep])


def analyze_partitions(model_path: Path, *, ep: str, shapes: Mapping[str, Sequence[int]] | None,
                       workdir: Path) -> dict[str, Any]:
    """Coverage of `ep` ("nnapi" | "coreml") for the model pinned to `shapes`, in report.json's layout.

    `shapes=None` analyses the model as it is (dynamic inputs then count as unsupported for NNAPI).
    """
    if ep not in CHECKERS:
        raise EdgepackError(f"static analysis knows {', '.join(CHECKERS)}, not '{ep}'")
    with tempfile.TemporaryDirectory(prefix=f"static-{ep}-", dir=workdir) as scratch:
        source = Path(model_path)
        if shapes is not None:
            source = make_shapes_fixed(source, Path(scratch) / "fixed.onnx", shapes=shapes)
        optimized = Path(scratch) / "basic.onnx"
        # ORT Mobile partitions the BASIC-optimized graph (constant folding removes the shape subgraphs).
        optimize_model(source, optimized, use_external_initializers=True)
        model = onnx.shape_inference.infer_shapes(onnx.load(str(optimized)), strict_mode=True)
        if not model.graph.value_info:
            # Every tensor is a graph input or output (e.g. Gemm -> Relu): nothing for shape inference to add,
            # but the helper reads empty value_info as "inference was not run" and raises. Copies of the
            # outputs' value infos are what it would look up anyway.
            model.graph.value_info.extend(model.graph.output)
        info = _partitioning(model, ep)
    return _coverage(model, info, ep=ep)


def _coverage(model: onnx.ModelProto, info: Any, *, ep: str) -> dict[str, Any]:
    supported_ids = {id(node) for group in info.supported_groups for node in group}
    nodes = list(model.graph.node)  # the main graph; control-flow subgraphs are merged into `info` counts only
    supported = [n.op_type for n in nodes if id(n) in supported_ids]
    unsupported = [n.op_type for n in nodes if id(n) not in supported_ids]
    coverage = coverage_from_counts(supported, unsupported, partitions=info.num_partitions,
                                    method=f"static analysis: onnxruntime usability_checker, {CHECKERS[ep]}")
    coverage.update(
        unsupported_ops=sorted(info.unsupported_ops),
        nodes_dynamic_shape=info.nodes_unsupported_due_to_dynamic_input,
        caveats=info.supported_ops_checker.get_caveats(),
        suitability=info.suitability().name,  # ORT's own YES / MAYBE / NO verdict
    )
    return coverage
