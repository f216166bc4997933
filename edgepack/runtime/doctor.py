"""`edgepack doctor`, and the device block that heads every report: what the figures' machine is and can run.

The facts are read on the device itself (`probe_child.device_facts`: host name, OS, CPU model and its int8
instructions, cores, CPU quota, memory total / available / cgroup limit, Python, ONNX Runtime and numpy versions,
ORT's providers); each registered EP says whether it can run there (`ExecutionProvider.availability`, or the
device's onnxruntime for a remote one) and, in `doctor`, proves it by running a one-node model on it in a fresh
probe process, so "available" means a session was created and ran, not only that a name is listed.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from edgepack.runtime.devices import get_device
from edgepack.runtime.providers import PROVIDERS, ExecutionProvider, get_provider

AVAILABLE = "available"


def registered_providers() -> list[ExecutionProvider]:
    """One provider per registered EP name (families with profiles as their bare name)."""
    return [get_provider(name) for name in PROVIDERS]


def device_block(device: str = "local", *, providers: Sequence[ExecutionProvider] | None = None,
                 threads: int | None = None) -> dict[str, Any]:
    """report.json's `device` block (`report.model.DeviceInfo`); BadInputError when the device cannot be reached."""
    target = get_device(device)
    facts = dict(target.facts())
    chosen = list(providers) if providers is not None else registered_providers()
    facts["providers"] = {p.key: _state(target.availability(p), p) for p in chosen}
    facts["threads"] = threads
    return facts


def _state(reason: str | None, provider: ExecutionProvider) -> str:
    if reason is not None:
        return reason
    return f"static analysis only ({provider.missing_hint})" if provider.static_only else AVAILABLE


def _tiny_model(folder: Path) -> Path:
    """y = relu(x @ W): x (1, 8) float32, the smallest graph every EP takes (a MatMul, so NPUs and GPUs engage)."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.full((8, 8), 0.125, dtype=np.float32), "W")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["xw"]), helper.make_node("Relu", ["xw"], ["y"])], "doctor",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])], initializer=[weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    path = folder / "doctor.onnx"
    onnx.save(model, path)
    return path


def check_providers(device: str = "local", *, timeout_s: float = 300) -> dict[str, str]:
    """EP -> "available" (a one-node model ran on it here, in a fresh process), "static analysis only: ...", or
    why not (the availability reason, or ONNX Runtime's message when the session failed)."""
    import numpy as np

    from edgepack.runtime.probe import ProbeOptions, measure

    target = get_device(device)
    status: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="edgepack-doctor-") as scratch:
        model = _tiny_model(Path(scratch))
        feed = {"x": np.ones((1, 8), dtype=np.float32)}
        for provider in registered_providers():
            key = provider.expand()[0].key  # a family with profiles: its first profile stands for it
            reason = target.availability(provider)
            if reason is not None:
                status[provider.key] = reason
                continue
            if provider.static_only:
                status[provider.key] = f"static analysis only ({provider.missing_hint})"
                continue
            options = ProbeOptions(provider=key, warmup=0, runs=1, timeout_s=timeout_s, device=device)
            result = measure(model, latency_feed=feed, evaluation_feeds=[], workdir=Path(scratch) / key.replace(
                "/", "_"), options=options)
            label = AVAILABLE + (" (emulated)" if provider.how == "emulated" else "")
            status[provider.key] = label if result.status == "ok" else f"session failed: {result.error}"
    return status


def doctor(device: str = "local", *, threads: int = 2) -> dict[str, Any]:
    """The device block, with every EP checked by a real one-node run."""
    block = device_block(device, threads=threads)
    block["providers"] = check_providers(device)
    return block


def device_lines(block: dict[str, Any]) -> list[str]:
    """The block as text lines (CLI, report.md, report.html share them)."""
    def mib(value: float | None) -> str:
        return "–" if value is None else f"{value / 1024:.1f} GiB"

    quota = f", CPU quota {block['cpu_quota']:g}" if block.get("cpu_quota") else ""
    threads = f"; measured with {block['threads']} intra-op threads" if block.get("threads") else ""
    lines = [
        f"device: {block['label']} ({block['hostname']}, {block['os']}, {block['machine']})",
        f"CPU: {block['cpu']}; int8 ISA: {block['int8_isa']}",
        f"cores: {block.get('cores')} ({block.get('usable_cores')} usable{quota}){threads}",
        f"memory: {mib(block.get('memory_total_mb'))} total, {mib(block.get('memory_available_mb'))} available, "
        f"limit {mib(block.get('memory_limit_mb')) if block.get('memory_limit_mb') else 'none (no cgroup limit)'}",
        f"runtime: Python {block['python']}, onnxruntime {block['onnxruntime']}, numpy {block['numpy']}; ORT "
        f"providers: {', '.join(block.get('ort_providers') or [])}",
    ]
    return lines + [f"EP {name}: {state}" for name, state in (block.get("providers") or {}).items()]
