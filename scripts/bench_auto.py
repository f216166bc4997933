"""Benchmark `edgepack auto` against the hand recipes in recipes/ under the same budgets (docs/benchmarks.md, "Auto").

Three phases, so that no timing holds the bench lock for long:

    .venv/bin/python scripts/bench_auto.py hand   --model minilm     # the hand recipes (edgepack run), cached
    .venv/bin/python scripts/bench_auto.py search --model minilm     # edgepack auto, wall time measured
    flock /work/bench.lock nice -n 0 .venv/bin/python scripts/bench_auto.py measure --model minilm

`measure` puts the FP32 reference, every hand recipe's final model and the auto search's chosen model and Pareto
front through one harness run (fresh processes, CPU EP, the auto recipe's evaluation split, 100 timed runs), judges
the budgets on those figures, and writes the table. The target: auto's model at least 1.5x smaller than the
smallest hand configuration that meets the same budgets, found within 60 minutes on this machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench_common import REPO, machine_line, markdown_table, write_section  # noqa: E402


@dataclass(frozen=True)
class Bench:
    auto_recipe: str
    hand_recipes: tuple[str, ...]
    budgets: tuple[str, ...] = ("accuracy_drop=0.5", "peak_rss_mb=40")


BENCHES = {
    "minilm": Bench("recipes/minilm-auto.yaml", ("recipes/minilm.yaml", "recipes/minilm-small.yaml")),
    # the quick one: the teacher pruned without training, against the teacher in INT8 (about 30 minutes here)
    "minilm-int8": Bench("recipes/minilm-auto-int8.yaml", ("recipes/minilm.yaml",), budgets=("accuracy_drop=0.5",)),
    # per-part precision (weight-only INT4 / INT8 per layer and for the embedding table), against the static INT8
    # recipe and the INT4-everywhere one
    "minilm-int4": Bench("recipes/minilm-auto-int4.yaml", ("recipes/minilm.yaml", "recipes/minilm-int4.yaml"),
                         budgets=("accuracy_drop=0.5", "min_cosine=0.99")),
}


def _paths(out: Path) -> dict[str, Path]:
    return {"hand": out / "hand.json", "search": out / "search.json", "auto": out / "auto"}


def phase_hand(bench: Bench, out: Path) -> None:
    from edgepack.pipeline import run_recipe
    from edgepack.recipe import load_recipe

    finals = {}
    for path in bench.hand_recipes:
        recipe = load_recipe(REPO / path)
        start = time.perf_counter()
        report = run_recipe(recipe, out / f"hand-{recipe.name}")
        final = list(report.variants)[-1]
        finals[path] = {"model": str(out / f"hand-{recipe.name}" / report.variants[final].path), "variant": final,
                        "wall_s": round(time.perf_counter() - start, 1),
                        "stages": [s.model_dump() for s in report.stages]}
    _paths(out)["hand"].write_text(json.dumps(finals, indent=1))


def phase_search(bench: Bench, out: Path, *, backend: str, workers: int | None) -> None:
    from edgepack.auto.driver import run_auto
    from edgepack.recipe import load_recipe

    start = time.perf_counter()
    report = run_auto(load_recipe(REPO / bench.auto_recipe), _paths(out)["auto"], budgets=list(bench.budgets),
                      backend=backend, workers=workers)
    wall = time.perf_counter() - start
    summary = report.auto
    assert summary is not None
    _paths(out)["search"].write_text(json.dumps({"wall_s": round(wall, 1), "auto": summary.model_dump(mode="json"),
                                                 "stages": _stage_times(_paths(out)["auto"])}, indent=1))


def _stage_times(folder: Path) -> dict[str, dict[str, float]]:
    """Stage -> {count, seconds} over the folders the search wrote (what its time went into)."""
    totals: dict[str, dict[str, float]] = {}
    for manifest in [*folder.glob("*/manifest.json"), *folder.glob("auto/*/manifest.json")]:
        data = json.loads(manifest.read_text())
        entry = totals.setdefault(data.get("stage", "?"), {"count": 0, "seconds": 0.0})
        entry["count"] += 1
        entry["seconds"] = round(entry["seconds"] + float(data.get("wall_time_s") or 0.0), 1)
    return totals


def _variants(out: Path) -> tuple[dict[str, Path], dict[str, Any]]:
    """The FP32 teacher (the auto run's reference), the auto finalists and Pareto front, each hand recipe's final."""
    hand = json.loads(_paths(out)["hand"].read_text())
    search = json.loads(_paths(out)["search"].read_text())
    auto_dir = _paths(out)["auto"]
    report = json.loads((auto_dir / "report.json").read_text())
    variants = {"fp32": auto_dir / report["variants"]["fp32"]["path"]}
    for c in search["auto"]["candidates"]:
        if c["finalist"] or c["pareto"]:
            variants[f"auto-trial-{c['trial']}"] = auto_dir / c["model"]
    for path, info in hand.items():
        variants[f"hand:{Path(path).stem}"] = Path(info["model"])
    return variants, search


def phase_measure(bench: Bench, out: Path) -> None:
    from edgepack import stages
    from edgepack.auto.budgets import Measurement, merge_budgets
    from edgepack.families import open_model
    from edgepack.onnx_files import model_bytes
    from edgepack.pipeline import load_split
    from edgepack.recipe import load_recipe
    from edgepack.runtime.harness import ValidationSettings
    from edgepack.runtime.providers import parse_providers

    recipe = load_recipe(REPO / bench.auto_recipe)
    variants, search = _variants(out)
    family = open_model(str(variants["fp32"]))
    settings = ValidationSettings(sequence_length=128, max_length=recipe.data.max_length, threads=2, warmup=10,
                                  runs=100)
    start = time.perf_counter()
    result = stages.validate(variants, family, samples=load_split(recipe).evaluation, providers=parse_providers("cpu"),
                             settings=settings, compared_to={k: (None if k == "fp32" else "fp32") for k in variants},
                             folder=out / "measure", cache_dir=out / "ep-cache")
    rows = result.metrics["variants"]
    budgets = merge_budgets(recipe.auto.budgets, bench.budgets)
    metric = search["auto"]["metric"]
    ref_metric = rows["fp32"]["providers"]["cpu"]["metrics"][metric]
    table, measured = [], {}
    for name, path in variants.items():
        cpu = rows[name]["providers"]["cpu"]
        memory = cpu["memory_mb"]
        m = Measurement(size_mb=model_bytes(path) / 1e6, metric=cpu["metrics"].get(metric),
                        accuracy_drop=round((ref_metric - cpu["metrics"].get(metric)) * 100, 4),
                        peak_rss_mb=memory["peak"] - memory["baseline"], process_peak_rss_mb=memory["peak"],
                        p50_ms=cpu["latency_ms"]["p50"], cosine_mean=cpu["metrics"].get("cosine_mean"),
                        cosine_min=cpu["metrics"].get("cosine_min"), how="harness")
        measured[name] = m
        meets = all(b.met(m) for b in budgets)
        cosine = "–" if m.cosine_mean is None else f"{m.cosine_mean:.4f}"
        table.append([name, f"{m.size_mb:.2f}", f"{m.metric:.4f}", f"{m.accuracy_drop:.2f}", cosine,
                      f"{m.peak_rss_mb:.1f}", f"{m.p50_ms:.2f}", "yes" if meets else "no"])
    _write(bench, out, table, measured, budgets, search, wall=time.perf_counter() - start)


def _write(bench: Bench, out: Path, table: list[list[str]], measured: dict[str, Any], budgets: list[Any],
           search: dict[str, Any], *, wall: float) -> None:
    from edgepack.report.auto import PARETO_COLUMNS
    from edgepack.report.model import AutoSummary

    meets = {k for k, m in measured.items() if all(b.met(m) for b in budgets)}
    hand = sorted((k for k in meets if k.startswith("hand:")), key=lambda k: measured[k].size_mb)
    summary = AutoSummary.model_validate(search["auto"])
    chosen = f"auto-trial-{summary.chosen}" if summary.chosen is not None else None
    verdict = "no hand recipe meets the budgets"
    if hand and chosen in measured and chosen in meets:
        ratio = measured[hand[0]].size_mb / measured[chosen].size_mb
        verdict = (f"auto's model ({chosen}, {measured[chosen].size_mb:.2f} MB) is **{ratio:.2f}x smaller** than the "
                   f"smallest hand recipe that meets the same budgets ({hand[0]}, {measured[hand[0]].size_mb:.2f} MB); "
                   f"target 1.5x: {'met' if ratio >= 1.5 else 'MISSED'}")
    elif chosen is None:
        verdict = f"auto chose nothing: {summary.verdict}"
    from edgepack.report.auto import pareto_rows

    counts = summary.counts
    stage_times = ", ".join(f"{k} {v['count']}x {v['seconds']:.0f} s" for k, v in search["stages"].items())
    key = next(k for k, b in BENCHES.items() if b == bench)
    body = "\n".join([
        f"## Auto search: compression x quantization against budgets (all-MiniLM-L6-v2, {bench.auto_recipe})", "",
        f"Machine: {machine_line()}", "",
        f"Budgets: {', '.join(b.describe() for b in budgets)} (accuracy_drop: paraphrase R@1 below the FP32 teacher "
        "in points; min_cosine: mean cosine of the sentence embedding to the FP32 teacher's on the same sentences; "
        "peak_rss_mb: the model's VmHWM over the runtime baseline). Commands: `python scripts/bench_auto.py "
        f"hand --model {key}`, `... search --model {key}` (no lock), then `flock /work/bench.lock nice -n 0 python "
        f"scripts/bench_auto.py measure --model {key}` "
        f"(this table: one harness run, CPU EP, 2 threads, batch 1, sequence 128, 100 timed runs, {wall:.0f} s).", "",
        markdown_table(["variant", "size MB", "R@1", "accuracy drop (pt)", "cosine to FP32", "peak RSS MiB (model)",
                        "p50 ms", "meets budgets"], table), "",
        f"- {verdict}",
        f"- search wall time: {search['wall_s'] / 60:.1f} min (target 60) for {len(summary.candidates)} trials on "
        f"{summary.backend}: {counts.get('built', 0)} built, {counts.get('pruned_by_proxy', 0)} pruned by proxies, "
        f"{counts.get('pruned_by_halving', 0)} by successive halving (rungs {summary.rung_samples}), "
        f"{counts.get('failed', 0)} failed, {counts.get('promoted', 0)} promoted; stage time: {stage_times}",
        f"- the search's own verdict: {summary.verdict}", "",
        "The search's Pareto front (its own figures: harness for finalists, last rung otherwise):", "",
        markdown_table(list(PARETO_COLUMNS), pareto_rows(summary)),
    ])
    write_section(f"auto-{Path(bench.auto_recipe).stem}", body)
    print(body)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("phase", choices=["hand", "search", "measure"])
    parser.add_argument("--model", choices=sorted(BENCHES), default="minilm")
    parser.add_argument("--out", type=Path, help="default: runs/bench-auto-<model>")
    parser.add_argument("--backend", default="local")
    parser.add_argument("--workers", type=int)
    args = parser.parse_args()
    bench = BENCHES[args.model]
    out = (args.out or REPO / "runs" / f"bench-auto-{args.model}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.phase == "hand":
        phase_hand(bench, out)
    elif args.phase == "search":
        phase_search(bench, out, backend=args.backend, workers=args.workers)
    else:
        phase_measure(bench, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
