"""Shared pieces of the benchmark scripts: the MiniLM run context, subprocess timing, docs/benchmarks.md sections."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BENCH_DOC = REPO / "docs" / "benchmarks.md"


def machine_line() -> str:
    import platform

    import onnxruntime
    import torch

    cpu = "unknown CPU"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        match = re.search(r"model name\s*:\s*(.+)", cpuinfo.read_text())
        cpu = match.group(1).strip() if match else cpu
    return (f"{cpu}, {__import__('os').cpu_count()} cores; Python {platform.python_version()}, onnxruntime "
            f"{onnxruntime.__version__}, torch {torch.__version__}; {time.strftime('%Y-%m-%d')}")


def run_child(args: list[str], *, timeout: float = 3600) -> dict[str, Any]:
    """Run `python <args>` in a fresh process; it must print one JSON object on its last stdout line."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, cwd=REPO)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"status": "crashed", "error": last[:200], "wall_s": wall}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result.setdefault("wall_s", wall)
    return result


def write_section(name: str, body: str) -> None:
    """Replace (or append) the section between `<!-- name:start -->` and `<!-- name:end -->` in docs/benchmarks.md."""
    BENCH_DOC.parent.mkdir(exist_ok=True)
    text = BENCH_DOC.read_text() if BENCH_DOC.exists() else "# edgepack benchmarks\n\n"
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{body.rstrip()}\n{end}"
    if start in text and end in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    BENCH_DOC.write_text(text)


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)
