"""Memory guard: before calibration, validation and training, estimate the peak from the graph and the data shapes,
and refuse (one line, both numbers, the option that lowers it) when it exceeds the memory available.

Without it a model too big for the machine runs for minutes, then the kernel's OOM killer ends the process with
SIGKILL: no message, and on a shared machine perhaps another user's process instead. The estimate is ours (no
library predicts ONNX Runtime's or PyTorch's peak); its parts are:

- weights W: the initializers' bytes from their dims and types (external data is not read);
- activations A: every intermediate tensor's bytes for the largest input the stage will feed, from ONNX Runtime's
  symbolic shape inference (`onnxruntime.tools.symbolic_shape_infer`) on the graph with its input dims fixed;
- quantization (`quantization.quantize_static`) holds, while it calibrates, the loaded model, the prepared
  (SmoothQuant) model, a shape-inferred copy, the calibration copy and ONNX Runtime's session of it: measured 5.2 W
  above the process's footprint on a 256 MB MLP, so 6 W; every calibrated tensor is a session output, alive for
  two samples while the next one runs (3 A);
- validation runs each variant in a fresh process: ONNX Runtime's copy of the weights and its prepacked GEMM
  weights (measured 1.2-1.3 W for FP32: 1.5 W; 1.9 W for INT8 QDQ: 2 W) plus its arena (A) plus the interpreter
  and ORT themselves (`_PROCESS_BASE`);
- training: weights, gradients and the two AdamW moments of the student (at most 4 W_t), the frozen teacher
  (W_t), its hidden states for the losses, and twice the stored activations, s·b·h·(34 + 5·a·s/h) bytes per
  layer in 16-bit (Korthikanti et al. 2022, "Reducing activation recomputation"), twice that in fp32, about
  s·b·h·4 per layer plus one whole layer with gradient checkpointing.

Measured against real peaks it is within -15% .. +80% (docs/reliability.md has the table); it is a guard against
the order-of-magnitude mistake, not a profiler. Available memory is the tighter of the
cgroup limit (v2 `memory.max` - `memory.current`, v1 `limit_in_bytes` - `usage_in_bytes`) and /proc/meminfo's
MemAvailable. EDGEPACK_MEMORY_LIMIT_BYTES lowers the available figure to
your share of a shared machine; EDGEPACK_MEMORY_GUARD=off skips the check (the estimate is still recorded in the
manifest).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgepack.errors import BadInputError

#: RSS of a fresh probe process with numpy and onnxruntime imported, plus a session's fixed cost (measured
#: 61 MB + ~10 MB on onnxruntime 1.32; rounded up)
_PROCESS_BASE = 100 * 2**20
#: external tensors at most this big are read for shape inference (shape constants); larger ones never are
_SMALL_TENSOR = 4096


@dataclass(frozen=True)
class MemoryEstimate:
    """What a step will need on top of what the process already holds."""

    step: str
    parts: dict[str, int]  # name -> bytes
    lower_with: str  # the options that lower it
    notes: list[str] = field(default_factory=list)

    @property
    def peak_bytes(self) -> int:
        return sum(self.parts.values())

    def to_json(self) -> dict[str, Any]:
        return {"step": self.step, "estimated_peak_mb": round(self.peak_bytes / 2**20, 1),
                "parts_mb": {k: round(v / 2**20, 1) for k, v in self.parts.items()}, "notes": self.notes}


# ------------------------------------------------------------------------------------------------ availability


def available_memory() -> tuple[int, str]:
    """(bytes this process can still allocate, where that number comes from).

    EDGEPACK_MEMORY_LIMIT_BYTES caps it: on a machine shared with others, plan for your share, not for all of it.
    """
    candidates = [(_meminfo_available(), "MemAvailable")]
    cgroup = _cgroup_headroom()
    if cgroup is not None:
        candidates.append((cgroup, "the cgroup memory limit"))
    cap = os.environ.get("EDGEPACK_MEMORY_LIMIT_BYTES")
    if cap is not None:
        if not cap.isdigit():
            raise BadInputError(f"EDGEPACK_MEMORY_LIMIT_BYTES={cap!r} is not a number of bytes; unset it or give "
                                "an integer")
        candidates.append((int(cap), "EDGEPACK_MEMORY_LIMIT_BYTES"))
    return min(candidates)


def _meminfo_available() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import psutil

    return int(psutil.virtual_memory().available)


def _cgroup_headroom(root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """Limit minus usage of this process's cgroup, or None when it has no limit."""
    pairs = [(root / "memory.max", root / "memory.current"),  # cgroup v2 (unified)
             (root / "memory" / "memory.limit_in_bytes", root / "memory" / "memory.usage_in_bytes")]  # v1
    for limit_file, usage_file in pairs:
        try:
            limit, usage = limit_file.read_text().strip(), usage_file.read_text().strip()
        except OSError:
            continue
        if limit == "max" or not limit.isdigit() or int(limit) >= 2**60:  # v1 writes a huge number for none
            return None
        return max(0, int(limit) - int(usage))
    return None


def check(estimate: MemoryEstimate, *, available: tuple[int, str] | None = None) -> None:
    """Refuse `estimate` when it exceeds the available memory (unless EDGEPACK_MEMORY_GUARD=off)."""
    if os.environ.get("EDGEPACK_MEMORY_GUARD", "on").lower() in ("off", "0", "false", "no"):
        return
    free, source = available or available_memory()
    if estimate.peak_bytes <= free:
        return
    parts = ", ".join(f"{name} {size / 2**30:.2f}" for name, size in estimate.parts.items() if size)
    raise BadInputError(f"{estimate.step}: needs about {estimate.peak_bytes / 2**30:.2f} GiB ({parts} GiB) but "
                        f"{free / 2**30:.2f} GiB is available ({source}); {estimate.lower_with}, or free memory "
                        "(EDGEPACK_MEMORY_GUARD=off runs it anyway)")


# ------------------------------------------------------------------------------------------------ the graph


def weight_bytes(model_path: Path) -> int:
    """Bytes of the initializers, from dims and types; no weight is read."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    return sum(_tensor_bytes(t.data_type, t.dims) for t in model.graph.initializer)


def _is_quantized(model_path: Path) -> bool:
    import onnx

    ops = {node.op_type for node in onnx.load(str(model_path), load_external_data=False).graph.node}
    return any(op in ("QuantizeLinear", "DequantizeLinear", "MatMulNBits") or op.startswith("QLinear") or
               op.endswith("Integer") for op in ops)


def _tensor_bytes(elem_type: int, dims: Sequence[int]) -> int:
    import onnx

    if not elem_type:
        return 0
    itemsize = onnx.helper.tensor_dtype_to_np_dtype(elem_type).itemsize
    return itemsize * int(np.prod(list(dims), dtype=np.int64))


def activation_bytes(model_path: Path, feed: Mapping[str, np.ndarray]) -> tuple[int, int]:
    """(bytes of every intermediate tensor, how many had no size) for one run on `feed`'s shapes."""
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    model = _graph_with_small_constants(Path(model_path))
    for value in model.graph.input:
        if value.name in feed:
            shape = np.asarray(feed[value.name]).shape
            dims = value.type.tensor_type.shape.dim
            for axis, dim in enumerate(dims):
                if axis < len(shape):
                    dim.ClearField("dim_param")
                    dim.dim_value = shape[axis]
    try:
        inferred = SymbolicShapeInference.infer_shapes(model, auto_merge=True, guess_output_rank=True)
    except Exception:  # custom ops or shapes it cannot follow: no activation estimate rather than no check
        return 0, len(model.graph.node)
    total, unknown = 0, 0
    for value in [*inferred.graph.value_info, *inferred.graph.output]:
        tensor = value.type.tensor_type
        dims = tensor.shape.dim if tensor.HasField("shape") else []
        if tensor.HasField("shape") and all(d.HasField("dim_value") for d in dims):
            total += _tensor_bytes(tensor.elem_type, [d.dim_value for d in dims])
        else:
            unknown += 1
    return total, unknown


def _graph_with_small_constants(path: Path) -> Any:
    """The graph with its small external tensors read in (shape inference needs shape constants)."""
    import onnx
    from onnx.external_data_helper import load_external_data_for_tensor

    from edgepack.onnx_files import check_external_data

    model = onnx.load(str(path), load_external_data=False)
    check_external_data(model, path)
    for tensor in model.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL and _tensor_bytes(tensor.data_type,
                                                                              tensor.dims) <= _SMALL_TENSOR:
            load_external_data_for_tensor(tensor, str(path.parent))
            tensor.data_location = onnx.TensorProto.DEFAULT
            del tensor.external_data[:]
    return model


# ------------------------------------------------------------------------------------------------ the steps


def estimate_calibration(model_path: Path, feed: Mapping[str, np.ndarray]) -> MemoryEstimate:
    """Static INT8 calibration of `model_path` on inputs as large as `feed` (one sample at a time)."""
    weights = weight_bytes(model_path)
    activations, unknown = activation_bytes(model_path, feed)
    notes = [f"{unknown} tensors of unknown size not counted"] if unknown else []
    shape = {k: list(np.asarray(v).shape) for k, v in feed.items()}
    return MemoryEstimate(f"quantize ({Path(model_path).name}, calibration inputs {shape})",
                          {"weights x6": 6 * weights, "activations x3": 3 * activations},
                          "lower data.max_length (edgepack quantize --max-length): the activations scale with it; "
                          "the weights' share needs a larger machine", notes)


def estimate_inference(model_paths: Sequence[Path], feed: Mapping[str, np.ndarray]) -> MemoryEstimate:
    """Validation: each variant in its own process, one at a time: the largest of them."""
    worst: tuple[int, dict[str, int], str] | None = None
    for path in model_paths:
        weights = weight_bytes(path)
        activations, _ = activation_bytes(path, feed)
        # ORT keeps a float weight and its prepacked GEMM copy (measured 1.2-1.3 W); an INT8 QDQ weight also
        # its dequantized or requantized form (measured 1.9 W)
        factor = 2.0 if _is_quantized(path) else 1.5
        parts = {"process": _PROCESS_BASE, f"weights x{factor:g}": int(factor * weights), "activations": activations}
        if worst is None or sum(parts.values()) > sum(worst[1].values()):
            worst = (sum(parts.values()), parts, Path(path).parent.name or Path(path).name)
    assert worst is not None
    shape = {k: list(np.asarray(v).shape) for k, v in feed.items()}
    return MemoryEstimate(f"validate ({worst[2]}, inputs {shape})", worst[1],
                          "lower validate.sequence_length and data.max_length (edgepack validate "
                          "--sequence-length)")


def estimate_training(teacher_dir: Path, *, batch_size: int, max_length: int, student_layers: int | None,
                      precision: str, gradient_checkpointing: bool, step: str = "distill") -> MemoryEstimate:
    """Distillation (or pruning's recovery training) of a student no larger than the teacher in `teacher_dir`."""
    teacher = sum(p.stat().st_size for p in Path(teacher_dir).glob("*.safetensors"))
    config = _read_config(Path(teacher_dir))
    hidden = int(config.get("hidden_size", config.get("n_embd", 768)))
    heads = int(config.get("num_attention_heads", config.get("n_head", 12)))
    layers = int(config.get("num_hidden_layers", config.get("n_layer", 12)))
    student = student_layers or layers
    s, b = max_length, batch_size
    per_layer = s * b * hidden * (34 + 5 * heads * s / hidden) * (1 if precision in ("bf16", "fp16") else 2)
    # checkpointing keeps each layer's input and recomputes one layer at a time during the backward pass
    stored = (s * b * hidden * 4 * student + per_layer) if gradient_checkpointing else per_layer * student
    teacher_states = (layers + 1) * s * b * hidden * 4  # the teacher's hidden states, kept for the losses
    # x2: the backward pass's activation gradients, loss intermediates and allocator slack (measured 1.5-2.6x the
    # formula alone on all-MiniLM-L6-v2 distilled to 3 layers; docs/reliability.md)
    activations = 2 * stored + teacher_states
    return MemoryEstimate(
        f"{step} (teacher {teacher / 2**20:.0f} MB, {student} student layers, batch {b} x {s} tokens)",
        # the student is at most the teacher; its gradients and AdamW moments scale with the layers it trains
        {"teacher": teacher, "student": teacher, "grads and AdamW": 3 * teacher * student // max(layers, 1),
         "activations": int(activations)},
        f"lower {step}.batch_size or {step}.max_length, or set {step}.gradient_checkpointing: true"
        if step == "distill" else f"lower {step}.recovery_batch_size or {step}.max_length")


def _read_config(folder: Path) -> dict[str, Any]:
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}
