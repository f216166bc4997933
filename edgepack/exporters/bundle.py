"""Embedded and mobile deliverables: from a final .onnx, everything an app or firmware build takes unchanged.

A bundle folder holds (paths relative to it; `fixed/` only when fixed shapes were asked for):

    model.ort                             ORT format model (onnxruntime's converter, see `ort_format`)
    required_operators_and_types.config   ops + types of the optimized .ort, for a reduced ORT build
    model_data.h / model_data.c           the .ort bytes as an aligned const C array, its size and sha256
    CMakeLists.snippet.cmake              `<prefix>_add_to_target(tgt)` adds model_data.c to a CMake target
    test_data_set_N/input_K.pb, output_K.pb   golden vectors, ONNX test layout (onnx_test_runner reads it)
    fixed/...                             the same for the fixed-shape variant (symbols `<prefix>_fixed_*`)
    bundle.json                           "kind": "edgepack-bundle", I/O, quantization params, tolerances, sha256s
    manifest.json                         the stage manifest (runner.run_stage): config, inputs, times

ONNX Runtime does the heavy lifting: conversion, the operator config, and the golden outputs, which come from the
*.ort* model run by ORT's CPU EP (what the target loads, not the .onnx). onnx's `numpy_helper` writes the vectors.
Our own code: the tolerance rule here, the C sources (`c_sources`) and the check (`verify`). The folder itself
(temporary name, manifest, swap) is the stage runner's, like every other stage's.

Golden-vector tolerance, per output, as an absolute bound on |output - golden| (rtol 0), with
peak = max |golden| of that output over all vectors:
- float outputs of a float model: atol = max(1e-5, 1e-4 * peak). The target runs the same graph with other
  kernels (NEON vs AVX, other thread counts, other accumulation order): fp32 sums of K terms drift by about
  sqrt(K) * 6e-8 relative, ~1e-5 for K = 4096, so 1e-4 of the output's scale leaves 10x room yet catches a wrong
  kernel, layout or weight at once. The 1e-5 floor covers outputs that are all near zero. float16/bfloat16
  outputs use 1e-2 and a 1e-3 floor (their epsilon is ~1e-3).
- float outputs of a quantized model (QDQ, QLinear*, *Integer ops): atol = max(1e-5, 0.1 * peak, 2 * s) with s
  the scale of the DequantizeLinear that produces the output, if any. Integer kernels differ between CPUs and
  between graphs (u8s8 vs s8s8, VNNI vs SDOT, requantization ties), and one intermediate that rounds one step
  the other way is amplified by later layers: on all-MiniLM-L6-v2 INT8, the dynamic- and fixed-shape .ort of the
  same model on the same CPU differ by 7.6% of peak at one padded position (0.446 of 5.9), 0 everywhere else.
  10% of the range admits that, while a wrong model, weight, input order or kernel is off by O(peak).
  This is a deployment check (right bytes, right kernels), not an accuracy check: that is `edgepack validate`.
- integer outputs: exact (indices, ids), except 8-bit outputs of a quantized model: max(1, 0.1 * (max - min)),
  the same rule in quantization steps.
- bool and string outputs: exact.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from edgepack import __version__
from edgepack.artifacts import content_hash, sha256_file, write_json
from edgepack.calibration_data import Feed
from edgepack.errors import BadInputError, EdgepackError
from edgepack.exporters.c_sources import write_c_sources
from edgepack.exporters.ort_format import (
    REPLAY_OPTION,
    check_conversion_options,
    convert_to_ort,
    make_shapes_fixed,
    ort_session,
    read_operator_config,
)
from edgepack.exporters.verify import DESCRIPTION, KIND, max_error, read_tensors, verify_bundle
from edgepack.onnx_files import external_data_files, load_onnx_checked, model_digest
from edgepack.reporter import get_reporter
from edgepack.runner import StageResult, run_stage

FORMAT_VERSION = 2  # 1: the description was manifest.json, with a creation time
#: FlatBuffers addresses the .ort with 32-bit offsets: an ORT-format model holds at most 2 GiB (not the external
#: data rule of `onnx_files`, which the .ort cannot use)
ORT_FORMAT_LIMIT_BYTES = 2**31
#: room for what the .ort adds around the weights (node and type tables, alignment)
ORT_FORMAT_MARGIN_BYTES = 2**26
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_QUANT_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulNBits", "QAttention",
              "DynamicQuantizeMatMul", "QGemm", "QOrderedMatMul"}
TOLERANCE_RULE = ("atol per output, rtol 0; float model: max(1e-5, 1e-4*peak) (fp16: max(1e-3, 1e-2*peak)); "
                  "quantized model: max(1e-5, 0.1*peak, 2*output DequantizeLinear scale); integers exact, "
                  "8-bit outputs of a quantized model max(1, 0.1*(max-min)); peak = max|golden| over all vectors")


@dataclass(frozen=True)
class BundleOptions:
    """How to build a bundle. Checked when built; nothing is adjusted silently.

    optimization_style: "Fixed" (optimizations baked in; CPU, XNNPACK, QNN) or "Runtime" (NNAPI, CoreML:
    optimizations saved for replay, which verify and the app enable with `session.enable_saved_runtime_optimizations`).
    alignment: bytes the C array is aligned to; a power of two, 8..4096 (FlatBuffers reads 8-byte scalars in place).
    symbol_prefix: C identifier prefix: `<prefix>_data`, `<prefix>_size`, `<prefix>_sha256`.
    fixed_shapes: symbolic dim -> size for a fixed-shape variant in `fixed/` (NPUs), e.g. {"batch": 1, "sequence": 128}.
    target_platform: "arm" (phones, MCUs) or "amd64".
    """

    optimization_style: str = "Fixed"
    alignment: int = 64
    symbol_prefix: str = "edgepack_model"
    fixed_shapes: dict[str, int] | None = None
    target_platform: str = "arm"

    def __post_init__(self) -> None:
        check_conversion_options(optimization_style=self.optimization_style, target_platform=self.target_platform)
        if isinstance(self.alignment, bool) or not isinstance(self.alignment, int) or \
                not 8 <= self.alignment <= 4096 or self.alignment & (self.alignment - 1):
            raise BadInputError(f"alignment {self.alignment!r}: use a power of two from 8 to 4096 (default 64)")
        if not _IDENTIFIER.fullmatch(self.symbol_prefix):
            raise BadInputError(f"symbol prefix '{self.symbol_prefix}' is not a C identifier; use letters, digits "
                                "and '_', not starting with a digit (e.g. my_model)")
        if self.fixed_shapes is not None and not self.fixed_shapes:
            raise BadInputError("fixed_shapes is empty; give at least one dim, e.g. {'batch': 1}, or None")


# ---------------------------------------------------------------------------------------------------- building


def make_bundle(model_path: Path, out_dir: Path | None = None, *, feeds: Sequence[Feed],
                options: BundleOptions = BundleOptions(), validated: Mapping[str, Any] | None = None,
                force: bool = False, root: Path | None = None) -> StageResult:
    """The bundle stage: `build_bundle` run by the stage runner into `out_dir` (or `root/bundle-<hash>`).

    Its key covers the model's sha256, the options, `validated` and the golden-vector feeds, so the same inputs
    reuse the folder; another edgepack folder at `out_dir` is replaced atomically, a foreign one only with `force`.
    """
    model_path = Path(model_path)
    if out_dir is not None and Path(out_dir).exists() and \
            model_path.resolve().is_relative_to(Path(out_dir).resolve()):
        raise BadInputError(f"{out_dir}: the model {model_path} lies inside the output folder, which the bundle "
                            "replaces; choose another output folder")
    feeds = list(feeds)
    feeds_key = content_hash([{k: [str(v.dtype), list(v.shape), hashlib.sha256(np.ascontiguousarray(v)).hexdigest()]
                               for k, v in sorted(f.items())} for f in feeds])
    config = {**asdict(options), "validated": dict(validated or {})}
    inputs = {"model": model_digest(model_path), "feeds": feeds_key}
    return run_stage("bundle", config, inputs,
                     lambda tmp: _summary(build_bundle(model_path, tmp, feeds=feeds, options=options,
                                                       validated=validated)),
                     folder=out_dir, root=root, replace_foreign=force)


def _summary(description: dict) -> dict:
    return {"variants": list(description["variants"]), "files": len(description["files"]),
            "ort_sha256": {name: v["c_array"]["sha256"] for name, v in description["variants"].items()}}


def build_bundle(model_path: Path, folder: Path, *, feeds: Sequence[Feed], options: BundleOptions = BundleOptions(),
                 validated: Mapping[str, Any] | None = None) -> dict:
    """Build the bundle of `model_path` into `folder` (the stage runner's temporary folder), verify it from its own
    files, and return its description (also written as bundle.json).

    `feeds` are real evaluation inputs (one golden vector each; with fixed shapes they must have the fixed shape).
    `validated` records which EPs the caller validated and how (e.g. report.json's providers), stored as given.
    A full disk is a one-line BadInputError; the runner removes the temporary folder, so nothing is left behind.
    """
    model_path, folder = Path(model_path), Path(folder)
    model = _load_model(model_path)
    fixed_model = make_shapes_fixed(model, options.fixed_shapes, label=str(model_path)) \
        if options.fixed_shapes else None
    feeds = list(feeds)
    _check_feeds(fixed_model or model, feeds, label=str(model_path), fixed=fixed_model is not None)
    _check_outputs_are_tensors(model, label=str(model_path))
    if validated is not None and not isinstance(validated, Mapping):
        raise BadInputError(f"validated must be a dict (EP name -> how it was validated), not {type(validated).__name__}")
    try:
        return _build(model_path, folder, model=model, fixed_model=fixed_model, feeds=feeds, options=options,
                      validated=dict(validated or {}))
    except OSError as err:
        where = f" ({err.filename})" if err.filename else ""
        raise BadInputError(f"writing the bundle failed: {err.strerror or err}{where}; free disk space or choose "
                            "another output folder (nothing was left behind)") from err


def fixed_text_shape(model_path: Path, fixed_shapes: Mapping[str, int]) -> tuple[int, int]:
    """(batch, sequence) of the first input once `fixed_shapes` are applied: text feeds are padded to it."""
    model = load_onnx_checked(Path(model_path))
    # only the inputs matter here: a graph of them alone, so no weight (inline or external data) is touched
    inputs = onnx.helper.make_model(onnx.helper.make_graph([], "inputs", _graph_inputs(model), []),
                                    opset_imports=model.opset_import, ir_version=model.ir_version)
    fixed = make_shapes_fixed(inputs, dict(fixed_shapes), label=str(model_path))
    value = _graph_inputs(fixed)[0]
    dims = value.type.tensor_type.shape.dim
    if len(dims) != 2 or not all(d.HasField("dim_value") for d in dims):
        raise BadInputError(f"{model_path}: text data needs fixed (batch, sequence) inputs, input '{value.name}' "
                            f"has {len(dims)} dims after fixing {dict(fixed_shapes)}; pass arrays in an .npz")
    return dims[0].dim_value, dims[1].dim_value


def widen_integers(feed: Feed, model_path: Path) -> Feed:
    """Tokenizers give int32 ids; a model taking int64 gets them widened (lossless). Other dtypes stay as given."""
    model = load_onnx_checked(Path(model_path))
    out = dict(feed)
    for value in _graph_inputs(model):
        want = _np_dtype(value)
        if value.name in out and out[value.name].dtype != want and out[value.name].dtype.kind in "iu" \
                and want.kind in "iu" and np.can_cast(out[value.name].dtype, want, casting="safe"):
            out[value.name] = out[value.name].astype(want)
    return out


def _load_model(path: Path) -> onnx.ModelProto:
    """Checked model with its external data loaded (the .ort holds every weight; FlatBuffers caps it at 2 GB)."""
    from onnx.external_data_helper import load_external_data_for_model, uses_external_data

    model = load_onnx_checked(path)
    # decided from the file sizes, before the weights are read into memory (a 10 GB model would be read for nothing)
    on_disk = path.stat().st_size + sum(f.stat().st_size for f in external_data_files(path))
    if on_disk >= ORT_FORMAT_LIMIT_BYTES - ORT_FORMAT_MARGIN_BYTES:
        raise _too_large(path, on_disk)
    if any(uses_external_data(init) for init in model.graph.initializer):
        load_external_data_for_model(model, str(path.parent))
    if model.ByteSize() >= ORT_FORMAT_LIMIT_BYTES - ORT_FORMAT_MARGIN_BYTES:
        raise _too_large(path, model.ByteSize())
    return model


def _too_large(path: Path, size: int) -> BadInputError:
    return BadInputError(f"{path}: {size / 2**30:.2f} GiB with its weights; an ORT format model is one FlatBuffer "
                         "(32-bit offsets), at most 2 GiB, with no external data — quantize it first (edgepack "
                         "quantize: INT8 weights are a quarter of FP32) or ship the .onnx with its .data file, "
                         "which ONNX Runtime loads as it is")


def _graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    initializers = {init.name for init in model.graph.initializer}
    return [value for value in model.graph.input if value.name not in initializers]


def _np_dtype(value: onnx.ValueInfoProto) -> np.dtype:
    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type))


def _check_feeds(model: onnx.ModelProto, feeds: list[Feed], *, label: str, fixed: bool) -> None:
    """Every feed names each model input once, with its dtype and rank, and its fixed dims (all, when `fixed`)."""
    if not feeds:
        raise BadInputError(f"{label}: no feeds for the golden vectors; pass at least one real evaluation input")
    inputs = _graph_inputs(model)
    names = [value.name for value in inputs]
    for index, feed in enumerate(feeds):
        extra = sorted(set(feed) - set(names))
        if extra:
            raise BadInputError(f"feed {index}: '{extra[0]}' is not a model input (inputs: {', '.join(names)})")
        for value in inputs:
            _check_feed_array(value, feed, index=index, fixed=fixed)


def _check_feed_array(value: onnx.ValueInfoProto, feed: Feed, *, index: int, fixed: bool) -> None:
    if value.name not in feed:
        raise BadInputError(f"feed {index}: no array for input '{value.name}' (it has: {', '.join(feed) or 'none'})")
    array = np.asarray(feed[value.name])
    want = _np_dtype(value)
    if array.dtype != want:
        raise BadInputError(f"feed {index}: input '{value.name}' is {array.dtype}, the model takes {want}; "
                            f"cast it with .astype(np.{want})")
    dims = [dim.dim_value if dim.HasField("dim_value") else None for dim in value.type.tensor_type.shape.dim]
    shape_ok = len(dims) == array.ndim and all(d is None or d == s for d, s in zip(dims, array.shape, strict=False))
    if not shape_ok:
        expected = "(" + ", ".join("?" if d is None else str(d) for d in dims) + ")"
        fix = "pad or cut it to the fixed shape" if fixed else "give arrays of the model's shape"
        raise BadInputError(f"feed {index}: input '{value.name}' has shape {tuple(array.shape)} but the "
                            f"{'fixed' if fixed else 'model'} shape is {expected}; {fix}")


def _check_outputs_are_tensors(model: onnx.ModelProto, *, label: str) -> None:
    for value in model.graph.output:
        if not value.type.HasField("tensor_type"):
            raise BadInputError(f"{label}: output '{value.name}' is not a tensor (sequence or map); golden vectors "
                                "hold tensors only — end the graph in a tensor output")


def _build(model_path: Path, root: Path, *, model: onnx.ModelProto, fixed_model: onnx.ModelProto | None,
           feeds: list[Feed], options: BundleOptions, validated: dict) -> dict:
    scratch = root / ".work"  # the converter writes beside its input: keep that inside our temporary folder
    scratch.mkdir()
    onnx.save(model, str(scratch / "model.onnx"))
    variants = {"default": _build_variant(scratch / "model.onnx", root, "", model=model, feeds=feeds,
                                          options=options, prefix=options.symbol_prefix, label=str(model_path))}
    if fixed_model is not None:
        onnx.save(fixed_model, str(scratch / "fixed.onnx"))
        variants["fixed"] = _build_variant(scratch / "fixed.onnx", root, "fixed", model=fixed_model, feeds=feeds,
                                           options=options, prefix=f"{options.symbol_prefix}_fixed",
                                           label=f"{model_path} (fixed shapes)")
        variants["fixed"]["fixed_shapes"] = dict(options.fixed_shapes or {})
        variants["fixed"]["agreement"] = _compare_variants(root, variants["default"], variants["fixed"])
    shutil.rmtree(scratch)
    description = _describe_bundle(model_path, model, variants, options=options, validated=validated)
    description["files"] = {p.relative_to(root).as_posix(): {"sha256": sha256_file(p), "size_bytes": p.stat().st_size}
                            for p in sorted(root.rglob("*")) if p.is_file()}
    write_json(root / DESCRIPTION, description)
    with get_reporter().step("verifying the bundle from its files"):
        check = verify_bundle(root)
    if not check.passed:
        raise EdgepackError(f"the fresh bundle does not verify: {check.mismatches[0]}")
    return description


def _describe_bundle(model_path: Path, model: onnx.ModelProto, variants: dict, *, options: BundleOptions,
                     validated: dict) -> dict:
    """bundle.json: what the bundle is, and nothing about when or where it was built (no time, no path)."""
    import onnxruntime as ort

    return {
        "kind": KIND, "format_version": FORMAT_VERSION, "edgepack_version": __version__,
        "source": {"name": model_path.name, "sha256": sha256_file(model_path), "size_bytes": model_path.stat().st_size},
        "onnxruntime_version": ort.__version__,
        "opset": {imp.domain or "ai.onnx": imp.version for imp in model.opset_import},
        "options": asdict(options),
        "quantized": _is_quantized(model),
        "variants": variants,
        "validated": validated,
        "tool_versions": _tool_versions(),
    }


def _tool_versions() -> dict[str, str]:
    """What made the bundle; `artifacts.tool_versions` also imports torch and transformers, seconds for nothing."""
    import platform

    import onnxruntime as ort

    return {"edgepack": __version__, "python": platform.python_version(), "onnx": onnx.__version__,
            "onnxruntime": ort.__version__, "numpy": np.__version__}


def _build_variant(onnx_path: Path, root: Path, subdir: str, *, model: onnx.ModelProto, feeds: list[Feed],
                   options: BundleOptions, prefix: str, label: str) -> dict:
    folder = root / subdir if subdir else root
    folder.mkdir(exist_ok=True)
    with get_reporter().step(f"converting {label} to ORT format ({options.optimization_style}, {options.target_platform})"):
        converted = convert_to_ort(onnx_path, folder, optimization_style=options.optimization_style,
                                   target_platform=options.target_platform, label=label)
    replay = options.optimization_style == "Runtime"
    with get_reporter().step(f"writing the C array ({converted.model.stat().st_size / 1e6:.1f} MB)"):
        c_array = write_c_sources(converted.model.read_bytes(), folder, prefix=prefix, alignment=options.alignment)
    golden = _golden_outputs(converted.model, feeds, model=model, replay=replay)
    vectors = write_vectors(folder, feeds, golden, model=model)
    quant = quantization_params(model)

    def rel(path: Path) -> str:
        return path.relative_to(root).as_posix()

    return {
        "model": rel(converted.model), "optimization_style": options.optimization_style,
        "target_platform": options.target_platform,
        "session_options": {REPLAY_OPTION: "1"} if replay else {},
        "inputs": [_describe(value, quant.get(value.name)) for value in _graph_inputs(model)],
        "outputs": [_describe(value, quant.get(value.name)) for value in model.graph.output],
        "operator_config": rel(converted.operator_config),
        "operators": {domain: sorted(ops) for domain, ops in sorted(read_operator_config(converted.operator_config).items())},
        "c_array": c_array | {key: rel(folder / c_array[key]) for key in ("header", "source", "cmake")},
        "golden": {"computed_with": "onnxruntime CPUExecutionProvider on the .ort model",
                   "vectors": [rel(v) for v in vectors],
                   "tolerances": golden_tolerances(golden, quantized=_is_quantized(model), quantization=quant),
                   "tolerance_rule": TOLERANCE_RULE},
    }


def _describe(value: onnx.ValueInfoProto, quantization: dict | None) -> dict:
    """Name, dtype and shape (ints for fixed dims, names for symbolic ones, null for unnamed dynamic dims)."""
    tensor = value.type.tensor_type
    shape = None
    if tensor.HasField("shape"):
        shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor.shape.dim]
    return {"name": value.name, "dtype": _np_dtype(value).name, "shape": shape, "quantization": quantization}


def _is_quantized(model: onnx.ModelProto) -> bool:
    ops = {node.op_type for node in model.graph.node}
    return any(op in _QUANT_OPS or op.startswith("QLinear") or op.endswith("Integer") for op in ops)


def _constants(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    values = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return values


def quantization_params(model: onnx.ModelProto) -> dict[str, dict]:
    """Scale and zero point of the QuantizeLinear/DequantizeLinear that reads a graph input or writes a graph output.

    An app that feeds or reads integers directly uses them: q = clamp(round(x / scale) + zero_point).
    """
    inputs = {value.name for value in _graph_inputs(model)}
    outputs = {value.name for value in model.graph.output}
    constants = _constants(model)
    params: dict[str, dict] = {}
    for node in model.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        names = [node.input[0]] if node.input[0] in inputs else []
        names += [name for name in node.output if name in outputs]
        entry = _qdq_entry(node, constants)
        for name in names:
            if entry is not None:
                params.setdefault(name, entry)
    return params


def _qdq_entry(node: onnx.NodeProto, constants: Mapping[str, np.ndarray]) -> dict | None:
    scale = constants.get(node.input[1])
    if scale is None:  # a computed scale has no single value to report
        return None
    has_zero_point = len(node.input) > 2 and node.input[2] in constants
    zero_point = constants[node.input[2]] if has_zero_point else np.zeros((), np.uint8)
    entry: dict[str, Any] = {"node": node.op_type, "scale": scale.tolist(), "zero_point": zero_point.tolist(),
                             "zero_point_dtype": zero_point.dtype.name}
    if scale.ndim:
        entry["axis"] = next((a.i for a in node.attribute if a.name == "axis"), 1)
    return entry


def _golden_outputs(ort_path: Path, feeds: list[Feed], *, model: onnx.ModelProto, replay: bool) -> list[Feed]:
    session = ort_session(ort_path, replay_runtime_optimizations=replay)
    names = [value.name for value in model.graph.output]
    reporter = get_reporter()
    return [dict(zip(names, session.run(names, feed), strict=True))
            for feed in reporter.track(feeds, total=len(feeds), title="golden outputs from the .ort model")]


def write_vectors(folder: Path, feeds: list[Feed], outputs: list[Feed], *, model: onnx.ModelProto) -> list[Path]:
    """test_data_set_N/input_K.pb and output_K.pb, K in graph order, each a TensorProto named after its tensor."""
    input_names = [value.name for value in _graph_inputs(model)]
    output_names = [value.name for value in model.graph.output]
    folders = []
    for index, (feed, result) in enumerate(zip(feeds, outputs, strict=True)):
        vector = folder / f"test_data_set_{index}"
        vector.mkdir()
        for k, name in enumerate(input_names):
            (vector / f"input_{k}.pb").write_bytes(numpy_helper.from_array(feed[name], name).SerializeToString())
        for k, name in enumerate(output_names):
            (vector / f"output_{k}.pb").write_bytes(numpy_helper.from_array(result[name], name).SerializeToString())
        folders.append(vector)
    return folders


def golden_tolerances(outputs: list[Feed], *, quantized: bool, quantization: Mapping[str, dict]) -> dict[str, dict]:
    """atol per output by the rule in this module's docstring (rtol is always 0)."""
    tolerances = {}
    for name in outputs[0]:
        refs = [np.asarray(result[name]) for result in outputs]
        tolerances[name] = {"atol": _atol(refs, quantized=quantized, quantization=quantization.get(name)),
                            "rtol": 0.0}
    return tolerances


def _atol(refs: list[np.ndarray], *, quantized: bool, quantization: dict | None) -> float:
    dtype = refs[0].dtype
    if dtype.kind in "iu":
        if not (quantized and dtype.itemsize == 1):
            return 0.0
        values = [r for r in refs if r.size]
        spread = max(int(r.max()) for r in values) - min(int(r.min()) for r in values) if values else 0
        return max(1.0, 0.1 * spread)
    if dtype.kind != "f":
        return 0.0
    finite = [np.abs(r[np.isfinite(r)]).astype(np.float64) for r in refs]
    peak = max((float(f.max()) for f in finite if f.size), default=0.0)
    if quantized:
        step = 0.0
        if quantization and quantization["node"] == "DequantizeLinear":
            step = 2.0 * float(np.max(quantization["scale"]))
        return max(1e-5, 0.1 * peak, step)
    if dtype.itemsize < 4:
        return max(1e-3, 1e-2 * peak)
    return max(1e-5, 1e-4 * peak)


def _compare_variants(root: Path, default: dict, fixed: dict) -> dict:
    """The fixed-shape model must compute what the dynamic one does on the same feeds (max |diff| per output)."""
    worst: dict[str, float] = {}
    for ref_dir, fixed_dir in zip(default["golden"]["vectors"], fixed["golden"]["vectors"], strict=True):
        reference, _ = read_tensors(root / ref_dir, "output")
        got, _ = read_tensors(root / fixed_dir, "output")
        for name, ref in reference.items():
            error = max_error(got[name], ref)
            worst[name] = max(worst.get(name, 0.0), error)
            atol = fixed["golden"]["tolerances"][name]["atol"]
            if error > atol:
                raise EdgepackError(f"fixing the shapes changed output '{name}' ({fixed_dir}): max |diff| "
                                    f"{error:.3g} > atol {atol:.3g} vs the dynamic-shape model")
    return {"with": "default", "max_abs_diff": worst}


def parse_fixed_shapes(text: str | None) -> dict[str, int] | None:
    """'batch=1,sequence=128' -> {'batch': 1, 'sequence': 128}."""
    if text is None:
        return None
    shapes: dict[str, int] = {}
    for item in text.split(","):
        name, _, size = item.partition("=")
        if not name.strip() or not size.strip().isdigit() or int(size) < 1:
            raise BadInputError(f"--fixed-shape '{text}': '{item}' is not DIM=N with N >= 1; "
                                "write e.g. batch=1,sequence=128")
        if name.strip() in shapes:
            raise BadInputError(f"--fixed-shape '{text}': '{name.strip()}' is given twice; give each dim once")
        shapes[name.strip()] = int(size)
    return shapes


def validated_from_report(report_path: Path, model_path: Path) -> dict:
    """The providers entry of the report.json variant whose sha256 is the model's."""
    try:
        report = json.loads(Path(report_path).read_text())
    except (OSError, ValueError) as err:
        raise BadInputError(f"--validation-report {report_path}: not readable JSON ({err}); pass the report.json "
                            "of an edgepack run or validate") from None
    sha256 = sha256_file(model_path)
    variants = report.get("variants", {}) if isinstance(report, dict) else {}
    for name, variant in variants.items():
        if isinstance(variant, dict) and variant.get("sha256") == sha256:
            providers = {ep: {k: v for k, v in entry.items() if k in ("status", "how", "metrics", "coverage")}
                         for ep, entry in variant.get("providers", {}).items()}
            # the report by name and content, not by path: bundle.json says nothing about where it was built
            return {"report": {"name": Path(report_path).name, "sha256": sha256_file(Path(report_path))},
                    "variant": name, "providers": providers}
    raise BadInputError(f"--validation-report {report_path}: no variant has the sha256 of {model_path} "
                        f"({sha256[:12]}…); pass the report of the run that produced this model")
