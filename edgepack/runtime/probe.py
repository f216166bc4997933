"""Measure one ONNX model on one execution provider in a fresh subprocess: latency, memory, coverage, outputs.

Memory is per process, so every measurement starts a new Python that imports only numpy and onnxruntime
(never torch, transformers or onnx) and reads its own VmRSS / VmHWM from /proc/self/status. ONNX Runtime does
the inference and the partitioning; the phases, timing and the parent/child protocol are ours, because ORT has
no per-session memory figure and a crashing EP must not take the caller down with it.

Protocol (all files in a fresh folder under `workdir`):
    parent prepares the model the EP needs (fixed shapes, fp16, ORT format: `fixed_shape.py`), pads the
                   evaluation feeds to a fixed shape, and writes latency.npz, evaluation.npz (keys
                   `f0003__input_ids`: feed 3, input `input_ids`) and request.json (with the provider's SessionPlan)
    parent runs    [sys.executable, "-m", "edgepack.runtime.probe", request.json, result.json] with a timeout
    child writes   result.json (status, latency_ms, memory_mb, coverage, allocator) and outputs.npz
The .npz files and prepared model copies are deleted once read; the two .json files stay for inspection.
Static-analysis providers (NNAPI / CoreML where this runtime lacks them) start no child: `static_analysis.py`.

Child order: imports -> read request and latency feed -> baseline -> InferenceSession (timed: load_ms) ->
after_session -> first run -> after_first_run -> warm-up and timed runs -> peak (VmHWM) -> coverage ->
only then the evaluation feeds, so evaluation data never inflates the memory figures -> last, for CPU EPs, a
second session with ORT's profiler on, whose per-node figures split the memory (weights read unpacked,
prepacked copies, activations).

>>> result = measure(Path("model.onnx"), latency_feed=feed, evaluation_feeds=[feed],   # doctest: +SKIP
...                  workdir=Path("runs/probe"), options=ProbeOptions(provider="cpu"))
>>> result.status, result.latency_ms["p50"], result.coverage["nodes_on_ep"]          # doctest: +SKIP
('ok', 0.41, 3)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnxruntime as ort

from edgepack.errors import BadInputError
from edgepack.runtime.coverage import coverage_from_assignment, session_assignment
from edgepack.runtime.providers import ExecutionProvider, SessionPlan, apply_plan, get_provider

if TYPE_CHECKING:
    from edgepack.calibration_data import Feed

MEMORY_METHOD = "VmRSS/VmHWM of a fresh process; baseline after importing onnxruntime+numpy"
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
    reason = provider.availability()
    if reason is not None:
        return ProbeResult(status="unavailable", how=provider.how, error=reason)
    model_path = Path(model_path).resolve()
    if not model_path.is_file():
        raise BadInputError(f"{model_path}: model file not found; pass the path of an .onnx file")
    if not latency_feed:
        raise BadInputError("latency feed is empty; it needs one array per model input")
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
        return ProbeResult(status="failed", how=provider.how, error=_one_line(error))
    return ProbeResult(status="ok", how=provider.how, coverage=coverage)


def _measure_in_child(model_path: Path, provider: ExecutionProvider, *, latency_feed: Feed,
                      evaluation_feeds: Sequence[Feed], probe_dir: Path, options: ProbeOptions) -> ProbeResult:
    try:
        prepared = _prepare(model_path, provider, latency_feed=latency_feed, probe_dir=probe_dir)
    except BadInputError:
        raise
    except Exception as error:
        return ProbeResult(status="failed", how=provider.how,
                           error=f"preparing the model for {provider.key} failed: {_one_line(error)}")
    feeds, lengths = _fit_feeds(evaluation_feeds, prepared.shapes)
    plan = provider.session_plan(cache_dir=options.cache_dir or probe_dir.parent)
    request = _write_request(prepared.path, plan, latency_feed=latency_feed, evaluation_feeds=feeds,
                             probe_dir=probe_dir, options=options)
    failure = _run_child(request, probe_dir / "result.json", timeout_s=options.timeout_s)
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
    """Write the feeds and request.json for one child run into `probe_dir`; returns request.json's path."""
    request = {
        "model": str(model_path),
        "plan": plan.to_json(),
        "intra_op_threads": plan.threads if plan.threads is not None else options.intra_op_threads,
        "warmup": options.warmup,
        "runs": options.runs,
        "latency_feed": str(_save_feeds(probe_dir / "latency.npz", [latency_feed])),
        "evaluation_feeds": str(_save_feeds(probe_dir / "evaluation.npz", evaluation_feeds)),
        "evaluation_count": len(evaluation_feeds),
        "outputs": str(probe_dir / "outputs.npz"),
        "profile_prefix": str(probe_dir / "ort-profile"),
    }
    path = probe_dir / "request.json"
    path.write_text(json.dumps(request, indent=1))
    return path


def _save_feeds(path: Path, feeds: Sequence[Feed]) -> Path:
    arrays = {f"f{index:04d}__{name}": np.asarray(value) for index, feed in enumerate(feeds)
              for name, value in feed.items()}
    np.savez(path, **arrays)
    return path


def _load_indexed(path: Path, count: int) -> list[dict[str, np.ndarray]]:
    """Inverse of `_save_feeds`: `count` dicts, in order (a feed with no arrays comes back empty)."""
    found: list[dict[str, np.ndarray]] = [{} for _ in range(count)]
    with np.load(path, allow_pickle=False) as data:
        for key in data.files:
            index, name = key.split("__", 1)  # "f0003__input_ids" -> ("f0003", "input_ids")
            found[int(index[1:])][name] = data[key]
    return found


def _child_env() -> dict[str, str]:
    """The caller's environment, with the folder that holds `edgepack` first on PYTHONPATH (works uninstalled)."""
    root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(part for part in (root, env.get("PYTHONPATH")) if part)
    return env


def _run_child(request: Path, result: Path, *, timeout_s: float) -> str | None:
    """Run the child; None when it wrote a result, else a one-line reason (last line of its stderr)."""
    command = [sys.executable, "-m", "edgepack.runtime.probe", str(request), str(result)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, env=_child_env(),
                              stdin=subprocess.DEVNULL, check=False)
    except subprocess.TimeoutExpired:
        return f"the probe process did not finish within {timeout_s:g} s and was killed"
    if done.returncode == 0 and result.is_file():
        return None
    lines = [line.strip() for line in done.stderr.splitlines() if line.strip()]
    last = lines[-1] if lines else "no message on stderr"
    return f"the probe process exited with code {done.returncode}: {last}"


def _read_result(result_path: Path, outputs_path: Path, *, how: str) -> tuple[ProbeResult, dict[str, float] | None]:
    """The child's result, and its CPU-allocator figures (None when it had none)."""
    payload = json.loads(result_path.read_text())
    if payload["status"] != "ok":
        return ProbeResult(status="failed", how=how, error=payload["error"]), None
    outputs = _load_indexed(outputs_path, payload["evaluation_count"])
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


def _one_line(error: BaseException) -> str:
    return " ".join(f"{type(error).__name__}: {error}".split())


# ----------------------------------------------------------------------------------------------------- child


def _memory_mb() -> tuple[float, float, str]:
    """(current RSS, peak RSS, method) of this process, in MiB.

    Linux: VmRSS and VmHWM from /proc/self/status. Elsewhere psutil's RSS, and the OS's peak (Windows'
    peak working set, or getrusage's ru_maxrss, which macOS reports in bytes and others in KiB).
    """
    status = Path("/proc/self/status")
    if status.is_file():
        fields = dict(line.split(":", 1) for line in status.read_text().splitlines() if ":" in line)
        rss_kib, hwm_kib = (float(fields[key].split()[0]) for key in ("VmRSS", "VmHWM"))  # "  51234 kB"
        return rss_kib / 1024, hwm_kib / 1024, MEMORY_METHOD
    import psutil  # only off Linux: not needed (or installed) on the usual host

    info = psutil.Process().memory_info()
    peak_bytes = getattr(info, "peak_wset", None)
    if peak_bytes is None:
        import resource

        max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak_bytes = max_rss if sys.platform == "darwin" else max_rss * 1024
    method = "psutil RSS and the OS's peak RSS of a fresh process; baseline after importing onnxruntime+numpy"
    return info.rss / 2**20, peak_bytes / 2**20, method


def _session_options(request: dict[str, Any], *, profile: bool = False) -> ort.SessionOptions:
    plan = request["plan"]
    options = ort.SessionOptions()
    options.intra_op_num_threads = request["intra_op_threads"]
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only; we report the exception text ourselves
    # Which node runs where, after fusions: the coverage figures. `session.disable_cpu_ep_fallback` is left
    # off on purpose: the nodes an NPU rejects must run on the CPU so we can count them.
    options.add_session_config_entry("session.record_ep_graph_assignment_info", "1")
    if plan["lean_memory"]:
        # Memory-lean, as on a phone: no arena (frees return to the OS), no pre-planned activation block,
        # no prepacked weight copies (at the price of repacking per run).
        options.enable_cpu_mem_arena = False
        options.enable_mem_pattern = False
        options.add_session_config_entry("session.disable_prepacking", "1")
    if profile:
        options.enable_profiling = True
        options.profile_file_prefix = request["profile_prefix"]
    return options


def _session(request: dict[str, Any], options: ort.SessionOptions) -> ort.InferenceSession:
    plan = SessionPlan.from_json(request["plan"])
    providers = apply_plan(plan, options)  # registers a plugin EP (QNN) in this process when the plan has one
    session = ort.InferenceSession(request["model"], sess_options=options, providers=providers)
    if plan.expect_ep not in session.get_providers():
        # ORT falls back to the CPU with only a log warning; a CPU figure labelled as another EP would be a lie.
        raise RuntimeError(f"ONNX Runtime did not apply {plan.expect_ep}; the session got {session.get_providers()}")
    return session


def _runner(session: ort.InferenceSession, feed: Feed, device: str | None) -> Callable[[], object]:
    """One inference as a callable; with IO binding, inputs are copied to `device` once, outputs stay there."""
    if device is None:
        return lambda: session.run(None, feed)
    binding = session.io_binding()
    for name, value in feed.items():
        binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(value, device, 0))
    for output in session.get_outputs():
        binding.bind_output(output.name, device)

    def run() -> None:
        session.run_with_iobinding(binding)
        binding.synchronize_outputs()  # the GPU runs asynchronously; time until the results exist

    return run


def _latency(run: Callable[[], object], feed: Feed, request: dict[str, Any]) -> dict[str, Any]:
    """Warm-up, then `runs` timed runs with perf_counter; percentiles and spread in ms."""
    for _ in range(request["warmup"]):
        run()
    times_ms = np.empty(request["runs"])
    for index in range(request["runs"]):
        start = time.perf_counter()
        run()
        times_ms[index] = (time.perf_counter() - start) * 1e3
    p50, p90, p99 = (float(p) for p in np.percentile(times_ms, [50, 90, 99]))
    spread = {"mean": float(times_ms.mean()), "std": float(times_ms.std()), "min": float(times_ms.min()),
              "max": float(times_ms.max())}
    return {"p50": p50, "p90": p90, "p99": p99, **spread, "runs": request["runs"], "warmup": request["warmup"],
            "threads": request["intra_op_threads"], "shape": {name: list(a.shape) for name, a in feed.items()}}


def _allocator_profile(request: dict[str, Any], feed: Feed) -> dict[str, float] | None:
    """ORT profiler figures for one run of a fresh session (MiB), or None when it reports no memory.

    ORT >= 1.2x writes, per node event, parameter_size (the initializers the node reads as stored, so a
    weight ORT replaced by a prepacked copy no longer counts) and the CPU arena's mem_bytes_in_use /
    mem_in_use_peak / mem_arena_held; a session without an arena (the lean profile) writes no memory figures.
    """
    session = _session(request, _session_options(request, profile=True))
    session.run(None, feed)
    path = Path(session.end_profiling())
    try:
        events = [e for e in json.loads(path.read_text()) if e.get("cat") == "Node"
                  and "mem_bytes_in_use" in e.get("args", {})]
    finally:
        path.unlink(missing_ok=True)
    if not events:
        return None
    first = min(events, key=lambda e: e["ts"])["args"]
    before = int(first["mem_bytes_in_use"]) - int(first["mem_in_use_delta"])  # held before the first node ran
    peak = max(int(e["args"]["mem_in_use_peak"]) for e in events)
    return {"parameters": sum(int(e["args"].get("parameter_size", 0)) for e in events) / _MIB,
            "activations": (peak - before) / _MIB, "in_use_before_run": before / _MIB,
            "arena_held": max(int(e["args"]["mem_arena_held"]) for e in events) / _MIB}


def _evaluate(session: ort.InferenceSession, request: dict[str, Any]) -> None:
    names = [output.name for output in session.get_outputs()]
    outputs: dict[str, np.ndarray] = {}
    for index, feed in enumerate(_load_indexed(Path(request["evaluation_feeds"]), request["evaluation_count"])):
        for name, value in zip(names, session.run(names, feed), strict=True):
            outputs[f"f{index:04d}__{name}"] = np.asarray(value)
    np.savez(request["outputs"], **outputs)


def _probe(request: dict[str, Any]) -> dict[str, Any]:
    plan = request["plan"]
    (latency_feed,) = _load_indexed(Path(request["latency_feed"]), 1)
    baseline, _, method = _memory_mb()
    start = time.perf_counter()
    session = _session(request, _session_options(request))
    load_ms = (time.perf_counter() - start) * 1e3
    after_session, _, _ = _memory_mb()
    run = _runner(session, latency_feed, plan["io_binding_device"])
    start = time.perf_counter()
    run()
    first_run_ms = (time.perf_counter() - start) * 1e3
    after_first_run, _, _ = _memory_mb()
    latency = _latency(run, latency_feed, request)
    _, peak, _ = _memory_mb()
    assignment = session_assignment(session)
    coverage = {} if assignment is None else coverage_from_assignment(assignment, target=plan["expect_ep"])
    # Evaluation data is read only now, after the peak, so it does not count as the model's memory.
    _evaluate(session, request)
    allocator = _allocator_profile(request, latency_feed) if plan["profile_memory"] else None
    memory = {"baseline": baseline, "after_session": after_session, "after_first_run": after_first_run,
              "peak": peak, "method": method}
    return {"status": "ok", "latency_ms": {**latency, "first_run_ms": first_run_ms, "load_ms": load_ms},
            "memory_mb": memory, "coverage": coverage, "allocator": allocator,
            "evaluation_count": request["evaluation_count"]}


def _child_main(request_path: Path, result_path: Path) -> int:
    request = json.loads(request_path.read_text())
    try:
        result = _probe(request)
    except Exception as error:  # an ORT rejection is the measurement's result, reported as "failed"
        result = {"status": "failed", "error": _one_line(error)}
    # Write then rename: a crash mid-write must not leave a result.json that looks complete.
    partial = result_path.with_suffix(".partial")
    partial.write_text(json.dumps(result, indent=1))
    partial.replace(result_path)
    return 0


if __name__ == "__main__":
    raise SystemExit(_child_main(Path(sys.argv[1]), Path(sys.argv[2])))
