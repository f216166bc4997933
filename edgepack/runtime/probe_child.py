"""The probe's child side, as one standalone file: ONNX Runtime, numpy and the standard library, nothing else.

    python probe_child.py request.json result.json     one measurement (probe.py writes the request)
    python probe_child.py --facts                      this device's facts as one JSON line

`runtime/probe.py` starts this file in a fresh process on this machine; `runtime/devices.py` copies it unchanged
to a remote device (SSH, adb) that has only onnxruntime and numpy installed, so the same code measures there.
It must never import edgepack, torch, transformers or onnx: memory is per process, and the device has none of them.

Paths in request.json (feeds, outputs, profile prefix, and the model when it is not absolute) are relative to
request.json's folder, so the folder can be copied to a device as it is.

Order: imports -> read request and latency feed -> baseline -> InferenceSession (timed: load_ms) -> after_session
-> first run -> after_first_run -> warm-up and timed runs -> peak (VmHWM) -> coverage -> only then the evaluation
feeds, so evaluation data never inflates the memory figures -> last, for CPU EPs, a second session with ORT's
profiler on, whose per-node figures split the memory (weights read unpacked, prepacked copies, activations).

Also here, because the device reports them about itself: the CPU model and its int8 dot-product instructions,
cores, memory limit (`device_facts`), and the EP coverage count of a session (`coverage_from_assignment`).
"""

from __future__ import annotations

import json
import os
import platform
import re
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

try:
    import numpy as np
    import onnxruntime as ort
except ImportError as _missing:  # a device without them: one line the parent turns into "install it there"
    if __name__ == "__main__":
        sys.stderr.write(f"edgepack-probe: missing Python package {_missing.name}: {_missing}\n")
        raise SystemExit(3) from None
    raise

MEMORY_METHOD = "VmRSS/VmHWM of a fresh process; baseline after importing onnxruntime+numpy"
#: ONNX Runtime log severity: 0 verbose, 1 info, 2 warning, 3 error (edgepack's default: errors only)
DEFAULT_LOG_SEVERITY = 3
_MIB = 2**20

# ------------------------------------------------------------------------------------------------ device facts

#: cpuinfo flag -> the name people use; none of them: INT8 GEMMs use AVX2 / NEON multiply-adds
INT8_ISA_FLAGS = (("amx_int8", "AMX-INT8"), ("avx512_vnni", "AVX-512 VNNI"), ("avx_vnni", "AVX-VNNI"),
                  ("i8mm", "ARM i8mm"), ("asimddp", "ARM dot-product"))


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def cpu_flags() -> set[str]:
    match = re.search(r"^(?:flags|Features)\s*:\s*(.+)$", _cpuinfo(), re.MULTILINE)
    return set(match.group(1).split()) if match else set()


def cpu_model() -> str:
    match = re.search(r"^(?:model name|Hardware|Processor)\s*:\s*(.+)$", _cpuinfo(), re.MULTILINE)
    return match.group(1).strip() if match else (platform.processor() or "unknown CPU")


def describe_int8_isa(flags: set[str]) -> str:
    """The int8 dot-product extensions among `flags` (VNNI before AMX in the text when both: most used first)."""
    found = [name for flag, name in INT8_ISA_FLAGS if flag in flags]
    order = ["AVX-512 VNNI", "AVX-VNNI", "AMX-INT8", "ARM i8mm", "ARM dot-product"]
    found.sort(key=order.index)
    if "AVX-512 VNNI" in found and "AVX-VNNI" in found:
        found.remove("AVX-VNNI")  # the 256-bit encoding of the same instruction
    if found:
        return ", ".join(found)
    return "none (AVX2 multiply-add)" if "avx2" in flags else "none"


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def memory_facts() -> dict[str, float | None]:
    """MiB: total and available (/proc/meminfo MemAvailable) and the cgroup limit (v2 memory.max, v1
    memory.limit_in_bytes); None where the OS does not say or there is no limit."""
    info = _read("/proc/meminfo") or ""
    fields = {m.group(1): float(m.group(2)) / 1024 for m in re.finditer(r"^(\w+):\s+(\d+) kB", info, re.MULTILINE)}
    limit: float | None = None
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        text = _read(path)
        if text and text.isdigit() and int(text) < 2**60:  # cgroup v1 writes a huge number for "no limit"
            limit = int(text) / _MIB
            break
    return {"memory_total_mb": fields.get("MemTotal"), "memory_available_mb": fields.get("MemAvailable"),
            "memory_limit_mb": limit}


def cpu_quota() -> float | None:
    """CPUs the cgroup allows (cpu.max "quota period"); None without a quota."""
    parts = (_read("/sys/fs/cgroup/cpu.max") or "max").split()
    return int(parts[0]) / int(parts[1]) if len(parts) == 2 and parts[0].isdigit() else None


def device_facts() -> dict[str, Any]:
    """What a figure measured here depends on: host, CPU and its int8 ISA, cores, memory, runtime versions."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"hostname": platform.node(), "os": f"{platform.system()} {platform.release()}",
            "machine": platform.machine(), "cpu": cpu_model(), "cores": os.cpu_count(), "usable_cores": usable,
            "cpu_quota": cpu_quota(), "int8_isa": describe_int8_isa(cpu_flags()), **memory_facts(),
            "python": platform.python_version(), "onnxruntime": ort.__version__, "numpy": np.__version__,
            "ort_providers": list(ort.get_available_providers())}


# ---------------------------------------------------------------------------------------------------- coverage

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
                        "DmlExecutionProvider", "XnnpackExecutionProvider", "WebGpuExecutionProvider"})
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
        return coverage_counts(on_target, elsewhere, partitions=None if elsewhere else 1, method=ASSIGNMENT_METHOD)
    return coverage_counts(on_target, elsewhere, partitions=partitions, method=ASSIGNMENT_METHOD)


def coverage_counts(on_target: Counter[str], elsewhere: Counter[str], *, partitions: int | None,
                    method: str) -> dict[str, Any]:
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


# ------------------------------------------------------------------------------------------------------ session

_REGISTERED_PLUGINS: set[str] = set()


def apply_plan_json(plan: dict[str, Any], options: Any) -> list[Any] | None:
    """Put the plan's EP (`SessionPlan.to_json()`) into `options`; returns `InferenceSession(providers=...)`.

    A plugin EP is registered (once per process: ORT refuses a second registration) and added with
    `add_provider_for_devices`; it must not also be named in `providers=`, so None comes back. Naming a plugin
    EP in `providers=` without this would not fail: ORT would silently run everything on the CPU.
    """
    plugin = plan.get("plugin")
    if not plugin:
        return [tuple(p) if isinstance(p, list) else p for p in plan.get("providers", ())]
    # Read by the plugin when it is registered and when it picks an adapter (WebGPU's software-adapter switch).
    os.environ.update(plan.get("plugin_env") or {})
    if plugin["registration_name"] not in _REGISTERED_PLUGINS:
        ort.register_execution_provider_library(plugin["registration_name"], plugin["library_path"])
        _REGISTERED_PLUGINS.add(plugin["registration_name"])
    devices = [device for device in ort.get_ep_devices() if device.ep_name == plugin["ep_name"]]
    if not devices:
        raise RuntimeError(f"{plugin['library_path']} registered, but {plugin['ep_name']} reports no device")
    options.add_provider_for_devices(devices, dict(plan.get("plugin_options") or {}))
    return None


def _session_options(request: dict[str, Any], *, profile: bool = False) -> Any:
    plan = request["plan"]
    options = ort.SessionOptions()
    options.intra_op_num_threads = request["intra_op_threads"]
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = request.get("ort_log_severity", DEFAULT_LOG_SEVERITY)
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
        options.profile_file_prefix = str(request["profile_prefix"])
    return options


def _session(request: dict[str, Any], options: Any) -> Any:
    plan = request["plan"]
    providers = apply_plan_json(plan, options)  # registers a plugin EP (QNN, WebGPU) in this process
    session = ort.InferenceSession(str(request["model"]), sess_options=options, providers=providers)
    if plan["expect_ep"] not in session.get_providers():
        # ORT falls back to the CPU with only a log warning; a CPU figure labelled as another EP would be a lie.
        raise RuntimeError(f"ONNX Runtime did not apply {plan['expect_ep']}; the session got "
                           f"{session.get_providers()}")
    return session


# -------------------------------------------------------------------------------------------------- measuring

Feed = dict[str, Any]


def load_indexed(path: Path, count: int) -> list[dict[str, Any]]:
    """`count` dicts from an .npz with keys `f0003__input_ids` (feed 3, input `input_ids`), in order."""
    found: list[dict[str, Any]] = [{} for _ in range(count)]
    with np.load(path, allow_pickle=False) as data:
        for key in data.files:
            index, name = key.split("__", 1)  # "f0003__input_ids" -> ("f0003", "input_ids")
            found[int(index[1:])][name] = data[key]
    return found


def memory_mb() -> tuple[float, float, str]:
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


def _runner(session: Any, feed: Feed, device: str | None) -> Callable[[], object]:
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
    """Warm-up, then `runs` timed runs with perf_counter; percentiles and spread in ms (p25/p75: the
    interquartile range `edgepack compare` draws its noise band from)."""
    for _ in range(request["warmup"]):
        run()
    times_ms = np.empty(request["runs"])
    for index in range(request["runs"]):
        start = time.perf_counter()
        run()
        times_ms[index] = (time.perf_counter() - start) * 1e3
    p25, p50, p75, p90, p99 = (float(p) for p in np.percentile(times_ms, [25, 50, 75, 90, 99]))
    spread = {"mean": float(times_ms.mean()), "std": float(times_ms.std()), "min": float(times_ms.min()),
              "max": float(times_ms.max()), "p25": p25, "p75": p75}
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


def _evaluate(session: Any, request: dict[str, Any]) -> None:
    names = [output.name for output in session.get_outputs()]
    outputs: dict[str, Any] = {}
    for index, feed in enumerate(load_indexed(Path(request["evaluation_feeds"]), request["evaluation_count"])):
        for name, value in zip(names, session.run(names, feed), strict=True):
            outputs[f"f{index:04d}__{name}"] = np.asarray(value)
    np.savez(request["outputs"], **outputs)


def probe(request: dict[str, Any]) -> dict[str, Any]:
    """One measurement; `request`'s paths already resolved (see `_resolve`)."""
    plan = request["plan"]
    (latency_feed,) = load_indexed(Path(request["latency_feed"]), 1)
    baseline, _, method = memory_mb()
    start = time.perf_counter()
    session = _session(request, _session_options(request))
    load_ms = (time.perf_counter() - start) * 1e3
    after_session, _, _ = memory_mb()
    run = _runner(session, latency_feed, plan["io_binding_device"])
    start = time.perf_counter()
    run()
    first_run_ms = (time.perf_counter() - start) * 1e3
    after_first_run, _, _ = memory_mb()
    latency = _latency(run, latency_feed, request)
    _, peak, _ = memory_mb()
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


def task(request: dict[str, Any]) -> dict[str, Any]:
    """Task mode (`probe.measure_task`): baseline -> session -> the family's task -> peak; arrays to "outputs".

    `request["module"]` is imported by name, so task children run where edgepack is importable (this machine).
    """
    import importlib

    module = importlib.import_module(request["module"])
    with np.load(request["arrays"], allow_pickle=False) as data:
        arrays = {key: data[key] for key in data.files}
    baseline, _, method = memory_mb()
    session = _session(request, _session_options(request))
    after_session, _, _ = memory_mb()
    output = module.run(session, request["payload"], arrays)
    _, peak, _ = memory_mb()
    np.savez(request["outputs"], **output.get("arrays", {}))
    return {"status": "ok", "metrics": output["metrics"],
            "memory_mb": {"baseline": baseline, "after_session": after_session, "peak": peak, "method": method}}


def one_line(error: BaseException) -> str:
    return " ".join(f"{type(error).__name__}: {error}".split())


_PATH_KEYS = ("model", "latency_feed", "evaluation_feeds", "outputs", "profile_prefix")


def _resolve(request: dict[str, Any], folder: Path) -> dict[str, Any]:
    """The request with its relative paths taken relative to request.json's folder."""
    return {**request, **{key: str(folder / request[key]) for key in _PATH_KEYS if key in request}}


def child_main(request_path: Path, result_path: Path) -> int:
    request = _resolve(json.loads(request_path.read_text()), request_path.resolve().parent)
    ort.set_default_logger_severity(request.get("ort_log_severity", DEFAULT_LOG_SEVERITY))
    try:
        result = task(request) if request.get("mode") == "task" else probe(request)
    except Exception as error:  # an ORT rejection is the measurement's result, reported as "failed"
        result = {"status": "failed", "error": one_line(error)}
    # Write then rename: a crash mid-write must not leave a result.json that looks complete.
    partial = result_path.with_suffix(".partial")
    partial.write_text(json.dumps(result, indent=1))
    partial.replace(result_path)
    return 0


def main(argv: Iterable[str]) -> int:
    args = list(argv)
    if args == ["--facts"]:
        print(json.dumps(device_facts()))
        return 0
    if len(args) != 2:
        sys.stderr.write("usage: probe_child.py REQUEST.json RESULT.json | probe_child.py --facts\n")
        return 2
    return child_main(Path(args[0]), Path(args[1]))


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
