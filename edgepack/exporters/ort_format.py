"""ONNX -> ORT format (.ort) with the operator config a reduced ONNX Runtime build takes, and fixed-shape models.

ONNX Runtime's own tools do the work, called in-process:
- `onnxruntime.tools.convert_onnx_models_to_ort.convert_onnx_models_to_ort` optimizes the graph, saves the .ort and
  writes `required_operators_and_types.config` by parsing the *saved .ort models* (`create_config_from_models`).
  That is the graph as it runs on the target, fused ops included (FusedConv, QLinearMatMul, ...). A config made
  from the unoptimized .onnx misses them (onnxruntime issue #23018). With the Runtime style the converter also
  converts once without saved runtime optimizations and lists the ops of both, because replay may not happen.
- `onnxruntime.tools.onnx_model_utils.make_dim_param_fixed` / `fix_output_shapes` pin symbolic dims for NPUs.
- `onnxruntime.tools.reduced_build_config_parser.parse_config` reads a config back (as ORT's build.py does).

What we add: the .ort is made byte-identical run to run (`ort_canonical`: ORT writes part of it in hash-map
order), the target platform is explicit (ORT's default, None, means "x86 but without NCHWc", which is neither
a phone nor a PC), ORT's stdout chatter is captured (library code never prints), the config header names the
bundle's file instead of our scratch path, and a failed conversion becomes one BadInputError naming the operators.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import onnx
import onnxruntime as ort

from edgepack.errors import BadInputError, did_you_mean
from edgepack.exporters.ort_canonical import canonicalize_ort

if TYPE_CHECKING:
    from edgepack.runtime.providers import ExecutionProvider

OPTIMIZATION_STYLES = ("Fixed", "Runtime")
#: "arm": phones and most MCUs/NPUs hosts (int8 QDQ fusions allowed, no x86-only NCHWc layout);
#: "amd64": x86 PCs (NCHWc kernels baked in; such a model only runs on x86 with AVX).
TARGET_PLATFORMS = ("arm", "amd64")
OPERATOR_CONFIG = "required_operators_and_types.config"
#: Session option that makes ORT replay the optimizations a Runtime-style .ort carries (trusted models only).
REPLAY_OPTION = "session.enable_saved_runtime_optimizations"


@dataclass(frozen=True)
class OrtModel:
    """A converted model: the .ort file and the operator config derived from it."""

    model: Path
    operator_config: Path
    optimization_style: str
    target_platform: str


def check_conversion_options(*, optimization_style: str, target_platform: str) -> None:
    if optimization_style not in OPTIMIZATION_STYLES:
        raise BadInputError(f"optimization style '{optimization_style}'{did_you_mean(optimization_style, OPTIMIZATION_STYLES)} "
                            f"is not one of {', '.join(OPTIMIZATION_STYLES)} (Runtime for NNAPI/CoreML, Fixed otherwise)")
    if target_platform not in TARGET_PLATFORMS:
        raise BadInputError(f"target platform '{target_platform}'{did_you_mean(target_platform, TARGET_PLATFORMS)} "
                            f"is not one of {', '.join(TARGET_PLATFORMS)}")


def convert_to_ort(onnx_path: Path, out_dir: Path, *, optimization_style: str = "Fixed",
                   target_platform: str = "arm", label: str | None = None) -> OrtModel:
    """Write `out_dir/model.ort` and `out_dir/required_operators_and_types.config` from `onnx_path`.

    The converter writes beside itself (a scratch folder in `out_dir`) and, for the Runtime style, a temporary
    folder beside `onnx_path`, so `onnx_path` should live in a scratch folder too. `label` names the model in errors.
    """
    from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort

    check_conversion_options(optimization_style=optimization_style, target_platform=target_platform)
    scratch = out_dir / ".ort-convert"
    shutil.rmtree(scratch, ignore_errors=True)
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log), _quiet_logger("ort_format_model.utils"):
            convert_onnx_models_to_ort(onnx_path, output_dir=scratch,
                                       optimization_styles=[OptimizationStyle[optimization_style]],
                                       target_platform=target_platform, enable_type_reduction=True)
        model = out_dir / "model.ort"
        config = out_dir / OPERATOR_CONFIG
        shutil.move(_only(scratch, "*.ort"), model)
        canonicalize_ort(model)  # ORT lays out part of the file in hash-map order: see ort_canonical
        _write_config(_only(scratch, "*.config"), config, optimization_style=optimization_style)
    except BadInputError:
        raise
    except Exception as err:  # ORT raises its pybind Fail/InvalidGraph/NotImplemented, all plain Exceptions
        raise conversion_error(label or str(onnx_path), err) from None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return OrtModel(model, config, optimization_style, target_platform)


def _only(folder: Path, pattern: str) -> Path:
    found = sorted(folder.glob(pattern))
    if len(found) != 1:
        raise RuntimeError(f"the ORT converter wrote {len(found)} {pattern} files in {folder}, expected 1")
    return found[0]


@contextlib.contextmanager
def _quiet_logger(name: str) -> Iterator[None]:
    """ORT's tools log an INFO line per config; library code stays quiet."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def _write_config(converted: Path, config: Path, *, optimization_style: str) -> None:
    """Copy ORT's config, replacing its header (absolute scratch paths) with the bundle's file name."""
    lines = [line for line in converted.read_text().splitlines() if not line.startswith("#")]
    source = "model.ort" + (" and the same model converted without saved runtime optimizations"
                            if optimization_style == "Runtime" else "")
    header = [f"# Generated by onnxruntime {ort.__version__} (convert_onnx_models_to_ort, type reduction on) from",
              f"# {source} (optimization style {optimization_style}).",
              "# Use with: ./build.sh --minimal_build --include_ops_by_config <this file> "
              "--enable_reduced_operator_type_support"]
    config.write_text("\n".join(header + lines) + "\n")


_UNREGISTERED = re.compile(r"([\w.]*):(\w+)\(-?\d+\) is not a registered function/op")
_NO_KERNEL = re.compile(r"Could not find an implementation for (\w+)\((\d+)\) node with name '([^']*)'")


def conversion_error(label: str, err: Exception) -> BadInputError:
    """One line naming the operators ORT rejected (from ORT's message), or ORT's first line when it names none."""
    text = str(err)
    ops = [f"{domain or 'ai.onnx'}:{op}" for domain, op in _UNREGISTERED.findall(text)]
    ops += [f"{op}(opset {version}, node '{node}')" for op, version, node in _NO_KERNEL.findall(text)]
    if ops:
        return BadInputError(f"{label}: ONNX Runtime cannot convert the model to ORT format: operator(s) "
                             f"{', '.join(dict.fromkeys(ops))} have no ONNX Runtime kernel; replace them with "
                             "standard ONNX operators (or build ORT with a custom op library for them)")
    first = text.replace("\n", " ").strip()[:200] or type(err).__name__
    return BadInputError(f"{label}: ONNX Runtime cannot convert the model to ORT format ({first}); "
                         "check that the model loads with onnxruntime.InferenceSession")


def read_operator_config(path: Path) -> dict[str, set[str]]:
    """Operators per domain in a reduced-build config, read with ORT's own parser (build.py uses it too)."""
    from onnxruntime.tools.reduced_build_config_parser import parse_config

    required_ops, _ = parse_config(str(path), enable_type_reduction=False)
    ops: dict[str, set[str]] = {}
    for domain, by_opset in (required_ops or {}).items():
        for names in by_opset.values():
            ops.setdefault(domain, set()).update(names)
    return ops


def ort_session(model: Path | bytes, *, providers: list | None = None, replay_runtime_optimizations: bool = False,
                disable_cpu_fallback: bool = False, provider: ExecutionProvider | None = None) -> ort.InferenceSession:
    """An InferenceSession on an .ort file (or its bytes), quiet unless ORT reports an error.

    `provider` sets its EP up itself: a plugin EP such as qnn-htp must be registered and added to the session
    options, and cannot be named in `providers` (ORT would silently run on the CPU).
    """
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if replay_runtime_optimizations:
        options.add_session_config_entry(REPLAY_OPTION, "1")
    if disable_cpu_fallback:
        options.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    source = model if isinstance(model, bytes) else str(model)
    if provider is not None:
        chosen = provider.configure_session(options, cache_dir=Path(tempfile.gettempdir()) / "edgepack-ep-cache")
        return ort.InferenceSession(source, options, providers=chosen)
    return ort.InferenceSession(source, options, providers=providers or ["CPUExecutionProvider"])


def symbolic_dims(value: onnx.ValueInfoProto) -> list[tuple[int, str]]:
    """(axis, name) of every dim that is not a positive number; unnamed dynamic dims are named '?'."""
    dims = value.type.tensor_type.shape.dim
    return [(axis, dim.dim_param or "?") for axis, dim in enumerate(dims)
            if not (dim.HasField("dim_value") and dim.dim_value > 0)]


def make_shapes_fixed(model: onnx.ModelProto, fixed_shapes: Mapping[str, int], *, label: str) -> onnx.ModelProto:
    """A copy of `model` whose symbolic dims named in `fixed_shapes` are numbers, output shapes re-inferred.

    Every graph input must end up fully fixed: a dim left dynamic is a BadInputError naming the input and the dim.
    """
    from onnxruntime.tools.onnx_model_utils import fix_output_shapes, make_dim_param_fixed

    graph_inputs = _graph_inputs(model)
    known = sorted({name for value in graph_inputs for _, name in symbolic_dims(value) if name != "?"})
    for name, size in fixed_shapes.items():
        if name not in known:
            raise BadInputError(f"{label}: fixed shape '{name}={size}' names no symbolic dim of the model inputs"
                                f"{did_you_mean(name, known)}; its symbolic dims are: {', '.join(known) or 'none'}")
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise BadInputError(f"{label}: fixed shape '{name}={size}' must be a positive integer")
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    for name, size in fixed_shapes.items():
        make_dim_param_fixed(fixed.graph, name, size)
    for value in _graph_inputs(fixed):
        for axis, name in symbolic_dims(value):
            hint = f"add {name}=N to the fixed shapes" if name != "?" else \
                "the dim has no name to fix; re-export the model with a named dynamic axis or a fixed size"
            raise BadInputError(f"{label}: input '{value.name}' dim {axis} ('{name}') is still dynamic but a fixed "
                                f"shape was required (given: {_format_shapes(fixed_shapes)}); {hint}")
    fix_output_shapes(fixed)
    return fixed


def _graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """Graph inputs that are real inputs (older exporters also list initializers as inputs)."""
    initializers = {init.name for init in model.graph.initializer}
    return [value for value in model.graph.input if value.name not in initializers]


def _format_shapes(fixed_shapes: Mapping[str, int]) -> str:
    return ",".join(f"{name}={size}" for name, size in fixed_shapes.items()) or "nothing"
