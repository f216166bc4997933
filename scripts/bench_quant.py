"""INT8 on all-MiniLM-L6-v2: edgepack against ORT, Optimum and PyTorch, side by side in one run.

edgepack's variants: edgepack-int8 (the recipe's: static, graph auto = fused on the CPU EP), edgepack-int8-qdq (the
same calibration as QDQ pairs, for NPU EPs), edgepack-int8-dynamic (quantize.mode: dynamic). Anchors (same FP32
ONNX graph, same 200 calibration sentences, same 100 held-out evaluation sentences):
  ort-static-default   onnxruntime.quantization.quantize_static(QDQ, per_channel=True, MinMax)
  ort-dynamic          onnxruntime.quantization.quantize_dynamic, its defaults
  ort-dynamic-fused    onnxruntime.transformers.optimizer (BERT fusions) + quantize_dynamic: QAttention
  optimum-static       optimum-onnx ORTQuantizer, AutoQuantizationConfig.avx512_vnni(is_static=True), MinMax
  optimum-dynamic      optimum-onnx ORTQuantizer, AutoQuantizationConfig.avx512_vnni(is_static=False) (the arm64
                       and avx512 dynamic presets are the same configuration)
  optimum-dynamic-avx2 optimum-onnx ORTQuantizer, AutoQuantizationConfig.avx2(is_static=False) (u8/u8)
  torch-dynamic        torch.ao.quantization.quantize_dynamic(nn.Linear, qint8), run in PyTorch
Every ONNX variant is measured by edgepack's harness: fresh process per variant, batch 1, sequence 128,
2 intra-op threads, 10 warm-up + 100 timed runs, best p50 of 5 interleaved passes (torch-dynamic: one pass); then
what ORT runs of each (op counts after its optimizations, time per op type from its profiler) and fidelity on the
out-of-domain split. Then calibration memory and time at 64/256/1024 samples per method, edgepack's streaming
calibrators vs ORT's, each in a fresh process. On a shared machine run the timed parts under a lock, e.g.
`flock /work/bench.lock python scripts/bench_quant.py --quality-only`.

    python scripts/bench_quant.py                 # everything (about 40 minutes on 2 cores)
    python scripts/bench_quant.py --skip-calibration
    python scripts/bench_quant.py --quality-only       # the INT8 comparison, targets and op profiles (~15 min)
    python scripts/bench_quant.py --smoothquant-only   # SmoothQuant modes table only (about a minute)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench_common import (  # noqa: E402
    DemoContext,
    machine_line,
    markdown_table,
    peak_rss_mb,
    run_child,
    write_section,
)
from _bench_int8 import (  # noqa: E402
    TimingLock,
    kernel_child,
    kernel_table,
    ood_by_domain,
    ood_fidelity,
    op_table,
    optimum_avx2_dynamic,
    ort_dynamic_anchors,
    profile_child,
    profiles,
    targets_table,
    wait_quiet,
)

CAL_METHODS = {  # edgepack calibrator -> ORT CalibrationMethod name (None: ORT has no such method)
    "minmax": "MinMax", "percentile": "Percentile", "entropy": "Entropy", "mse": None,
    "moving-average-minmax": "MinMax+moving-average",
}
CAL_SIZES = (64, 256, 1024)
#: ORT's histogram calibrators on inputs padded to 128 tokens keep every activation: ~32 MB per sample on MiniLM,
#: so 1024 samples would need ~32 GB (more than this machine has)
ORT_PADDED_MAX = 256
CAL_REPEATS = 2  # fresh-process runs per cell; the table keeps the fastest


def context(out: Path) -> Any:
    return DemoContext(out)


def build_anchors(ctx: Any, fp32: Path) -> dict[str, Path]:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    cal = list(ctx.adapter.feeds(ctx.split.calibration, max_length=128))
    anchors = ctx.out / "anchors"
    anchors.mkdir(exist_ok=True)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(cal)

        def get_next(self) -> dict | None:
            return next(self.it, None)

    paths = {"ort-static-default": anchors / "ort_static.onnx"}
    if not paths["ort-static-default"].exists():
        quantize_static(str(fp32), str(paths["ort-static-default"]), Reader(), quant_format=QuantFormat.QDQ,
                        per_channel=True)
    paths.update(ort_dynamic_anchors(fp32, anchors))
    paths.update(_optimum(fp32, anchors, cal))
    paths.update(optimum_avx2_dynamic(fp32, anchors))
    return paths


def _optimum(fp32: Path, anchors: Path, cal: list[dict]) -> dict[str, Path]:
    try:
        from optimum.onnxruntime import ORTQuantizer
        from optimum.onnxruntime.configuration import AutoQuantizationConfig, CalibrationConfig
    except ImportError:
        print("optimum-onnx not installed (pip install -e '.[bench]'); skipping Optimum anchors")
        return {}
    from onnxruntime.quantization import CalibrationMethod

    out = {}
    for name, static in (("optimum-static", True), ("optimum-dynamic", False)):
        folder = anchors / name
        target = folder / "model_quantized.onnx"
        if not target.exists():
            quantizer = ORTQuantizer(fp32)
            config = AutoQuantizationConfig.avx512_vnni(is_static=static)
            ranges = None
            if static:
                calib = CalibrationConfig(dataset_name="edgepack-sentences", dataset_config_name=None,
                                          dataset_split="calibration", dataset_num_samples=len(cal),
                                          method=CalibrationMethod.MinMax)
                rows = [{k: v[0] for k, v in feed.items()} for feed in cal]  # optimum batches rows itself
                ranges = quantizer.fit(rows, calib, onnx_augmented_model_name=str(anchors / "aug.onnx"))
            quantizer.quantize(config, folder, calibration_tensors_range=ranges)
        out[name] = target
    return out


def torch_dynamic_child(model_dir: str, feeds_path: str, out_path: str) -> None:
    """Child process: PyTorch dynamic INT8 (nn.Linear) — outputs, latency at seq 128, peak RSS."""
    import numpy as np
    import torch

    from edgepack.families import open_model

    torch.set_num_threads(2)
    module = open_model(model_dir).load_torch()
    qmodel = torch.ao.quantization.quantize_dynamic(module, {torch.nn.Linear}, dtype=torch.qint8).eval()
    data = np.load(feeds_path)
    n = int(data["n"])
    names = ["input_ids", "attention_mask", "token_type_ids"]
    with torch.no_grad():
        outs = [qmodel(*(torch.from_numpy(data[f"f{i}__{k}"]) for k in names))[1].numpy() for i in range(n)]
        lat_args = tuple(torch.from_numpy(data[f"lat__{k}"]) for k in names)
        for _ in range(10):
            qmodel(*lat_args)
        times = []
        for _ in range(100):
            start = time.perf_counter()
            qmodel(*lat_args)
            times.append((time.perf_counter() - start) * 1e3)
    buffer = __import__("io").BytesIO()
    torch.save(qmodel.state_dict(), buffer)
    np.save(out_path, np.concatenate(outs))
    print(json.dumps({"p50": float(np.percentile(times, 50)), "peak": peak_rss_mb(), "size_bytes": buffer.tell()}))


def torch_dynamic(ctx: Any, settings_feeds: tuple[list[dict], dict], ref: list[dict]) -> dict[str, Any]:
    import numpy as np

    from edgepack.runtime.metrics import fidelity

    feeds, lat = settings_feeds
    path = ctx.out / "torch_feeds.npz"
    arrays = {f"f{i}__{k}": v for i, f in enumerate(feeds) for k, v in f.items()}
    arrays.update({f"lat__{k}": v for k, v in lat.items()}, n=np.array(len(feeds)))
    np.savez(path, **arrays)
    out = ctx.out / "torch_outputs.npy"
    result = run_child([__file__, "--torch-child", str(ctx.family.source.path or ctx.family.source.text), str(path), str(out)])
    if result.get("status") == "crashed":
        return result
    emb = np.load(out)
    outputs = [{"sentence_embedding": emb[i: i + 1]} for i in range(len(feeds))]
    result["metrics"] = fidelity(ref, outputs, output="sentence_embedding")
    result["metrics"].update(ctx.adapter.task_metrics(outputs, ctx.split.evaluation))
    return result


ROUNDS = 5


def best_of_rounds(variants: dict[str, Path], ctx: Any, settings: Any, *, rounds: int) -> dict[str, Any]:
    """`rounds` interleaved passes over all variants (fresh process each); per variant the pass with the lowest p50.

    On a shared 2-core machine one pass can catch a noisy moment; interleaving puts every variant through the
    same moments, and the best pass is the least disturbed one. Fidelity is identical across passes.
    """
    from edgepack.runtime.providers import parse_providers

    best: dict[str, Any] = {}
    for _ in range(rounds):
        passed = ctx.validate(variants, samples=ctx.split.evaluation, providers=parse_providers("cpu"),
                              settings=settings, fresh=True)["variants"]
        for name, entry in passed.items():
            cpu, kept = entry["providers"]["cpu"], best.get(name, {}).get("providers", {}).get("cpu")
            if kept is None or (cpu["status"] == "ok" and cpu["latency_ms"]["p50"] < kept["latency_ms"]["p50"]):
                best[name] = entry
    return best


#: edgepack's INT8 variants: the recipe's own (graph auto = fused on the CPU EP), its portable QDQ form (the one for
#: QNN HTP / NNAPI / CoreML) and dynamic INT8 (quantize.mode: dynamic, fused graph, SmoothQuant)
EDGEPACK_VARIANTS = {"edgepack-int8": {}, "edgepack-int8-qdq": {"graph": "qdq"},
                     "edgepack-int8-dynamic": {"mode": "dynamic"}}


def quality_variants(ctx: Any, fp32: Path) -> dict[str, Path]:
    return {"fp32": fp32, **{name: ctx.quantize(fp32, **over) for name, over in EDGEPACK_VARIANTS.items()},
            **build_anchors(ctx, fp32)}


def quality_table(ctx: Any, rounds: int = ROUNDS) -> tuple[str, dict[str, Any]]:
    from edgepack.runtime.harness import ValidationSettings
    from edgepack.runtime.probe import ProbeOptions, measure

    fp32 = ctx.export()
    variants = quality_variants(ctx, fp32)
    ood = ood_fidelity(ctx, variants, fp32)
    settings = ValidationSettings(runs=100)
    eval_feeds = ctx.adapter.evaluation_feeds(ctx.split.evaluation, max_length=128)
    lat_feed = ctx.adapter.latency_feed(ctx.split.evaluation, sequence_length=128)
    ref = measure(fp32, latency_feed=lat_feed, evaluation_feeds=eval_feeds, workdir=ctx.out / "ref",
                  options=ProbeOptions(runs=5)).outputs
    with TimingLock():
        load_before = wait_quiet()
        results = best_of_rounds(variants, ctx, settings, rounds=rounds)
        torch_result = torch_dynamic(ctx, (eval_feeds, lat_feed), ref)
        load_after = wait_quiet()
    base = results["fp32"]
    base_cpu = base["providers"]["cpu"]
    rows, p50, cosine = [], {}, {}
    for name, v in results.items():
        cpu = v["providers"]["cpu"]
        if cpu["status"] != "ok":
            rows.append([name, "failed: " + str(cpu.get("error"))[:60]] + [""] * 8)
            continue
        p50[name], cosine[name] = cpu["latency_ms"]["p50"], cpu["metrics"]["cosine_mean"]
        rows.append(_row(name, v["size_bytes"], cpu["latency_ms"]["p50"], cpu["memory_mb"]["peak"], cpu["metrics"],
                         base["size_bytes"], base_cpu["latency_ms"]["p50"], base_cpu["memory_mb"]["peak"],
                         _runtime(name), ood.get(name)))
    if torch_result.get("status") != "crashed":
        p50["torch-dynamic"] = torch_result["p50"]
        rows.append(_row("torch-dynamic", torch_result["size_bytes"], torch_result["p50"], torch_result["peak"],
                         torch_result["metrics"], base["size_bytes"], base_cpu["latency_ms"]["p50"],
                         base_cpu["memory_mb"]["peak"], "PyTorch", None))
    header = ["variant", "runtime / graph", "size MB (× FP32)", "p50 ms (× FP32)", "peak RSS MB (× FP32)",
              "cosine mean / min", "OOD cosine mean / min", "OOD padded mean / min", "paraphrase R@1 / margin"]
    summary = {"p50": p50, "cosine": cosine, "ood": ood, "variants": variants, "fp32": fp32,
               "load": f"{load_before} before, {load_after} after"}
    return markdown_table(header, rows), summary


def _runtime(name: str) -> str:
    return {"edgepack-int8": "ORT CPU EP, fused", "edgepack-int8-dynamic": "ORT CPU EP, fused",
            "ort-dynamic-fused": "ORT CPU EP, fused", "edgepack-int8-qdq": "ORT CPU EP, QDQ",
            "ort-static-default": "ORT CPU EP, QDQ", "optimum-static": "ORT CPU EP, QDQ"}.get(name, "ORT CPU EP")


def _row(name: str, size: int, p50: float, peak: float, metrics: dict, size0: int, p500: float, peak0: float,
         runtime: str, ood: dict | None) -> list[str]:
    def pair(m: dict | None) -> str:
        return f"{m['cosine_mean']:.4f} / {m['cosine_min']:.4f}" if m else "–"

    return [name, runtime, f"{size / 1e6:.1f} ({size / size0:.2f})", f"{p50:.2f} ({p50 / p500:.3f})",
            f"{peak:.0f} ({peak / peak0:.2f})", pair(metrics), pair((ood or {}).get("ood")),
            pair((ood or {}).get("ood_padded")),
            f"{metrics.get('paraphrase_recall_at_1', float('nan')):.3f} / "
            f"{metrics.get('paraphrase_margin', float('nan')):.4f}"]


# ---------------------------------------------------------------- SmoothQuant modes
def smoothquant_table(ctx: Any, fp32: Path) -> str:
    """Held-out fidelity of edgepack's INT8 with each SmoothQuant mode (search per layer, per-role recipe, off)."""
    import onnxruntime as ort

    from edgepack.quantization.quantize import QuantizeOptions, quantize_static
    from edgepack.runtime.metrics import fidelity

    output = ctx.adapter.primary_output
    evaluation = list(ctx.adapter.feeds(ctx.split.evaluation, max_length=128))

    def outputs(path: Path) -> list[dict]:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return [{output: session.run([output], feed)[0]} for feed in evaluation]

    reference = outputs(fp32)
    folder = ctx.out / "smoothquant"
    folder.mkdir(exist_ok=True)
    rows = []
    for mode in ("search", "recipe", "off"):
        path = folder / f"int8-{mode}.onnx"
        metrics = quantize_static(fp32, path, n_calibration=len(ctx.split.calibration),
                                  calibration_feeds=lambda: ctx.adapter.feeds(ctx.split.calibration, max_length=128),
                                  options=QuantizeOptions(smoothquant=mode))
        score = fidelity(reference, outputs(path), output=output)
        alphas = [layer["alpha"] for layer in metrics["smoothquant"]["layers"]]
        chosen = f"{len(alphas)} layers, alpha {min(a for a in alphas if a is not None)}-" \
                 f"{max(a for a in alphas if a is not None)}" if alphas else "–"
        rows.append([mode, f"{score['cosine_mean']:.4f}", f"{score['cosine_min']:.4f}", f"{score['sqnr_db']:.2f}",
                     chosen])
    return markdown_table(["smoothquant", "cosine mean", "cosine min", "SQNR dB", "searched"], rows)


# ---------------------------------------------------------------- kernel ceiling
def weight_matmul_shapes(fp32: Path) -> list[tuple[int, int]]:
    """(K, N) of every weight MatMul of the exported model, in graph order (MiniLM: 36 = 6 layers x q, k, v, o, up, down)."""
    import onnx

    model = onnx.load(str(fp32))
    dims = {t.name: tuple(t.dims) for t in model.graph.initializer}
    return [dims[n.input[1]] for n in model.graph.node
            if n.op_type == "MatMul" and len(dims.get(n.input[1], ())) == 2]


def gemm_chain(shapes: list[tuple[int, int]], path: Path) -> Path:
    """A graph of nothing but the model's Linear layers (weight MatMul + bias Add), chained.

    The bias Add is float work the real model has too; it also keeps the INT8 chain's kernels those of the model
    (MatMulIntegerToFloat with a float output): MatMul -> MatMul directly would fuse into QLinearMatMul instead.
    Where the next K differs (q/k/v/o are 384 -> 384, up 384 -> 1536, down 1536 -> 384) the chain follows the
    model's own order, which always matches. Weights are N(0, 1/K), so activations keep their scale across 36 MatMuls
    (no overflow, no denormals to slow the FP32 kernel). Batch and sequence are symbolic, as in the exported model
    (with static shapes ORT would rewrite MatMul + Add into Reshape + Gemm, which the real model does not get).
    """
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes, inits, x = [], [], "x"
    for i, (k, n) in enumerate(shapes):
        inits.append(numpy_helper.from_array((rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32), f"w{i}"))
        inits.append(numpy_helper.from_array(np.zeros(n, np.float32), f"b{i}"))
        nodes.append(helper.make_node("MatMul", [x, f"w{i}"], [f"m{i}"], name=f"matmul{i}"))
        nodes.append(helper.make_node("Add", [f"m{i}", f"b{i}"], [f"y{i}"], name=f"bias{i}"))
        x = f"y{i}"
    graph = helper.make_graph(nodes, "gemm_chain",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "sequence", shapes[0][0]])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["batch", "sequence", shapes[-1][1]])],
                              inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def ceiling_child(fp32: str, int8: str) -> None:
    """Child process: p50 of the FP32 and INT8 GEMM chains, 3 interleaved passes of 10 warm-up + 100 runs, 2 threads."""
    import numpy as np
    import onnx
    import onnxruntime as ort

    sessions, ops = {}, {}
    for name, path in (("fp32", fp32), ("int8", int8)):
        options = ort.SessionOptions()
        options.intra_op_num_threads = 2
        options.optimized_model_filepath = str(Path(path).with_suffix(".optimized.onnx"))  # what ORT really runs
        sessions[name] = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        ops[name] = sorted({n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node})
    width = sessions["fp32"].get_inputs()[0].shape[-1]
    feed = {"x": np.random.default_rng(1).standard_normal((1, 128, width)).astype(np.float32)}  # batch 1, seq 128
    best = {name: np.inf for name in sessions}
    for _ in range(3):
        for name, session in sessions.items():
            for _ in range(10):
                session.run(None, feed)
            times = []
            for _ in range(100):
                start = time.perf_counter()
                session.run(None, feed)
                times.append((time.perf_counter() - start) * 1e3)
            best[name] = min(best[name], float(np.percentile(times, 50)))
    print(json.dumps({"status": "ok", "p50": best, "ops": ops}))


def ceiling_table(ctx: Any, fp32: Path, quality: dict[str, float] | None) -> str:
    """The INT8/FP32 time ratio of the weight GEMMs alone: no recipe can beat it with ORT's CPU kernels here."""
    import numpy as np

    from edgepack.quantization.quantize import QuantizeOptions, quantize_static

    shapes = weight_matmul_shapes(fp32)
    folder = ctx.out / "ceiling"
    folder.mkdir(exist_ok=True)
    chain = gemm_chain(shapes, folder / "gemm_fp32.onnx")
    rng = np.random.default_rng(2)
    feeds = [{"x": rng.standard_normal((1, 128, shapes[0][0])).astype(np.float32)} for _ in range(16)]
    int8 = folder / "gemm_int8.onnx"
    quantize_static(chain, int8, calibration_feeds=lambda: iter(feeds), n_calibration=len(feeds),
                    options=QuantizeOptions(family="generic", smoothquant="off"))
    result = run_child([__file__, "--ceiling-child", str(chain), str(int8)])
    if result.get("status") != "ok":
        return f"GEMM chain timing failed: {result.get('error')}"
    fp, q = result["p50"]["fp32"], result["p50"]["int8"]
    rows = [[f"{len(shapes)} Linear layers (MatMul + bias) of MiniLM's shapes, chained (b1, s128)", f"{fp:.2f}", f"{q:.2f}", f"{q / fp:.2f}"]]
    if quality:
        rows.append(["whole model (table above)", f"{quality['fp32']:.2f}", f"{quality['int8']:.2f}",
                     f"{quality['int8'] / quality['fp32']:.2f}"])
    table = markdown_table(["graph", "FP32 p50 ms", "INT8 p50 ms", "INT8 / FP32"], rows)
    ops = ", ".join(result["ops"]["int8"])
    bound = ""
    if quality and quality["fp32"] < fp:
        bound = (f" Here the FP32 chain took longer than the whole FP32 model ({fp:.2f} vs {quality['fp32']:.2f} ms: "
                 "both run ORT's MatMul kernel; the cause is not found), so on this CPU the chain's ratio is no "
                 "bound on the model; its INT8 GEMMs alone take "
                 f"{q / quality['int8']:.2f}x of the whole INT8 model's time.")
    elif quality:
        float_work = quality["fp32"] - fp  # FP32 time outside the Linear layers: attention, norms, GELU, residuals
        bound = (f" Here the FP32 model spends {float_work:.1f} ms outside its Linear layers; were all of that free "
                 f"of INT8 overhead, the INT8 model would still take ({q:.2f} + {float_work:.1f}) / "
                 f"{quality['fp32']:.2f} = {(q + float_work) / quality['fp32']:.2f}x of FP32.")
    return (f"{table}\n\nThe INT8 chain is edgepack's generic recipe (QDQ, per-channel int8 weights, uint8 "
            f"activations); after its graph optimizations ORT runs it as {ops}. Whatever the "
            "recipe, a model whose GEMMs run in ORT's INT8 kernels cannot take less than this ratio of its GEMM "
            "time, and the float work between GEMMs (LayerNorm, Softmax, GELU, bias and residual Adds, "
            f"Transposes) does not shrink with INT8 weights.{bound}")


# ---------------------------------------------------------------- calibration scaling
def calibration_texts(n: int) -> list[str]:
    """n distinct texts: the bundled sentences, then pairs of them joined (deterministic) when n exceeds them."""
    from edgepack.calibration_data import read_samples, sample_path

    base = [s.text for s in read_samples(sample_path())]
    texts = list(base)
    i = 0
    while len(texts) < n:
        texts.append(base[i % len(base)] + " " + base[(7 * i + 3) % len(base)])
        i += 1
    return texts[:n]


def calibration_child(tool: str, method: str, n: int, fp32: str) -> None:
    """Child process: calibrate `n` samples with one method; print wall time, peak RSS and tensor count."""
    import onnx

    from edgepack.calibration_data import TextSample
    from edgepack.families import default_model_path, open_model
    from edgepack.quantization.calibrators import collect_tensor_ranges, make_calibrator
    from edgepack.quantization.quantize import tensors_to_calibrate
    from edgepack.quantization.recipes import plan_quantization
    from edgepack.reporter import Reporter, set_reporter

    set_reporter(Reporter(quiet=True))
    adapter = open_model(default_model_path())
    samples = [TextSample(t) for t in calibration_texts(n)]
    next(iter(adapter.feeds(samples[:1], max_length=128)))  # load the tokenizer (imports transformers) untimed
    start = time.perf_counter()
    padding = "max_length" if tool == "ort-padded" else "longest"
    if tool == "edgepack":
        plan = plan_quantization(onnx.load(fp32, load_external_data=False))
        tensors = tensors_to_calibrate(onnx.load(fp32), plan)
        ranges = collect_tensor_ranges(Path(fp32), adapter.feeds(samples, max_length=128), tensors=tensors,
                                       calibrator=make_calibrator(method), total=n)
    else:
        ranges = _ort_calibrate(method, fp32, adapter.feeds(samples, max_length=128, padding=padding))
    print(json.dumps({"status": "ok", "seconds": time.perf_counter() - start, "peak": peak_rss_mb(),
                      "tensors": len(ranges)}))


def _ort_calibrate(method: str, fp32: str, feeds: Any) -> dict:
    import tempfile

    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, create_calibrator

    ort_method = {"MinMax": CalibrationMethod.MinMax, "Percentile": CalibrationMethod.Percentile,
                  "Entropy": CalibrationMethod.Entropy}[method.split("+")[0]]
    extra = {"moving_average": True} if method.endswith("moving-average") else {}

    class Reader(CalibrationDataReader):
        def get_next(self) -> dict | None:
            return next(feeds, None)

    with tempfile.TemporaryDirectory() as tmp:
        calibrator = create_calibrator(fp32, ["MatMul", "Gather"], augmented_model_path=f"{tmp}/aug.onnx",
                                       calibrate_method=ort_method, extra_options=extra)
        calibrator.collect_data(Reader())
        return dict(calibrator.compute_data().data)


def calibration_table(fp32: Path) -> str:
    rows = []
    for method, ort_name in CAL_METHODS.items():
        tools = [("edgepack", method), ("ort", ort_name)]
        if ort_name in ("Percentile", "Entropy"):  # ORT's histograms need one shape: give it padded inputs too
            tools.append(("ort-padded", ort_name))
        for tool, name in tools:
            if name is None:
                rows.append([method, "ort", "no such method", "", "", "", "", "", ""])
                continue
            cells = []
            for n in CAL_SIZES:
                if tool == "ort-padded" and n > ORT_PADDED_MAX:
                    cells.append({"status": "skipped", "error": f"not run: keeps every activation (~{n * 32 // 1024} GB)"})
                    continue
                print(f"calibration: {tool} {name} n={n}", flush=True)
                cells.append(_best_of(CAL_REPEATS, [__file__, "--calibration-child", tool, name, str(n), str(fp32)]))
            rows.append(_cal_row(method, tool, name, cells))
    header = ["method", "tool", "s @64", "s @256", "s @1024", "samples/s (64→1024)", "× ORT MinMax",
              "peak RSS MB @64 / @256 / @1024", "RSS ×(1024/64)"]
    reference = next((r[5] for r in rows if r[1] == "ort" and r[0].startswith("minmax (ORT MinMax)")), None)
    for row in rows:
        rate = row[5]
        row[6] = f"{rate / reference:.2f}" if isinstance(rate, float) and isinstance(reference, float) else ""
        row[5] = f"{rate:.0f}" if isinstance(rate, float) else ""
    return markdown_table(header, rows)


def _best_of(repeats: int, args: list[str]) -> dict[str, Any]:
    """The fastest of `repeats` fresh-process runs (shared cores: single runs vary by ~20%), with the highest peak."""
    runs = [run_child(args) for _ in range(repeats)]
    ok = [r for r in runs if r.get("status") == "ok"]
    if not ok:
        return runs[-1]
    return {**min(ok, key=lambda r: r["seconds"]), "peak": max(r["peak"] for r in ok)}


def _cal_row(method: str, tool: str, name: str, cells: list[dict]) -> list[str]:
    label = {"edgepack": method, "ort": f"{method} (ORT {name})",
             "ort-padded": f"{method} (ORT {name}, inputs padded to 128)"}[tool]
    if any(c.get("status") != "ok" for c in cells):
        errors = "; ".join(f"n={n}: {c.get('error', '')[:70]}" for n, c in zip(CAL_SIZES, cells, strict=True)
                           if c.get("status") == "crashed")
        ok = [f"{c['seconds']:.0f}" if c.get("status") == "ok" else c.get("status", "crash") for c in cells]
        peaks = " / ".join(f"{c['peak']:.0f}" if c.get("status") == "ok" else "–" for c in cells)
        return [label, tool, *ok, "", "", f"{peaks} {errors}".strip(), ""]
    secs = [f"{c['seconds']:.1f}" for c in cells]
    peaks = " / ".join(f"{c['peak']:.0f}" for c in cells)
    rate = (CAL_SIZES[2] - CAL_SIZES[0]) / max(cells[2]["seconds"] - cells[0]["seconds"], 1e-9)
    return [label, tool, *secs, rate, "", peaks, f"{cells[2]['peak'] / cells[0]['peak']:.2f}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/bench_quant"))
    parser.add_argument("--skip-calibration", action="store_true")
    parser.add_argument("--calibration-only", action="store_true")
    parser.add_argument("--smoothquant-only", action="store_true", help="only the SmoothQuant modes table")
    parser.add_argument("--quality-only", action="store_true",
                        help="only the INT8 comparison (speed, fidelity, out-of-domain, what ORT runs, targets)")
    parser.add_argument("--rounds", type=int, default=ROUNDS, help=f"interleaved timing passes (default {ROUNDS})")
    parser.add_argument("--lock", type=Path, help="hold an flock on this file while timing (a shared machine)")
    parser.add_argument("--torch-child", nargs=3)
    parser.add_argument("--profile-child", nargs=2)
    parser.add_argument("--kernel-child", action="store_true")
    parser.add_argument("--calibration-child", nargs=4)
    parser.add_argument("--ceiling-child", nargs=2)
    args = parser.parse_args()
    if args.torch_child:
        return torch_dynamic_child(*args.torch_child)
    if args.ceiling_child:
        return ceiling_child(*args.ceiling_child)
    if args.profile_child:
        return profile_child(*args.profile_child)
    if args.kernel_child:
        return kernel_child()
    if args.calibration_child:
        tool, method, n, fp32 = args.calibration_child
        return calibration_child(tool, method, int(n), fp32)
    args.out.mkdir(parents=True, exist_ok=True)
    TimingLock.path = args.lock
    ctx = context(args.out.resolve())
    command = "python scripts/bench_quant.py" + (" --skip-calibration" if args.skip_calibration else "")
    if args.smoothquant_only:
        return _smoothquant_section(ctx, "python scripts/bench_quant.py --smoothquant-only")
    if args.quality_only:
        command = "python scripts/bench_quant.py --quality-only"
    if not args.calibration_only:
        if not args.quality_only:
            _smoothquant_section(ctx, command)
        quality = _quality_section(ctx, command, rounds=args.rounds)
        if not args.quality_only:
            _ceiling_section(ctx, command, quality)
    if not (args.skip_calibration or args.quality_only):
        _calibration_section(ctx)


def _smoothquant_section(ctx: Any, command: str) -> None:

    table = smoothquant_table(ctx, ctx.export())
    write_section("quant-smoothquant", "## SmoothQuant: alpha per layer vs per role vs none (MiniLM, CPU EP)\n\n"
                  f"`{command}` — {machine_line()}\n\nedgepack static INT8 (no accuracy budget) with "
                  f"`quantize.smoothquant` set to each mode; fidelity of the sentence embedding vs FP32 on the "
                  f"{len(ctx.split.evaluation)} held-out sentences. `search` picks each layer's alpha by the INT8 "
                  "error of its MatMuls under exact and AVX2 u8s8 (saturating) arithmetic; `recipe` uses the "
                  "per-role values (q/k/v 0.3, FFN-in 0.7, FFN-out 0.85).\n\n"
                  f"{table}\n")
    print(table)


#: The INT8 rows the speed target compares (every ONNX Runtime INT8 row and PyTorch's)
INT8_ROWS = ("edgepack-int8", "edgepack-int8-qdq", "edgepack-int8-dynamic", "ort-static-default", "ort-dynamic",
             "ort-dynamic-fused", "optimum-static", "optimum-dynamic", "optimum-dynamic-avx2", "torch-dynamic")


def _quality_section(ctx: Any, command: str, *, rounds: int = ROUNDS) -> dict[str, float]:
    table, summary = quality_table(ctx, rounds=rounds)
    p50, variants = summary["p50"], summary["variants"]
    lat_feed = ctx.adapter.latency_feed(ctx.split.evaluation, sequence_length=128)
    with TimingLock():
        profiled = profiles(__file__, variants, lat_feed, ctx.out)
        kernels = kernel_table(__file__)
    ops = op_table(profiled, p50)
    ours = summary["ood"]["edgepack-int8"]
    ood_min = min(ours["ood"]["cosine_min"], ours["ood_padded"]["cosine_min"])
    targets = targets_table(p50, summary["cosine"], ood_min, int8_rows=list(INT8_ROWS))
    domains = ood_by_domain(ctx, variants["edgepack-int8"], summary["fp32"])
    write_section("quant-quality", f"## INT8 on all-MiniLM-L6-v2 (CPU EP): edgepack vs ONNX Runtime, Optimum, "
                  f"PyTorch\n\n`{command}` (or `make bench`) — {machine_line()}\n\n"
                  f"{len(ctx.split.calibration)} calibration / {len(ctx.split.evaluation)} held-out evaluation sentences "
                  "(bundled set, disjoint); batch 1, sequence 128, 2 threads, 10 warm-up + 100 timed runs, fresh process "
                  f"per row, best p50 of {rounds} interleaved passes (1-minute load average of this shared machine: "
                  f"{summary['load']}); cosine of the sentence embedding vs FP32 ONNX on the held-out sentences; OOD = "
                  "the out-of-domain split (`edgepack/calibration_data/samples/ood_text.jsonl`: 200 texts of stdlib "
                  "docstrings, code, 150-400-word docstrings, service logs and keyword queries), one text per run "
                  "(truncated to 128 tokens) and in batches of 8 padded to 128 tokens; paraphrase R@1 = recall@1 of "
                  f"each sentence's paraphrase among all {len(ctx.split.evaluation)}, margin = mean of cos(sentence, "
                  "its paraphrase) - max cos(sentence, another paraphrase).\n\n"
                  "`edgepack-int8` is what `edgepack run recipes/minilm.yaml` makes on the CPU EP (`quantize.graph: "
                  "auto` = fused: QAttention, MatMulIntegerToFloat with the bias folded in, QEmbedLayerNormalization, "
                  "calibrated scales, SmoothQuant alphas searched per layer; Sum + LayerNormalization and Gelu in "
                  "place of ORT's slower SkipLayerNormalization / BiasGelu kernels); `edgepack-int8-qdq` the "
                  "same calibration as QDQ pairs (`graph: qdq`, the form QNN HTP / NNAPI / CoreML take); "
                  "`edgepack-int8-dynamic` is `quantize.mode: dynamic` (fused graph, SmoothQuant, ranges at run time)."
                  f"\n\n{table}\n\n### Targets (issue 16)\n\n{targets}\n\n"
                  "### What ONNX Runtime runs (after its graph optimizations; time per op type from its profiler)\n\n"
                  "One fresh process per variant, the same batch 1 x 128-token input, 10 warm-up + 50 profiled runs; "
                  "the profiler's per-node times add its own overhead, so they sum to more than the p50.\n\n"
                  f"{ops}\n\n### Kernel choices of the fused graph (CPU time, robust to a busy machine)\n\n"
                  "CPU time (user + system, all threads) per run, ORT thread spinning off, 2 threads, best of 5 x 200 "
                  "runs, one fresh process: the cost of each choice without the wall-clock noise of shared cores.\n\n"
                  f"{kernels}\n\n### edgepack-int8 on the out-of-domain split, per domain (one text per run)\n\n"
                  f"{domains}\n")
    print(table, targets, ops, kernels, domains, sep="\n\n")
    return {"fp32": p50["fp32"], "int8": p50["edgepack-int8"]}


def _ceiling_section(ctx: Any, command: str, quality: dict[str, float]) -> None:

    with TimingLock():
        table = ceiling_table(ctx, ctx.export(), quality)
    write_section("quant-ceiling", "## INT8 GEMM ceiling on this CPU (the best INT8 / FP32 ratio ORT's GEMMs allow)\n\n"
                  f"`{command}` — {machine_line()}\n\nBest p50 of 3 interleaved passes (10 warm-up + 100 runs, "
                  f"2 threads, one fresh process).\n\n{table}\n")
    print(table)


def _calibration_section(ctx: Any) -> None:

    fp32 = ctx.export()
    with TimingLock():
        cal = calibration_table(fp32)
    write_section("quant-calibration", "## Calibration memory and time vs sample count (MiniLM)\n\n"
                  f"`python scripts/bench_quant.py` — {machine_line()}\n\nFresh process per cell; the tokenizer is loaded "
                  "before the clock starts, then the time covers reading and tokenizing the samples, the augmented "
                  "model, the ONNX Runtime session and the ranges. samples/s is the marginal rate "
                  "(1024 - 64) / (t@1024 - t@64), without the fixed setup; each cell is the faster of "
                  f"{CAL_REPEATS} runs. edgepack calibrates the tensors its plan "
                  "quantizes (63 on MiniLM); ORT's calibrator, given MatMul and Gather, the inputs and outputs of all "
                  "of them (99). Peak RSS of the "
                  "whole process (model, tokenizer, ONNX Runtime). edgepack's calibrators stream (fixed state per "
                  "tensor); ORT's keep activations in memory. Calibration inputs are unpadded (each sentence its own "
                  "length) unless the row says padded. Samples beyond the 676 bundled sentences are pairs of them "
                  f"joined.\n\n{cal}\n")
    print(cal)


if __name__ == "__main__":
    main()
