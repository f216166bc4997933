"""Measure one ONNX model on one execution provider in a fresh subprocess: latency, memory, coverage, outputs.

Memory is per process, so every measurement starts a new Python that imports only numpy and onnxruntime
(never torch, transformers or onnx) and reads its own VmRSS / VmHWM from /proc/self/status. The child is one
standalone file (`probe_child.py`), so the same measurement runs on a remote device (`devices.py`: SSH, adb). ONNX Runtime does
the inference and the partitioning; the phases, timing and the parent/child protocol are ours, because ORT has
no per-session memory figure and a crashing EP must not take the caller down with it.

Protocol (all files in a fresh folder under `workdir`):
    parent prepares the model the EP needs (fixed shapes, fp16, ORT format: `fixed_shape.py`), pads the
                   evaluation feeds to a fixed shape, and writes latency.npz, evaluation.npz (keys
                   `f0003__input_ids`: feed 3, input `input_ids`) and request.json (with the provider's SessionPlan)
    device runs    [python, probe_child.py, request.json, result.json] with a timeout (`ProbeOptions.device`:
                   this machine, or a remote device the folder and model are copied to)
    child writes   result.json (status, latency_ms, memory_mb, coverage, allocator) and outputs.npz
The .npz files and prepared model copies are deleted once read; the two .json files stay for inspection.
Static-analysis providers (NNAPI / CoreML where this runtime lacks them) start no child: `static_analysis.py`.

The child's order of phases is in `probe_child.py`.

>>> result = measure(Path("model.onnx"), latency_feed=feed, evaluation_feeds=[feed],   # doctest: +SKIP
...                  workdir=Path("runs/probe"), options=ProbeOptions(provider="cpu"))
>>> result.status, result.latency_ms["p50"], result.coverage["nodes_on_ep"]          # doctest: +SKIP
('ok', 0.41, 3)
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgepack.errors import BadInputError
from edgepack.runtime.devices import LocalDevice, get_device
from edgepack.runtime.probe_child import MEMORY_METHOD, load_indexed, one_line
from edgepack.runtime.providers import ExecutionProvider, SessionPlan, get_provider
from edgepack.runtime.quiet import ort_log_severity

if TYPE_CHECKING:
    from edgepack.calibration_data import Feed

__all__ = ["MEMORY_METHOD", "ProbeOptions", "ProbeResult", "ProbeTask", "TaskResult", "measure", "measure_task",
           "memory_breakdown"]
#: Task processes return every large freed block to the OS (glibc otherwise keeps some on its heap, and which ones
#: depends on the order of allocations: the same run's peak RSS then moved by ~100 MB between processes).
TASK_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}
_MIB = 2**20


@dataclass(frozen=True)
class ProbeOptions:
    provider: str = "cpu"  # a provider key: "cpu", "qnn-htp", "mobile-cpu/t2-lean", ...
    #: ORT intra-op threads; 0 lets ONNX Runtime choose (one per physical core). A mobile-cpu profile pins its own.
    intra_op_threads: int = 2
    #: Untimed runs after the first run (which is timed on its own as `first_run_ms`).
    warmup: int = 10
    runs: int = 50
    timeout_s: float = 600
    #: Where EP caches live across runs (TensorRT engines); None: next to the probe folders in `workdir`.
    cache_dir: Path | None = None
    #: Where the child runs: "local", "ssh://user@host[:port]", "adb://serial" (`runtime/devices.py`).
    device: str = "local"

    def __post_init__(self) -> None:
        checks = (("intra_op_threads", self.intra_op_threads >= 0, ">= 0 (0 = ONNX Runtime's default)"),
                  ("warmup", self.warmup >= 0, ">= 0"), ("runs", self.runs >= 1, ">= 1"),
                  ("timeout_s", self.timeout_s > 0, "> 0"))
        for name, ok, rule in checks:
            if not ok:
                raise BadInputError(f"probe option {name}={getattr(self, name)!r}: must be {rule}")


@dataclass
class ProbeResult:
    status: str  # "ok" | "unavailable" | "failed"
    how: str  # "device" | "emulated" | "static-analysis"
    error: str | None = None
    #: {"p50","p90","p99","mean","std","min","max","first_run_ms","load_ms","runs","warmup","threads","shape"}
    latency_ms: dict[str, Any] = field(default_factory=dict)
    #: {"baseline","after_session","after_first_run","peak","method","breakdown": {...}}, MiB
    memory_mb: dict[str, Any] = field(default_factory=dict)
    #: {"nodes_on_ep","nodes_total","partitions","fallback_ops","matmul_on_ep","matmul_total","method", ...}
    coverage: dict[str, Any] = field(default_factory=dict)
    #: Outputs for each evaluation feed, in order: output name -> array.
    outputs: list[dict[str, np.ndarray]] = field(default_factory=list)

    def to_report(self) -> dict[str, Any]:
        """The JSON-able part, as report.json's `providers.<ep>` entry wants it (outputs left out)."""
        report: dict[str, Any] = {"status": self.status, "how": self.how}
        if self.error is not None:
            report["error"] = self.error
        return {**report, "latency_ms": self.latency_ms, "memory_mb": self.memory_mb, "coverage": self.coverage}


@dataclass(frozen=True)
class ProbeTask:
    """A family's own measurement, run in a fresh process after the session is created (`measure_task`).

    `module` is a torch-free module with `run(session, payload, arrays) -> {"metrics": {...}, "arrays": {...}}`
    (e.g. `edgepack.runtime.decoding`: autoregressive generation); `payload` is JSON, `arrays` numpy inputs.
    Tasks run on this machine only (the child imports `module` from this edgepack).
    """

    name: str
    module: str
    payload: dict[str, Any]
    arrays: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass
class TaskResult:
    status: str  # "ok" | "unavailable" | "failed"
    error: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    #: {"baseline", "after_session", "peak"} MiB of the task's process
    memory_mb: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------- parent


@dataclass(frozen=True)
class _Prepared:
    path: Path  # the model file the child loads
    onnx_path: Path  # the ONNX file behind it (weights are counted there)
    shapes: dict[str, list[int]] | None  # fixed input shapes, when the EP needs them
    sequence_outputs: frozenset[str] = frozenset()


def measure(model_path: Path, *, latency_feed: Feed, evaluation_feeds: Sequence[Feed], workdir: Path,
            options: ProbeOptions) -> ProbeResult:
    """Run the model on `options.provider` in a fresh subprocess; never raises for an EP or model failure.

    Returns status "unavailable" (with the reason, no subprocess started) when the EP cannot run here,
    "ok" with coverage only for a static-analysis provider, and "failed" with ONNX Runtime's message when
    preparing the model, the session or a run fails, or the child crashes or times out.
    """
    provider = _one_provider(options.provider)
    device = get_device(options.device)
    reason = device.availability(provider)
    if reason is not None:
        return ProbeResult(status="unavailable", how=provider.how, error=reason)
    model_path = Path(model_path).resolve()
    if not model_path.is_file():
        raise BadInputError(f"{model_path}: model file not found; pass the path of an .onnx file")
    if not latency_feed:
        raise BadInputError("latency feed is empty; it needs one array per model input")
    workdir = Path(workdir).resolve()  # the child runs in probe_dir: a relative prepared-model path would miss
    workdir.mkdir(parents=True, exist_ok=True)
    probe_dir = Path(tempfile.mkdtemp(prefix=f"probe-{provider.key.replace('/', '_')}-", dir=workdir))
    if provider.static_only:
        return _static(model_path, provider, latency_feed=latency_feed, probe_dir=probe_dir)
    try:
        return _measure_in_child(model_path, provider, latency_feed=latency_feed, evaluation_feeds=evaluation_feeds,
                                 probe_dir=probe_dir, options=options)
    finally:
        for pattern in ("*.npz", "model.*", "ort/*"):  # feeds and prepared model copies (tens of MB each)
            for path in probe_dir.glob(pattern):
                path.unlink()
        if (probe_dir / "ort").is_dir():
            (probe_dir / "ort").rmdir()


def measure_task(model_path: Path, *, task: ProbeTask, workdir: Path, options: ProbeOptions) -> TaskResult:
    """Run `task` on the model in a fresh local subprocess on `options.provider` (same session settings as `measure`)."""
    provider = _one_provider(options.provider)
    reason = provider.availability()
    if reason is not None:
        return TaskResult(status="unavailable", error=reason)
    workdir.mkdir(parents=True, exist_ok=True)
    probe_dir = Path(tempfile.mkdtemp(prefix=f"task-{task.name}-", dir=workdir))
    plan = provider.session_plan(cache_dir=options.cache_dir or probe_dir.parent)
    request = {"mode": "task", "model": str(Path(model_path).resolve()), "plan": plan.to_json(),
               "intra_op_threads": plan.threads if plan.threads is not None else options.intra_op_threads,
               "ort_log_severity": ort_log_severity(), "module": task.module, "payload": task.payload,
               "arrays": str(_save_arrays(probe_dir / "task_in.npz", task.arrays)),
               "outputs": str(probe_dir / "task_out.npz")}
    (probe_dir / "request.json").write_text(json.dumps(request, indent=1))
    try:
        failure = LocalDevice().run_probe(probe_dir / "request.json", probe_dir / "result.json",
                                          timeout_s=options.timeout_s, env=TASK_ENV)
        if failure is not None:
            return TaskResult(status="failed", error=failure)
        payload = json.loads((probe_dir / "result.json").read_text())
        if payload["status"] != "ok":
            return TaskResult(status="failed", error=payload["error"])
        with np.load(probe_dir / "task_out.npz", allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
        return TaskResult(status="ok", metrics=payload["metrics"], arrays=arrays, memory_mb=payload["memory_mb"])
    finally:
        for path in probe_dir.glob("*.npz"):
            path.unlink()


def _save_arrays(path: Path, arrays: dict[str, np.ndarray]) -> Path:
    np.savez(path, **{name: np.asarray(value) for name, value in arrays.items()})
    return path


def _one_provider(key: str) -> ExecutionProvider:
    provider = get_provider(key)
    profiles = provider.expand()
    if len(profiles) > 1:
        raise BadInputError(f"'{key}' names {len(profiles)} profiles ({', '.join(p.key for p in profiles)}); "
                            "measure one at a time, e.g. " + profiles[0].key)
    return provider


def _static(model_path: Path, provider: ExecutionProvider, *, latency_feed: Feed, probe_dir: Path) -> ProbeResult:
    """Coverage from ORT's mobile usability checker, for the model fixed to the latency feed's shapes."""
    from edgepack.runtime.fixed_shape import feed_shapes
    from edgepack.runtime.static_analysis import analyze_partitions

    try:
        coverage = analyze_partitions(model_path, ep=provider.name, shapes=feed_shapes(latency_feed),
                                      workdir=probe_dir)
    except BadInputError:
        raise
    except Exception as error:  # an invalid graph is this row's result, not a crash of the whole validation
        return ProbeResult(status="failed", how=provider.how, error=one_line(error))
    return ProbeResult(status="ok", how=provider.how, coverage=coverage)


def _measure_in_child(model_path: Path, provider: ExecutionProvider, *, latency_feed: Feed,
                      evaluation_feeds: Sequence[Feed], probe_dir: Path, options: ProbeOptions) -> ProbeResult:
    try:
        prepared = _prepare(model_path, provider, latency_feed=latency_feed, probe_dir=probe_dir)
    except BadInputError:
        raise
    except Exception as error:
        return ProbeResult(status="failed", how=provider.how,
                           error=f"preparing the model for {provider.key} failed: {one_line(error)}")
    feeds, lengths = _fit_feeds(evaluation_feeds, prepared.shapes)
    plan = provider.session_plan(cache_dir=options.cache_dir or probe_dir.parent)
    request = _write_request(prepared.path, plan, latency_feed=latency_feed, evaluation_feeds=feeds,
                             probe_dir=probe_dir, options=options)
    failure = get_device(options.device).run_probe(request, probe_dir / "result.json", timeout_s=options.timeout_s)
    if failure is not None:
        return ProbeResult(status="failed", how=provider.how, error=failure)
    result, allocator = _read_result(probe_dir / "result.json", probe_dir / "outputs.npz", how=provider.how)
    if result.status == "ok":
        result.memory_mb["breakdown"] = memory_breakdown(result.memory_mb, weights_mb=_weights_mb(prepared.onnx_path),
                                                         allocator=allocator)
        result.outputs = [_trim(out, prepared, length) for out, length in zip(result.outputs, lengths, strict=True)]
    return result


def _prepare(model_path: Path, provider: ExecutionProvider, *, latency_feed: Feed, probe_dir: Path) -> _Prepared:
    """The model file as this EP needs it: fixed shapes (NPUs), then fp16 (GPUs), then ORT format (mobile)."""
    prep = provider.model_prep()
    if not (prep.fixed_shapes or prep.fp16 or prep.ort_format):
        return _Prepared(path=model_path, onnx_path=model_path, shapes=None)
    from edgepack.runtime import fixed_shape

    path, shapes, sequence = model_path, None, frozenset[str]()
    if prep.fixed_shapes:
        shapes = fixed_shape.feed_shapes(latency_feed)
        sequence = frozenset(fixed_shape.sequence_outputs(model_path))
        path = fixed_shape.make_shapes_fixed(path, probe_dir / "model.fixed.onnx", shapes=shapes)
    if prep.fp16:
        path = fixed_shape.convert_fp16(path, probe_dir / "model.fp16.onnx")
    onnx_path = path
    if prep.ort_format:
        path = fixed_shape.convert_ort_format(path, probe_dir / "ort")
    return _Prepared(path=path, onnx_path=onnx_path, shapes=shapes, sequence_outputs=sequence)


def _fit_feeds(feeds: Sequence[Feed], shapes: dict[str, list[int]] | None) -> tuple[list[Feed], list[int | None]]:
    """Evaluation feeds padded to the fixed shapes (and each feed's own sequence length), or as they are."""
    if shapes is None:
        return list(feeds), [None] * len(feeds)
    from edgepack.runtime.fixed_shape import pad_feed

    padded = [pad_feed(feed, shapes, index=index) for index, feed in enumerate(feeds)]
    return [feed for feed, _ in padded], [length for _, length in padded]


def _trim(outputs: dict[str, np.ndarray], prepared: _Prepared, length: int | None) -> dict[str, np.ndarray]:
    if prepared.shapes is None:
        return outputs
    from edgepack.runtime.fixed_shape import trim_outputs

    return trim_outputs(outputs, names=set(prepared.sequence_outputs), length=length)


def _weights_mb(onnx_path: Path) -> float:
    from edgepack.runtime.fixed_shape import initializer_bytes

    return initializer_bytes(onnx_path) / _MIB


def _write_request(model_path: Path, plan: SessionPlan, *, latency_feed: Feed, evaluation_feeds: Sequence[Feed],
                   probe_dir: Path, options: ProbeOptions) -> Path:
    """Write the feeds and request.json for one child run into `probe_dir`; returns request.json's path.

    Paths other than the model's are relative to `probe_dir`, so a device can get the folder as it is."""
    request = {
        "model": str(model_path),
        "ort_log_severity": ort_log_severity(),
        "plan": plan.to_json(),
        "intra_op_threads": plan.threads if plan.threads is not None else options.intra_op_threads,
        "warmup": options.warmup,
        "runs": options.runs,
        "latency_feed": _save_feeds(probe_dir / "latency.npz", [latency_feed]).name,
        "evaluation_feeds": _save_feeds(probe_dir / "evaluation.npz", evaluation_feeds).name,
        "evaluation_count": len(evaluation_feeds),
        "outputs": "outputs.npz",
        "profile_prefix": "ort-profile",
    }
    path = probe_dir / "request.json"
    path.write_text(json.dumps(request, indent=1))
    return path


def _save_feeds(path: Path, feeds: Sequence[Feed]) -> Path:
    arrays = {f"f{index:04d}__{name}": np.asarray(value) for index, feed in enumerate(feeds)
              for name, value in feed.items()}
    np.savez(path, **arrays)
    return path


def _run_child(request: Path, result: Path, *, timeout_s: float) -> str | None:
    """Run the child on this machine; None when it wrote a result, else a one-line reason."""
    return LocalDevice().run_probe(request, result, timeout_s=timeout_s)


def _read_result(result_path: Path, outputs_path: Path, *, how: str) -> tuple[ProbeResult, dict[str, float] | None]:
    """The child's result, and its CPU-allocator figures (None when it had none)."""
    payload = json.loads(result_path.read_text())
    if payload["status"] != "ok":
        return ProbeResult(status="failed", how=how, error=payload["error"]), None
    outputs = load_indexed(outputs_path, payload["evaluation_count"])
    result = ProbeResult(status="ok", how=how, latency_ms=payload["latency_ms"], memory_mb=payload["memory_mb"],
                         coverage=payload["coverage"], outputs=outputs)
    return result, payload.get("allocator")


def memory_breakdown(memory: dict[str, Any], *, weights_mb: float, allocator: dict[str, float] | None
                     ) -> dict[str, Any]:
    """Split the session's memory (MiB) into runtime baseline, weights, prepacked weights, activations, other.

    With ORT's profiler figures (CPU EP with an arena): weights are the initializers nodes still read as stored
    (parameter_size, capped at the graph's total), prepacked is the rest of the initializers, which ORT freed
    after packing them into copies of about the same size, and activations are the arena's peak in use during
    the run above what it held before. Otherwise activations are estimated as the RSS growth over the first run,
    weights are all initializers and prepacked is unknown. other: the rest of the session's RSS growth (optimized
    graph, kernels, allocator slack), never below 0.
    """
    session_mb = memory["after_session"] - memory["baseline"]
    if allocator is not None:
        weights = min(allocator["parameters"], weights_mb)
        prepacked: float | None = weights_mb - weights
        activations = allocator["activations"]
        method = "ORT profiler, first run (parameter_size; CPU arena in-use bytes)"
    else:
        weights, prepacked = weights_mb, None
        activations = max(memory["after_first_run"] - memory["after_session"], 0.0)
        method = "estimated: RSS after the first run minus RSS after session creation"
    return {
        "runtime_baseline": memory["baseline"],
        "weights": weights,
        "prepacked": prepacked,
        "activations": activations,
        "other": max(session_mb - weights - (prepacked or 0.0), 0.0),
        "initializers": weights_mb,
        "arena_held": allocator.get("arena_held") if allocator else None,
        "methods": {"runtime_baseline": "RSS after importing onnxruntime+numpy",
                    "weights": "graph initializers still read unpacked" if allocator else "graph initializers",
                    "prepacked": method if allocator else "not available (no CPU arena, or not a CPU EP)",
                    "activations": method, "other": "RSS after session creation minus the above"},
    }
