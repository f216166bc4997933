"""Per-EP validation of all-MiniLM-L6-v2 FP32 and edgepack INT8 (QDQ graph, and the CPU EP's fused graph), and
repeat-run memory stability.

Providers: cpu, mobile-cpu (1/2/4 threads, memory-lean options, ORT-format load), qnn-htp (onnxruntime-qnn HTP
backend, *emulated* on x86: numerics and node assignment are real, timings are not device timings), nnapi and
coreml (static partition analysis: not runnable on Linux), xnnpack, cuda, tensorrt (reported unavailable here).
Memory stability: the same measurement (INT8, CPU EP) in three fresh processes; target spread <= 3%.

    python scripts/bench_providers.py            # about 10 minutes on 2 cores (the HTP simulator is slow)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench_common import machine_line, markdown_table, report_of, write_section  # noqa: E402

PROVIDERS = "cpu,mobile-cpu,qnn-htp,nnapi,coreml,xnnpack,cuda,tensorrt"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/bench_quant"), help="reuses bench_quant's stages")
    parser.add_argument("--sequence-length", type=int, default=64)
    args = parser.parse_args()
    from bench_quant import context

    from edgepack.report import results_rows
    from edgepack.report.writer import COLUMNS
    from edgepack.runtime.harness import ValidationSettings
    from edgepack.runtime.providers import parse_providers

    args.out.mkdir(parents=True, exist_ok=True)
    ctx = context(args.out.resolve())
    fp32 = ctx.export()
    # int8: the QDQ graph (what a recipe with an NPU EP in validate.providers makes: quantize.graph auto -> qdq);
    # int8-fused: the CPU EP's fused integer ops (graph fused), which the NPU EPs do not run
    variants = {"fp32": fp32, "int8": ctx.quantize(fp32, graph="qdq"), "int8-fused": ctx.quantize(fp32, graph="fused")}
    settings = ValidationSettings(sequence_length=args.sequence_length, max_length=args.sequence_length, runs=50)
    samples = ctx.split.evaluation[:20]
    results = ctx.validate(variants, samples=samples, providers=parse_providers(PROVIDERS), settings=settings)
    table = markdown_table(list(COLUMNS), results_rows(report_of(results, variants, ctx)))
    stability = _stability(ctx, variants["int8"], settings)
    write_section("providers", f"## Per-EP validation of all-MiniLM-L6-v2 (FP32, edgepack INT8 QDQ and fused)\n\n"
                  f"`python scripts/bench_providers.py` — {machine_line()}\n\nBatch 1, sequence {args.sequence_length}, "
                  f"{len(samples)} evaluation sentences (4 on the emulated HTP: the simulator takes seconds per "
                  "inference); fidelity vs FP32 on the CPU EP on the same sentences. `how`: device = measured on this "
                  "machine; emulated = QNN HTP simulator on x86 (numerics and node assignment real, **timings are not "
                  "device timings**); static-analysis = onnxruntime's mobile partition checker, nothing run. Coverage = "
                  f"nodes on the EP / total, partitions.\n\n{table}\n\n{stability}\n")
    print(table)
    print(stability)


def _stability(ctx: object, model: Path, settings: object) -> str:
    import numpy as np

    from edgepack.runtime.probe import ProbeOptions, measure

    feeds = ctx.adapter.evaluation_feeds(ctx.split.evaluation[:5], max_length=settings.max_length)
    lat = ctx.adapter.latency_feed(ctx.split.evaluation, sequence_length=settings.sequence_length)
    rows, peaks = [], []
    for i in range(3):
        result = measure(model, latency_feed=lat, evaluation_feeds=feeds, workdir=ctx.out / f"stability-{i}",
                         options=ProbeOptions(runs=50))
        mem = result.memory_mb
        peaks.append(mem["peak"])
        rows.append([str(i + 1), f"{mem['after_session']:.1f}", f"{mem['after_first_run']:.1f}", f"{mem['peak']:.1f}",
                     f"{result.latency_ms['p50']:.2f}"])
    spread = (max(peaks) - min(peaks)) / float(np.mean(peaks)) * 100
    table = markdown_table(["process", "after session MB", "after first run MB", "peak MB", "p50 ms"], rows)
    return (f"### Repeat-run stability (INT8, CPU EP, three fresh processes)\n\n{table}\n\nPeak RSS spread "
            f"{spread:.2f}% of the mean (target <= 3%).")


if __name__ == "__main__":
    main()
