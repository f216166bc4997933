"""Embedded and mobile deliverables: from a final .onnx, everything an app or firmware build takes unchanged.

A bundle folder holds (paths relative to it; `fixed/` only when fixed shapes were asked for):

    model.ort                             ORT format model (onnxruntime's converter, see `ort_format`)
    required_operators_and_types.config   ops + types of the optimized .ort, for a reduced ORT build
    model_data.h / model_data.c           the .ort bytes as an aligned const C array, its size and sha256
    CMakeLists.snippet.cmake              `<prefix>_add_to_target(tgt)` adds model_data.c to a CMake target
    test_data_set_N/input_K.pb, output_K.pb   golden vectors, ONNX test layout (onnx_test_runner reads it)
    fixed/...                             the same for the fixed-shape variant (symbols `<prefix>_fixed_*`)
    manifest.json                         "kind": "edgepack-bundle", I/O, quantization params, tolerances, sha256s

ONNX Runtime does the heavy lifting: conversion, the operator config, and the golden outputs, which come from the
*.ort* model run by ORT's CPU EP (what the target loads, not the .onnx). onnx's `numpy_helper` writes the vectors.
Our own code: the C array writer (numpy turns bytes into "0xNN," text in vectorized chunks: a 23 MB model takes
about a second; xxd-style Python loops take minutes), the tolerance rule, and the atomic folder swap.

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

import argparse
import hashlib
import json
import os
import re
import shutil
import string
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from edgepack import __version__
from edgepack.artifacts import sha256_file, write_json
from edgepack.calibration_data import Feed
from edgepack.errors import BadInputError, EdgepackError, GateFailedError
from edgepack.exporters.ort_format import (
    REPLAY_OPTION,
    check_conversion_options,
    convert_to_ort,
    make_shapes_fixed,
    ort_session,
    read_operator_config,
)
from edgepack.onnx_files import load_onnx_checked
from edgepack.reporter import get_reporter

MANIFEST = "manifest.json"
KIND = "edgepack-bundle"
FORMAT_VERSION = 1
TWO_GB = 2**31
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
    force: replace an existing folder that is not a bundle. target_platform: "arm" (phones, MCUs) or "amd64".
    """

    optimization_style: str = "Fixed"
    alignment: int = 64
    symbol_prefix: str = "edgepack_model"
    fixed_shapes: dict[str, int] | None = None
    force: bool = False
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


@dataclass
class VerifyResult:
    passed: bool
    vectors: int
    mismatches: list[str]
    provider: str


# ---------------------------------------------------------------------------------------------------- building


def make_bundle(model_path: Path, out_dir: Path, *, feeds: Sequence[Feed], options: BundleOptions = BundleOptions(),
                validated: dict | None = None) -> dict:
    """Build the bundle of `model_path` in `out_dir` and return its manifest.

    `feeds` are real evaluation inputs (one golden vector each; with fixed shapes they must have the fixed shape).
    `validated` records which EPs the caller validated and how (e.g. report.json's providers), stored as given.
    The bundle is built in a temporary folder beside `out_dir`, verified, then renamed over it: a failure at any
    point (including a full disk) leaves `out_dir` as it was.
    """
    model_path, out_dir = Path(model_path), Path(out_dir)
    model = _load_model(model_path)
    fixed_model = make_shapes_fixed(model, options.fixed_shapes, label=str(model_path)) \
        if options.fixed_shapes else None
    feeds = list(feeds)
    _check_feeds(fixed_model or model, feeds, label=str(model_path), fixed=fixed_model is not None)
    _check_outputs_are_tensors(model, label=str(model_path))
    if validated is not None and not isinstance(validated, dict):
        raise BadInputError(f"validated must be a dict (EP name -> how it was validated), not {type(validated).__name__}")
    _check_out_dir(out_dir, model_path=model_path, force=options.force)
    target = Path(os.path.abspath(out_dir))  # "." or "out/" have no usable name to put a sibling beside
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".tmp-{target.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        manifest = _build(model_path, tmp, model=model, fixed_model=fixed_model, feeds=feeds, options=options,
                          validated=validated)
        _swap_in(tmp, target)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        where = f" ({err.filename})" if err.filename else ""
        raise BadInputError(f"{out_dir}: writing the bundle failed: {err.strerror or err}{where}; free disk space "
                            "or choose another output folder (nothing was left behind)") from err
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _load_model(path: Path) -> onnx.ModelProto:
    """Checked model with its external data loaded (the .ort holds every weight; FlatBuffers caps it at 2 GB)."""
    from onnx.external_data_helper import load_external_data_for_model, uses_external_data

    model = load_onnx_checked(path)
    if any(uses_external_data(init) for init in model.graph.initializer):
        load_external_data_for_model(model, str(path.parent))
    if model.ByteSize() >= TWO_GB:
        raise BadInputError(f"{path}: {model.ByteSize() / 2**30:.1f} GB of weights; the ORT format holds at most "
                            "2 GB — quantize the model first (edgepack quantize) or ship the .onnx instead")
    return model


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


def _is_bundle(folder: Path) -> bool:
    try:
        return json.loads((folder / MANIFEST).read_text()).get("kind") == KIND
    except (OSError, ValueError, AttributeError):
        return False


def _check_out_dir(out_dir: Path, *, model_path: Path, force: bool) -> None:
    if not out_dir.exists():
        return
    if out_dir.is_dir() and model_path.resolve().is_relative_to(out_dir.resolve()):
        raise BadInputError(f"{out_dir}: the model {model_path} lies inside the output folder, which the bundle "
                            "replaces; choose another output folder")
    foreign = not out_dir.is_dir() or (any(out_dir.iterdir()) and not _is_bundle(out_dir))
    if foreign and not force:
        raise BadInputError(f"{out_dir} exists and is not an edgepack bundle (no manifest.json with "
                            f"\"kind\": \"{KIND}\"); choose a new or empty folder, or pass --force to replace it")


def _swap_in(tmp: Path, out_dir: Path) -> None:
    """Rename the finished folder into place; an old folder is moved aside first and removed last."""
    if not out_dir.exists():
        os.rename(tmp, out_dir)
        return
    old = out_dir.with_name(f".old-{out_dir.name}-{os.getpid()}")
    os.rename(out_dir, old)
    try:
        os.rename(tmp, out_dir)
    except OSError:
        os.rename(old, out_dir)  # put the previous folder back before reporting
        raise
    if old.is_dir():
        shutil.rmtree(old)
    else:
        old.unlink()


def _build(model_path: Path, root: Path, *, model: onnx.ModelProto, fixed_model: onnx.ModelProto | None,
           feeds: list[Feed], options: BundleOptions, validated: dict | None) -> dict:
    start = time.perf_counter()
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
    manifest = _manifest(model_path, model, variants, options=options, validated=validated)
    manifest["files"] = {str(p.relative_to(root).as_posix()): {"sha256": sha256_file(p), "size_bytes": p.stat().st_size}
                         for p in sorted(root.rglob("*")) if p.is_file()}
    manifest["wall_time_s"] = round(time.perf_counter() - start, 3)
    write_json(root / MANIFEST, manifest)
    with get_reporter().step("verifying the bundle from its files"):
        check = verify_bundle(root)
    if not check.passed:
        raise EdgepackError(f"the fresh bundle does not verify: {check.mismatches[0]}")
    return manifest


def _manifest(model_path: Path, model: onnx.ModelProto, variants: dict, *, options: BundleOptions,
              validated: dict | None) -> dict:
    import onnxruntime as ort

    return {
        "kind": KIND, "format_version": FORMAT_VERSION, "edgepack_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "source": {"path": str(model_path), "sha256": sha256_file(model_path),
                   "size_bytes": model_path.stat().st_size},
        "onnxruntime_version": ort.__version__,
        "opset": {imp.domain or "ai.onnx": imp.version for imp in model.opset_import},
        # force says how this build ran, not what the bundle is
        "options": {key: value for key, value in asdict(options).items() if key != "force"},
        "quantized": _is_quantized(model),
        "variants": variants,
        "validated": validated or {},
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
        reference, _ = _read_tensors(root / ref_dir, "output")
        got, _ = _read_tensors(root / fixed_dir, "output")
        for name, ref in reference.items():
            error = _max_error(got[name], ref)
            worst[name] = max(worst.get(name, 0.0), error)
            atol = fixed["golden"]["tolerances"][name]["atol"]
            if error > atol:
                raise EdgepackError(f"fixing the shapes changed output '{name}' ({fixed_dir}): max |diff| "
                                    f"{error:.3g} > atol {atol:.3g} vs the dynamic-shape model")
    return {"with": "default", "max_abs_diff": worst}


# ---------------------------------------------------------------------------------------------------- C sources


_HEADER = string.Template("""\
/* $header — generated by edgepack $version; do not edit (rebuild with `edgepack bundle`).
 *
 * The ORT format model $model ($size bytes, sha256 $sha256) as a const byte array,
 * aligned to $alignment bytes. Create the session straight from it:
 *   Ort::Session session(env, ${prefix}_data, ${prefix}_size, options);
 * With the session option "session.use_ort_model_bytes_directly" = "1" ONNX Runtime reads the FlatBuffer
 * in place (no copy); the array lives for the whole program, as that option requires.
 * Compare ${prefix}_sha256 with your own record to be sure which model a firmware image holds.
 */
#ifndef ${MACRO}_DATA_H
#define ${MACRO}_DATA_H

#include <stddef.h>

#define ${MACRO}_SIZE ${size}u
#define ${MACRO}_ALIGNMENT $alignment
#define ${MACRO}_SHA256 "$sha256"

#ifdef __cplusplus
extern "C" {
#endif

extern const unsigned char ${prefix}_data[${MACRO}_SIZE];
extern const size_t ${prefix}_size;
extern const char ${prefix}_sha256[65];

#ifdef __cplusplus
}
#endif

#endif /* ${MACRO}_DATA_H */
""")

_SOURCE_HEAD = string.Template("""\
/* $source — generated by edgepack $version; do not edit. See $header. */
#include "$header"

/* $alignment-byte alignment: C11 _Alignas, C++11 alignas, else the GCC/Clang or MSVC spelling. */
#if defined(__cplusplus) && __cplusplus >= 201103L
#define ${MACRO}_ALIGNED alignas($alignment)
#elif defined(__STDC_VERSION__) && __STDC_VERSION__ >= 201112L
#define ${MACRO}_ALIGNED _Alignas($alignment)
#elif defined(__GNUC__) || defined(__clang__)
#define ${MACRO}_ALIGNED __attribute__((aligned($alignment)))
#elif defined(_MSC_VER)
#define ${MACRO}_ALIGNED __declspec(align($alignment))
#else
#error "edgepack: no way to align ${prefix}_data known for this compiler; define ${MACRO}_ALIGNED"
#endif

/* Define ${MACRO}_SECTION to place the model, e.g. -D'${MACRO}_SECTION=__attribute__((section(".rodata.model")))'. */
#ifndef ${MACRO}_SECTION
#define ${MACRO}_SECTION
#endif

${MACRO}_SECTION ${MACRO}_ALIGNED const unsigned char ${prefix}_data[${MACRO}_SIZE] = {
""")

_SOURCE_TAIL = string.Template("""\
};

const size_t ${prefix}_size = ${MACRO}_SIZE;
const char ${prefix}_sha256[65] = ${MACRO}_SHA256;
""")

_CMAKE = string.Template("""\
# Generated by edgepack $version: adds the embedded model ($source, symbol ${prefix}_data) to a target.
#   include(path/to/this/folder/$cmake)
#   ${prefix}_add_to_target(my_app)       # then: #include "$header"
# The project must enable C (project(my_app LANGUAGES C CXX)).
set(${MACRO}_BUNDLE_DIR "$${CMAKE_CURRENT_LIST_DIR}")
function(${prefix}_add_to_target target)
  target_sources($${target} PRIVATE "$${${MACRO}_BUNDLE_DIR}/$source")
  target_include_directories($${target} PRIVATE "$${${MACRO}_BUNDLE_DIR}")
endfunction()
""")


def write_c_sources(data: bytes, folder: Path, *, prefix: str, alignment: int,
                    names: tuple[str, str, str] = ("model_data.h", "model_data.c", "CMakeLists.snippet.cmake")) -> dict:
    """Write the header, the C array and the CMake snippet for `data`; return what the manifest records."""
    header, source, cmake = names
    sha256 = hashlib.sha256(data).hexdigest()
    fields = {"header": header, "source": source, "cmake": cmake, "version": __version__, "model": "model.ort",
              "size": len(data), "sha256": sha256, "alignment": alignment, "prefix": prefix, "MACRO": prefix.upper()}
    (folder / header).write_text(_HEADER.substitute(fields))
    with open(folder / source, "wb") as out:
        out.write(_SOURCE_HEAD.substitute(fields).encode())
        for chunk in c_array_lines(data):
            out.write(chunk)
        out.write(_SOURCE_TAIL.substitute(fields).encode())
    (folder / cmake).write_text(_CMAKE.substitute(fields))
    return {"header": header, "source": source, "cmake": cmake, "alignment": alignment,
            "symbols": {"data": f"{prefix}_data", "size": f"{prefix}_size", "sha256": f"{prefix}_sha256"},
            "size_bytes": len(data), "sha256": sha256}


def c_array_lines(data: bytes, *, per_line: int = 16, chunk_bytes: int = 1 << 20) -> Iterator[bytes]:
    """`  0x12,0xab,...\\n` text for `data`, `per_line` bytes a line, built with numpy a chunk at a time.

    >>> b"".join(c_array_lines(bytes([0, 171, 255]), per_line=2))
    b'  0x00,0xab,\\n  0xff,\\n'
    """
    digits = np.frombuffer(b"0123456789abcdef", np.uint8)
    chunk_bytes -= chunk_bytes % per_line  # whole lines per chunk
    for start in range(0, len(data), chunk_bytes):
        raw = np.frombuffer(data, np.uint8, count=min(chunk_bytes, len(data) - start), offset=start)
        cells = np.empty((raw.size, 5), np.uint8)  # (N, 5): "0xNN,"
        cells[:, 0], cells[:, 1], cells[:, 4] = ord("0"), ord("x"), ord(",")
        cells[:, 2], cells[:, 3] = digits[raw >> 4], digits[raw & 15]
        full = raw.size - raw.size % per_line
        lines = np.empty((full // per_line, 2 + 5 * per_line + 1), np.uint8)  # (rows, "  " + cells + "\n")
        lines[:, :2], lines[:, -1] = ord(" "), ord("\n")
        lines[:, 2:-1] = cells[:full].reshape(-1, 5 * per_line)
        yield lines.tobytes()
        if full < raw.size:
            yield b"  " + cells[full:].tobytes() + b"\n"


# ---------------------------------------------------------------------------------------------------- verifying


def read_bundle_manifest(bundle_dir: Path) -> dict:
    """The manifest of a bundle folder; anything else is a BadInputError naming the fix."""
    path = Path(bundle_dir) / MANIFEST
    if not path.is_file():
        raise BadInputError(f"{bundle_dir}: no {MANIFEST}; this is not an edgepack bundle — build one with "
                            "`edgepack bundle MODEL.onnx --out DIR`")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise BadInputError(f"{path}: not readable JSON ({err}); rebuild the bundle with edgepack bundle") from None
    if not isinstance(manifest, dict) or manifest.get("kind") != KIND:
        raise BadInputError(f"{path}: not an edgepack bundle manifest (no \"kind\": \"{KIND}\"); "
                            "build one with `edgepack bundle`")
    for key in ("files", "variants"):
        if not isinstance(manifest.get(key), dict):
            raise BadInputError(f"{path}: '{key}' is missing or malformed; rebuild the bundle with edgepack bundle")
    return manifest


def verify_bundle(bundle_dir: Path, *, provider: str = "cpu") -> VerifyResult:
    """Check every file's sha256, then run every golden vector of every variant through the bundle's .ort on
    `provider` (CPU fallback disabled for other EPs, so the EP really runs the whole graph). Collects all mismatches.
    """
    from edgepack.runtime.providers import get_provider

    bundle_dir = Path(bundle_dir)
    manifest = read_bundle_manifest(bundle_dir)
    ep = get_provider(provider)
    reason = ep.availability()
    if reason is not None:
        raise BadInputError(f"--ep {provider}: {reason}")
    mismatches = check_files(bundle_dir, manifest["files"])
    if mismatches:  # a modified model or vector is not worth running
        return VerifyResult(False, 0, mismatches, provider)
    vectors = 0
    for variant in manifest["variants"].values():
        try:
            session = ort_session(bundle_dir / variant["model"], provider=ep,
                                  replay_runtime_optimizations=REPLAY_OPTION in variant.get("session_options", {}),
                                  disable_cpu_fallback=provider != "cpu")
        except Exception as err:  # ORT's pybind errors share no useful base class
            first = str(err).replace("\n", " ")[:200]
            mismatches.append(f"{variant['model']}: ONNX Runtime could not create a session on {provider} "
                              f"with CPU fallback disabled ({first})")
            continue
        for vector in variant["golden"]["vectors"]:
            vectors += 1
            mismatches += check_vector(session, bundle_dir, vector, variant["golden"]["tolerances"])
    return VerifyResult(not mismatches, vectors, mismatches, provider)


def check_files(bundle_dir: Path, files: Mapping[str, dict]) -> list[str]:
    mismatches = []
    root = bundle_dir.resolve()
    for name, entry in files.items():
        path = bundle_dir / name
        if not path.resolve().is_relative_to(root):
            mismatches.append(f"{name}: lies outside the bundle folder; the manifest was modified — rebuild it "
                              "with edgepack bundle")
        elif not path.is_file():
            mismatches.append(f"{name}: missing; the bundle was modified — rebuild it with edgepack bundle")
        elif (actual := sha256_file(path)) != entry.get("sha256"):
            mismatches.append(f"{name}: sha256 mismatch (manifest {str(entry.get('sha256'))[:12]}…, file "
                              f"{actual[:12]}…); the bundle was modified — rebuild it with edgepack bundle")
    return mismatches


def _read_tensors(vector: Path, kind: str) -> tuple[dict[str, np.ndarray], list[str]]:
    """{name: array} of `vector/<kind>_K.pb` in K order, and the names in that order."""
    paths = sorted(vector.glob(f"{kind}_*.pb"), key=lambda p: int(p.stem.rsplit("_", 1)[1]))
    tensors = [onnx.load_tensor(str(path)) for path in paths]
    return {t.name: numpy_helper.to_array(t) for t in tensors}, [t.name for t in tensors]


def check_vector(session: Any, bundle_dir: Path, vector: str, tolerances: Mapping[str, dict]) -> list[str]:
    """Mismatches of one golden vector: output, vector, max |error| vs atol (or shape / dtype / missing output)."""
    feed, _ = _read_tensors(bundle_dir / vector, "input")
    golden, names = _read_tensors(bundle_dir / vector, "output")
    try:
        results = dict(zip(names, session.run(names, feed), strict=True))
    except Exception as err:  # ORT's pybind errors share no useful base class
        return [f"{vector}: ONNX Runtime failed to run it ({str(err).splitlines()[0][:200]})"]
    mismatches = []
    for name in names:
        got, ref = np.asarray(results[name]), golden[name]
        atol = float(tolerances.get(name, {}).get("atol", 0.0))
        if got.shape != ref.shape or got.dtype != ref.dtype:
            mismatches.append(f"{vector}: output '{name}' is {got.dtype}{list(got.shape)}, golden is "
                              f"{ref.dtype}{list(ref.shape)}")
            continue
        error = _max_error(got, ref)
        if error > atol:
            mismatches.append(f"{vector}: output '{name}' max |error| {error:.3g} > atol {atol:.3g}")
    return mismatches


def _max_error(got: np.ndarray, ref: np.ndarray) -> float:
    """Max |got - ref| in float64; NaN where both are NaN counts as equal, NaN on one side as infinite error."""
    if got.shape != ref.shape:
        return float("inf")
    if got.dtype.kind not in "iufb":
        return 0.0 if np.array_equal(got, ref) else float("inf")
    a, b = got.astype(np.float64), ref.astype(np.float64)
    diff = np.abs(a - b)
    both_nan = np.isnan(a) & np.isnan(b)
    diff = np.where(both_nan, 0.0, np.where(np.isnan(diff), np.inf, diff))
    return float(diff.max()) if diff.size else 0.0


# ---------------------------------------------------------------------------------------------------- CLI


def add_bundle_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", type=Path, help="final .onnx model (FP32 or quantized)")
    parser.add_argument("--out", type=Path, required=True, help="bundle folder to write (replaced if it is a bundle)")
    parser.add_argument("--data", help="evaluation data for the golden vectors: .txt, .jsonl, .csv or .npz "
                        "(default: edgepack's bundled sentences)")
    parser.add_argument("--tokenizer", help="HF folder whose tokenizer turns text data into model inputs")
    parser.add_argument("--samples", type=int, default=4, help="golden vectors to write (default 4)")
    parser.add_argument("--field", default="text", help="JSONL/CSV field holding the text (default text)")
    parser.add_argument("--max-length", type=int, default=128, help="token truncation length (default 128)")
    parser.add_argument("--fixed-shape", metavar="DIM=N[,DIM=N]",
                        help="also write a fixed-shape variant for NPUs, e.g. batch=1,sequence=128")
    parser.add_argument("--optimization-style", default="Fixed", choices=["Fixed", "Runtime"],
                        help="Fixed (CPU, XNNPACK, QNN; default) or Runtime (NNAPI, CoreML)")
    parser.add_argument("--target-platform", default="arm", choices=["arm", "amd64"],
                        help="CPU the .ort is optimized for (default arm)")
    parser.add_argument("--alignment", type=int, default=64, help="C array alignment in bytes (default 64)")
    parser.add_argument("--symbol-prefix", default="edgepack_model", help="C symbol prefix (default edgepack_model)")
    parser.add_argument("--validation-report", type=Path,
                        help="report.json of an edgepack run/validate; the EPs it validated for this model "
                             "(matched by sha256) go into the manifest")
    parser.add_argument("--force", action="store_true", help="replace an existing folder that is not a bundle")


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


def run_bundle_command(args: argparse.Namespace) -> int:
    options = BundleOptions(optimization_style=args.optimization_style, alignment=args.alignment,
                            symbol_prefix=args.symbol_prefix, fixed_shapes=parse_fixed_shapes(args.fixed_shape),
                            force=args.force, target_platform=args.target_platform)
    feeds = _cli_feeds(args, options)
    validated = _validated_from_report(args.validation_report, args.model) if args.validation_report else None
    manifest = make_bundle(args.model, args.out, feeds=feeds, options=options, validated=validated)
    for name, entry in manifest["files"].items():
        if not name.rsplit("/", 1)[-1].startswith(("input_", "output_")):
            print(f"  {entry['size_bytes']:>12,}  {name}")
    vectors = sum(len(v["golden"]["vectors"]) for v in manifest["variants"].values())
    print(f"wrote {args.out} ({', '.join(manifest['variants'])}; {vectors} golden vectors)")
    print(f"next: edgepack verify {args.out}")
    return 0


def _cli_feeds(args: argparse.Namespace, options: BundleOptions) -> list[Feed]:
    """Evaluation feeds from --data; with fixed shapes, text is padded to the fixed (batch, sequence) of input 0."""
    from edgepack.calibration_data import TextSample, read_samples, resolve_data_path
    from edgepack.models import get_adapter

    adapter = get_adapter("onnx-file", str(args.model), tokenizer=args.tokenizer)
    model = load_onnx_checked(args.model)
    if args.samples < 1:
        raise BadInputError(f"--samples {args.samples}: write at least one golden vector")
    samples = read_samples(resolve_data_path(args.data or "bundled:sentences.jsonl"), field=args.field)
    samples = samples[: args.samples]
    if options.fixed_shapes and isinstance(samples[0], TextSample):
        fixed = make_shapes_fixed(model, options.fixed_shapes, label=str(args.model))
        dims = _graph_inputs(fixed)[0].type.tensor_type.shape.dim
        if len(dims) != 2:
            raise BadInputError(f"{args.model}: text data needs (batch, sequence) inputs, input "
                                f"'{_graph_inputs(fixed)[0].name}' has rank {len(dims)}; pass arrays in an .npz")
        batch, length = dims[0].dim_value, dims[1].dim_value
        feeds = [feed for feed in adapter.feeds(samples, batch_size=batch, max_length=length, padding="max_length")
                 if len(next(iter(feed.values()))) == batch]  # a short last batch has no fixed shape
        if not feeds:
            raise BadInputError(f"--samples {args.samples}: fewer samples than the fixed batch size {batch}")
    else:
        feeds = adapter.evaluation_feeds(samples, max_length=args.max_length)
    return [_widen_integers(feed, model) for feed in feeds]


def _widen_integers(feed: Feed, model: onnx.ModelProto) -> Feed:
    """Tokenizers give int32 ids; a model taking int64 gets them widened (lossless). Other dtypes stay as given."""
    out = dict(feed)
    for value in _graph_inputs(model):
        want = _np_dtype(value)
        if value.name in out and out[value.name].dtype != want and out[value.name].dtype.kind in "iu" \
                and want.kind in "iu" and np.can_cast(out[value.name].dtype, want, casting="safe"):
            out[value.name] = out[value.name].astype(want)
    return out


def _validated_from_report(report_path: Path, model_path: Path) -> dict:
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
            return {"report": str(report_path), "variant": name, "providers": providers}
    raise BadInputError(f"--validation-report {report_path}: no variant has the sha256 of {model_path} "
                        f"({sha256[:12]}…); pass the report of the run that produced this model")


def add_verify_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bundle", type=Path, help="bundle folder written by edgepack bundle")
    parser.add_argument("--ep", default="cpu", help="execution provider to run the golden vectors on (default cpu)")


def run_verify_command(args: argparse.Namespace) -> int:
    import sys

    result = verify_bundle(args.bundle, provider=args.ep)
    if not result.passed:
        for line in result.mismatches:
            print(f"  {line}", file=sys.stderr)
        raise GateFailedError(f"{args.bundle}: {result.mismatches[0]} ({len(result.mismatches)} mismatch(es) "
                              "in total)")
    print(f"{args.bundle}: all files match their sha256; {result.vectors} golden vectors within tolerance on "
          f"{result.provider}")
    return 0
