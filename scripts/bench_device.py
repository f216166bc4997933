"""Local vs SSH (loopback) measurement of all-MiniLM-L6-v2 FP32 and edgepack INT8: the remote path's overhead.

Three ways to run the same probe child on this machine, interleaved round by round (so drift hits all alike):
- local: `python probe_child.py` in a fresh process (what `edgepack validate` does);
- ssh, same Python: through an OpenSSH server on 127.0.0.1 (tests/local_sshd.py), the child started by sshd with
  this interpreter: the transport is the only difference;
- ssh, minimal venv: a venv with onnxruntime and numpy only (same versions, --no-deps), as a device would have.
Target (issue 13): the SSH path's p50 within the machine's noise (the spread of the local p50 over the rounds) and
its peak memory within 3 % of the local path's.

    python scripts/bench_device.py --prepare                                  # models, venv (no timing)
    flock /work/bench.lock nice -n 0 python scripts/bench_device.py           # about 5 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(REPO))
from _bench_common import machine_line, markdown_table, write_section  # noqa: E402


def _paths(server: Any, minimal: Any) -> dict[str, str]:
    return {"local": "local", "ssh, same Python": server.url, "ssh, minimal venv": minimal.url}


def _measure(model: Path, path: str, *, feed: Any, feeds: list[Any], workdir: Path, runs: int) -> dict[str, Any]:
    from edgepack.runtime.probe import ProbeOptions, measure

    result = measure(model, latency_feed=feed, evaluation_feeds=feeds, workdir=workdir,
                     options=ProbeOptions(provider="cpu", intra_op_threads=2, warmup=10, runs=runs, timeout_s=900,
                                          device=path))
    if result.status != "ok":
        raise SystemExit(f"{path}: {result.error}")
    return {"p50": result.latency_ms["p50"], "p90": result.latency_ms["p90"], "peak": result.memory_mb["peak"],
            "baseline": result.memory_mb["baseline"], "after_session": result.memory_mb["after_session"],
            "outputs": result.outputs}


def _rows(results: dict[tuple[str, str], list[dict[str, Any]]], paths: list[str], variants: list[str]) -> list[list[str]]:
    import numpy as np

    rows = []
    for variant in variants:
        local = results[(variant, "local")]
        local_p50 = [r["p50"] for r in local]
        noise = (max(local_p50) - min(local_p50)) / statistics.median(local_p50)
        for path in paths:
            runs = results[(variant, path)]
            p50s = [r["p50"] for r in runs]
            best, median = min(p50s), statistics.median(p50s)
            peak = statistics.median(r["peak"] for r in runs)
            base_peak = statistics.median(r["peak"] for r in local)
            diff = max(float(np.max(np.abs(a[k] - b[k]))) for r in runs
                       for a, b in zip(r["outputs"], local[0]["outputs"], strict=True) for k in a)
            rows.append([variant, path, f"{best:.2f}", f"{(best / min(local_p50) - 1) * 100:+.1f}%",
                         f"{median:.2f}", f"{(median / statistics.median(local_p50) - 1) * 100:+.1f}%",
                         f"{min(p50s):.2f}–{max(p50s):.2f}", f"±{noise * 100 / 2:.1f}%",
                         f"{statistics.median(r['baseline'] for r in runs):.1f}", f"{peak:.1f}",
                         f"{(peak / base_peak - 1) * 100:+.2f}%", f"{diff:.1e}"])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/bench_quant"), help="reuses bench_quant's stages")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--runs", type=int, default=100, help="timed runs per measurement")
    parser.add_argument("--prepare", action="store_true", help="build the models and the device venv, measure nothing")
    args = parser.parse_args()
    from bench_quant import context

    from tests.local_sshd import local_sshd, minimal_python

    ctx = context(args.out.resolve())
    fp32 = ctx.export()
    variants = {"fp32": fp32, "int8": ctx.quantize(fp32)}
    venv = minimal_python()
    if args.prepare:
        print(f"ready: {', '.join(str(p) for p in variants.values())}; device venv {venv}")
        return
    samples = ctx.split.evaluation[:8]
    feed = ctx.family.latency_feed(samples, sequence_length=128)
    feeds = ctx.family.evaluation_feeds(samples[:4], max_length=128)
    results: dict[tuple[str, str], list[dict[str, Any]]] = {}
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench-device-") as scratch, \
            local_sshd(Path(scratch) / "same", python=Path(sys.executable)) as server, \
            local_sshd(Path(scratch) / "minimal", python=venv) as minimal:
        paths = _paths(server, minimal)
        names = list(paths)
        for round_ in range(args.rounds):
            for variant, model in variants.items():
                # rotate the order each round: on shared cores, load drifts within a round too
                for name in names[round_ % len(names):] + names[: round_ % len(names)]:
                    spec = paths[name]
                    workdir = Path(scratch) / f"r{round_}-{variant}-{name.replace(' ', '_').replace(',', '')}"
                    results.setdefault((variant, name), []).append(
                        _measure(model, spec, feed=feed, feeds=feeds, workdir=workdir, runs=args.runs))
                    print(f"round {round_ + 1} {variant} {name}: p50 {results[(variant, name)][-1]['p50']:.2f} ms, "
                          f"peak {results[(variant, name)][-1]['peak']:.1f} MiB", flush=True)
    load = f"load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after (2 cores)"
    header = ["variant", "path", "p50 ms, best round", "vs local", "p50 ms, median round", "vs local",
              "p50 range over rounds", "local noise (± half range / median)", "baseline MiB", "peak MiB (median)",
              "peak vs local", "max abs diff of outputs vs local"]
    table = markdown_table(header, _rows(results, list(paths), list(variants)))
    write_section("device", "## Local vs SSH measurement (same host, loopback)\n\n"
                  f"`python scripts/bench_device.py --prepare && flock /work/bench.lock nice -n 0 python "
                  f"scripts/bench_device.py` — {machine_line()}\n\n"
                  f"all-MiniLM-L6-v2 FP32 and edgepack INT8, CPU EP, 2 threads, batch 1, sequence 128, 10 warm-up + "
                  f"{args.runs} timed runs per fresh process, {args.rounds} rounds interleaved (local, ssh same "
                  "Python, ssh minimal venv; the order rotated each round). The machine's noise is the local path's "
                  f"own p50 spread over the rounds (shared cores: other jobs run beside the benchmark, {load}); the best "
                  "round is the least disturbed one. The SSH rows ran through an OpenSSH server on 127.0.0.1: the model and "
                  "the standalone probe copied once, the child started by sshd, result.json and outputs copied back. "
                  "`ssh, minimal venv`: a venv holding onnxruntime and numpy only (the same versions): its baseline "
                  "differs because the other copy of the onnxruntime library has fewer resident file pages mapped "
                  "(RssFile), not because the measurement differs (RssAnon agrees; docs/devices.md).\n\n"
                  f"{table}\n")
    print(table)


if __name__ == "__main__":
    main()
