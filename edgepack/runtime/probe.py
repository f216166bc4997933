"""Measure one ONNX model on one execution provider in a fresh subprocess: latency, memory, outputs.

Memory is per process, so every measurement starts a new Python that imports only numpy and onnxruntime
(never torch or transformers) and reads its own VmRSS / VmHWM from /proc/self/status. ONNX Runtime does the
inference; the phases, timing and the parent/child protocol are ours, because ORT has no per-session memory
figure and a crashing EP must not take the caller down with it.

Protocol (all files in a fresh folder under `workdir`):
    parent writes  latency.npz, evaluation.npz (keys `f0003__input_ids`: feed 3, input `input_ids`), request.json
    parent runs    [sys.executable, "-m", "edgepack.runtime.probe", request.json, result.json] with a timeout
    child writes   result.json (status, latency_ms, memory_mb, output names) and outputs.npz (same key scheme)
The .npz files are deleted once read; the two .json files stay for inspection.

Child order: imports -> read request and latency feed -> baseline -> InferenceSession -> after_session ->
first run -> after_first_run -> warm-up and timed runs -> peak (VmHWM) -> only then the evaluation feeds,
so evaluation data never inflates the memory figures.

>>> result = measure(Path("model.onnx"), latency_feed=feed, evaluation_feeds=[feed],   # doctest: +SKIP
...                  workdir=Path("runs/probe"), options=ProbeOptions(provider="cpu"))
>>> result.status, result.latency_ms["p50"], result.memory_mb["peak"]                 # doctest: +SKIP
('ok', 0.41, 61.2)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnxruntime as ort

from edgepack.errors import BadInputError
from edgepack.runtime.providers import get_provider

if TYPE_CHECKING:
    from edgepack.calibration_data import Feed

MEMORY_METHOD = "VmRSS/VmHWM of a fresh process; baseline after importing onnxruntime+numpy"


@dataclass(frozen=True)
class ProbeOptions:
    provider: str = "cpu"
    #: ORT intra-op threads; 0 lets ONNX Runtime choose (one per physical core).
    intra_op_threads: int = 2
    #: Untimed runs after the first run (which is timed on its own as `first_run_ms`).
    warmup: int = 10
    runs: int = 50
    timeout_s: float = 600

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
    #: {"p50","p90","p99","mean","std","min","max","first_run_ms","runs","warmup","threads","shape": {input: dims}}
    latency_ms: dict[str, Any] = field(default_factory=dict)
    #: {"baseline","after_session","after_first_run","peak","method"}, MiB
    memory_mb: dict[str, Any] = field(default_factory=dict)
    #: Outputs for each evaluation feed, in order: output name -> array.
    outputs: list[dict[str, np.ndarray]] = field(default_factory=list)

    def to_report(self) -> dict[str, Any]:
        """The JSON-able part, as report.json's `providers.<ep>` entry wants it (outputs left out)."""
        report: dict[str, Any] = {"status": self.status, "how": self.how}
        if self.error is not None:
            report["error"] = self.error
        return {**report, "latency_ms": self.latency_ms, "memory_mb": self.memory_mb}


# ---------------------------------------------------------------------------------------------------- parent


def measure(model_path: Path, *, latency_feed: Feed, evaluation_feeds: Sequence[Feed], workdir: Path,
            options: ProbeOptions) -> ProbeResult:
    """Run the model in a fresh subprocess on `options.provider`; never raises for an EP or model failure.

    Returns status "unavailable" (with the reason, no subprocess started) when the EP cannot run here, and
    "failed" with ONNX Runtime's message when the session or a run fails, the child crashes or times out.
    """
    provider = get_provider(options.provider)
    reason = provider.availability()
    if reason is not None:
        return ProbeResult(status="unavailable", how=provider.how, error=reason)
    model_path = Path(model_path).resolve()
    if not model_path.is_file():
        raise BadInputError(f"{model_path}: model file not found; pass the path of an .onnx file")
    if not latency_feed:
        raise BadInputError("latency feed is empty; it needs one array per model input")
    workdir.mkdir(parents=True, exist_ok=True)
    probe_dir = Path(tempfile.mkdtemp(prefix=f"probe-{provider.name}-", dir=workdir))
    try:
        request = _write_request(model_path, provider.session_providers(), latency_feed=latency_feed,
                                 evaluation_feeds=evaluation_feeds, probe_dir=probe_dir, options=options)
        failure = _run_child(request, probe_dir / "result.json", timeout_s=options.timeout_s)
        if failure is not None:
            return ProbeResult(status="failed", how=provider.how, error=failure)
        return _read_result(probe_dir / "result.json", probe_dir / "outputs.npz", how=provider.how)
    finally:
        for path in probe_dir.glob("*.npz"):
            path.unlink()


def _write_request(model_path: Path, session_providers: list[Any], *, latency_feed: Feed,
                   evaluation_feeds: Sequence[Feed], probe_dir: Path, options: ProbeOptions) -> Path:
    """Write the feeds and request.json for one child run into `probe_dir`; returns request.json's path."""
    request = {
        "model": str(model_path),
        "providers": session_providers,
        "intra_op_threads": options.intra_op_threads,
        "warmup": options.warmup,
        "runs": options.runs,
        "latency_feed": str(_save_feeds(probe_dir / "latency.npz", [latency_feed])),
        "evaluation_feeds": str(_save_feeds(probe_dir / "evaluation.npz", evaluation_feeds)),
        "evaluation_count": len(evaluation_feeds),
        "outputs": str(probe_dir / "outputs.npz"),
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


def _read_result(result_path: Path, outputs_path: Path, *, how: str) -> ProbeResult:
    payload = json.loads(result_path.read_text())
    if payload["status"] != "ok":
        return ProbeResult(status="failed", how=how, error=payload["error"])
    outputs = _load_indexed(outputs_path, payload["evaluation_count"])
    return ProbeResult(status="ok", how=how, latency_ms=payload["latency_ms"], memory_mb=payload["memory_mb"],
                       outputs=outputs)


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


def _session(request: dict[str, Any]) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = request["intra_op_threads"]
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only; we report the exception text ourselves
    # JSON turned ("QNNExecutionProvider", {...}) pairs into lists; ORT wants tuples.
    providers = [tuple(p) if isinstance(p, list) else p for p in request["providers"]]
    session = ort.InferenceSession(request["model"], sess_options=options, providers=providers)
    wanted = providers[0][0] if isinstance(providers[0], tuple) else providers[0]
    if wanted not in session.get_providers():
        # ORT falls back to the CPU with only a log warning; a CPU figure labelled as another EP would be a lie.
        raise RuntimeError(f"ONNX Runtime did not apply {wanted}; the session got {session.get_providers()}")
    return session


def _latency(session: ort.InferenceSession, feed: Feed, request: dict[str, Any]) -> dict[str, Any]:
    """Warm-up, then `runs` timed runs with perf_counter; percentiles and spread in ms."""
    for _ in range(request["warmup"]):
        session.run(None, feed)
    times_ms = np.empty(request["runs"])
    for index in range(request["runs"]):
        start = time.perf_counter()
        session.run(None, feed)
        times_ms[index] = (time.perf_counter() - start) * 1e3
    p50, p90, p99 = (float(p) for p in np.percentile(times_ms, [50, 90, 99]))
    spread = {"mean": float(times_ms.mean()), "std": float(times_ms.std()), "min": float(times_ms.min()),
              "max": float(times_ms.max())}
    return {"p50": p50, "p90": p90, "p99": p99, **spread, "runs": request["runs"], "warmup": request["warmup"],
            "threads": request["intra_op_threads"], "shape": {name: list(a.shape) for name, a in feed.items()}}


def _probe(request: dict[str, Any]) -> dict[str, Any]:
    (latency_feed,) = _load_indexed(Path(request["latency_feed"]), 1)
    baseline, _, method = _memory_mb()
    session = _session(request)
    after_session, _, _ = _memory_mb()
    start = time.perf_counter()
    session.run(None, latency_feed)
    first_run_ms = (time.perf_counter() - start) * 1e3
    after_first_run, _, _ = _memory_mb()
    latency = _latency(session, latency_feed, request)
    _, peak, _ = _memory_mb()
    # Evaluation data is read only now, after the peak, so it does not count as the model's memory.
    names = [output.name for output in session.get_outputs()]
    outputs: dict[str, np.ndarray] = {}
    for index, feed in enumerate(_load_indexed(Path(request["evaluation_feeds"]), request["evaluation_count"])):
        for name, value in zip(names, session.run(names, feed), strict=True):
            outputs[f"f{index:04d}__{name}"] = np.asarray(value)
    np.savez(request["outputs"], **outputs)
    memory = {"baseline": baseline, "after_session": after_session, "after_first_run": after_first_run,
              "peak": peak, "method": method}
    return {"status": "ok", "latency_ms": {**latency, "first_run_ms": first_run_ms}, "memory_mb": memory,
            "evaluation_count": request["evaluation_count"]}


def _child_main(request_path: Path, result_path: Path) -> int:
    request = json.loads(request_path.read_text())
    try:
        result = _probe(request)
    except Exception as error:  # an ORT rejection is the measurement's result, reported as "failed"
        result = {"status": "failed", "error": " ".join(f"{type(error).__name__}: {error}".split())}
    # Write then rename: a crash mid-write must not leave a result.json that looks complete.
    partial = result_path.with_suffix(".partial")
    partial.write_text(json.dumps(result, indent=1))
    partial.replace(result_path)
    return 0


if __name__ == "__main__":
    raise SystemExit(_child_main(Path(sys.argv[1]), Path(sys.argv[2])))
