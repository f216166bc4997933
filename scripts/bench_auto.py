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
    title: str = "all-MiniLM-L6-v2"
    #: the task metric's column name, and what accuracy_drop / min_cosine read (for the section's text)
    metric_label: str = "R@1"
    reads: str = ("accuracy_drop: paraphrase R@1 below the FP32 teacher in points; min_cosine: mean cosine of the "
                  "sentence embedding to the FP32 teacher's on the same sentences")
    #: the hand recipes are built on the auto recipe's data section (calibration photos: the same split), CPU EP
    #: validation only, no bundle (neither changes the model)
    hand_on_auto_data: bool = False
    #: scripts/bench_vision.py's data protocol: measure on its held-out crops (checked equal to the recipe's split)
    vision_protocol: bool = False
    #: harness passes over every variant; p50 is each variant's best pass (passes interleave the variants)
    passes: int = 1
    #: False: the recipe's own auto.budgets are dropped, only `budgets` count (the issue's budget alone)
    recipe_budgets: bool = True
    #: the docs/benchmarks.md section (default auto-<recipe stem>)
    section: str | None = None

    def recipe(self) -> Any:
        from edgepack.recipe import load_recipe

        recipe = load_recipe(REPO / self.auto_recipe)
        if self.recipe_budgets:
            return recipe
        return recipe.model_copy(update={"auto": recipe.auto.model_copy(update={"budgets": {}})})


BENCHES = {
    "minilm": Bench("recipes/minilm-auto.yaml", ("recipes/minilm.yaml", "recipes/minilm-small.yaml")),
    # the quick one: the teacher pruned without training, against the teacher in INT8 (about 30 minutes here)
    "minilm-int8": Bench("recipes/minilm-auto-int8.yaml", ("recipes/minilm.yaml",), budgets=("accuracy_drop=0.5",)),
    # per-part precision (weight-only INT4 / INT8 per layer and for the embedding table), against the static INT8
    # recipe and the INT4-everywhere one
    "minilm-int4": Bench("recipes/minilm-auto-int4.yaml", ("recipes/minilm.yaml", "recipes/minilm-int4.yaml"),
                         budgets=("accuracy_drop=0.5", "min_cosine=0.99")),
    # the cnn static INT8 recipe's knobs, against the hand recipe calibrated on the same photos (size objective; the
    # -fast key: p50 objective with the input resolution in the space too)
    **{key: Bench(recipe, ("recipes/efficientnet-lite0.yaml",), budgets=("accuracy_drop=0.5", "min_cosine=0.99"),
                  title="EfficientNet-Lite0", metric_label="top-1 (labelled)", hand_on_auto_data=True,
                  vision_protocol=True, passes=5,
                  reads="accuracy_drop: top-1 accuracy on the 48 labelled held-out crops below FP32's, in points "
                  "(one crop is 2.08); min_cosine: mean logit cosine to FP32 on the 112 held-out crops")
       for key, recipe in (("efficientnet-lite0", "recipes/efficientnet-lite0-auto.yaml"),
                           ("efficientnet-lite0-fast", "recipes/efficientnet-lite0-auto-fast.yaml"))},
    # the fast search under the budget alone (accuracy_drop 0.5, no min_cosine): what a saturated metric picks
    "efficientnet-lite0-fast-top1": Bench(
        "recipes/efficientnet-lite0-auto-fast.yaml", ("recipes/efficientnet-lite0.yaml",), budgets=("accuracy_drop=0.5",),
        title="EfficientNet-Lite0, accuracy_drop alone", metric_label="top-1 (labelled)", hand_on_auto_data=True,
        vision_protocol=True, passes=5, recipe_budgets=False, section="auto-efficientnet-lite0-auto-fast-top1",
        reads="accuracy_drop: top-1 accuracy on the 48 labelled held-out crops below FP32's, in points (one crop is "
        "2.08); the recipe's min_cosine budget dropped; cosine to FP32: mean logit cosine on the 112 held-out crops"),
}


def _paths(out: Path) -> dict[str, Path]:
    return {"hand": out / "hand.json", "search": out / "search.json", "auto": out / "auto"}


def phase_hand(bench: Bench, out: Path) -> None:
    from edgepack.pipeline import run_recipe
    from edgepack.recipe import load_recipe

    finals = {}
    auto = load_recipe(REPO / bench.auto_recipe)
    for path in bench.hand_recipes:
        recipe = load_recipe(REPO / path)
        if bench.hand_on_auto_data:
            recipe = recipe.model_copy(update={
                "data": auto.data, "bundle": recipe.bundle.model_copy(update={"enabled": False}),
                "validate_": recipe.validate_.model_copy(update={"providers": ["cpu"]})})
        start = time.perf_counter()
        report = run_recipe(recipe, out / f"hand-{recipe.name}")
        final = list(report.variants)[-1]
        finals[path] = {"model": str(out / f"hand-{recipe.name}" / report.variants[final].path), "variant": final,
                        "wall_s": round(time.perf_counter() - start, 1),
                        "stages": [s.model_dump() for s in report.stages]}
    _paths(out)["hand"].write_text(json.dumps(finals, indent=1))


def phase_search(bench: Bench, out: Path, *, backend: str, workers: int | None) -> None:
    from edgepack.auto.driver import run_auto

    start = time.perf_counter()
    report = run_auto(bench.recipe(), _paths(out)["auto"], budgets=list(bench.budgets),
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
    objective = search["auto"]["objective"]
    best = _best_built(search["auto"]["candidates"], objective)
    if best is not None and f"auto-trial-{best['trial']}" not in variants:  # whatever budget refused it
        what = {"size_mb": "smallest", "p50_ms": "fastest"}.get(objective, "best")
        variants[f"auto-trial-{best['trial']} ({what} built, refused)"] = auto_dir / best["model"]
    for path, info in hand.items():
        variants[f"hand:{Path(path).stem}"] = Path(info["model"])
    return variants, search


def _best_built(candidates: list[dict[str, Any]], objective: str) -> dict[str, Any] | None:
    """The candidate with the lowest objective figure at any rung (built and measured, met the budgets or not)."""
    timed = [c for c in candidates if c.get("model") and (c.get("figures") or {}).get(objective) is not None
             and (c.get("figures") or {}).get("how") != "proxy"
             and not (c.get("reason") or "").startswith("the same model as")]
    return min(timed, key=lambda c: c["figures"][objective], default=None)


def _evaluation(bench: Bench, recipe: Any) -> list[Any]:
    """The auto recipe's evaluation split; for vision, scripts/bench_vision.py's held-out crops (the same ones)."""
    from edgepack.pipeline import load_split

    split = list(load_split(recipe).evaluation)
    if not bench.vision_protocol:
        return split
    from bench_vision import protocol

    held_out = protocol()["evaluation"]
    key = sorted((str(s.path), s.view) for s in held_out)
    if key != sorted((str(s.path), s.view) for s in split):
        raise SystemExit(f"{bench.auto_recipe}: its evaluation split is not bench_vision.py's held-out crops")
    return held_out


def phase_measure(bench: Bench, out: Path) -> None:
    from edgepack.auto.budgets import Measurement, merge_budgets
    from edgepack.families import open_model
    from edgepack.onnx_files import model_bytes
    from edgepack.recipe import load_recipe
    from edgepack.runtime.harness import ValidationSettings

    recipe = load_recipe(REPO / bench.auto_recipe)
    variants, search = _variants(out)
    family = open_model(str(variants["fp32"]))
    settings = ValidationSettings(sequence_length=128, max_length=recipe.data.max_length, threads=2, warmup=10,
                                  runs=100)
    start = time.perf_counter()
    samples = _evaluation(bench, recipe)
    shape = family.io.inputs[0].dims
    same = {k: p for k, p in variants.items() if open_model(str(p)).io.inputs[0].dims == shape}
    passes = [_harness(same, family, samples, settings, out / ("measure" if i == 0 else f"measure-{i}"),
                       {k: (None if k == "fp32" else "fp32") for k in same}) for i in range(bench.passes)]
    for name in (k for k in variants if k not in same):  # another input resolution: its own preprocessing
        own = open_model(str(variants[name]))
        for i, rows in enumerate(passes):
            rows.update(_harness({name: variants[name]}, own, samples, settings, out / f"measure-{name.split()[0]}-{i}",
                                 {name: None}))
        passes[0][name]["providers"]["cpu"]["metrics"].update(
            _cross_fidelity(variants[name], own, variants["fp32"], family, samples))
    rows = passes[0]
    best_p50 = {k: min(p[k]["providers"]["cpu"]["latency_ms"]["p50"] for p in passes) for k in variants}
    budgets = merge_budgets(bench.recipe().auto.budgets, bench.budgets)
    metric = search["auto"]["metric"]
    ref_metric = rows["fp32"]["providers"]["cpu"]["metrics"][metric]
    table, measured = [], {}
    drop_only = [b for b in budgets if b.name == "accuracy_drop"]
    for name, path in variants.items():
        cpu = rows[name]["providers"]["cpu"]
        memory = cpu["memory_mb"]
        m = Measurement(size_mb=model_bytes(path) / 1e6, metric=cpu["metrics"].get(metric),
                        accuracy_drop=round((ref_metric - cpu["metrics"].get(metric)) * 100, 4),
                        peak_rss_mb=memory["peak"] - memory["baseline"], process_peak_rss_mb=memory["peak"],
                        p50_ms=best_p50[name], cosine_mean=cpu["metrics"].get("cosine_mean"),
                        cosine_min=cpu["metrics"].get("cosine_min"), how="harness")
        measured[name] = m
        meets = all(b.met(m) for b in budgets)
        cosine = "–" if m.cosine_mean is None else f"{m.cosine_mean:.4f}"
        row = [name, f"{m.size_mb:.2f}", f"{m.metric:.4f}", f"{m.accuracy_drop:.2f}", cosine, f"{m.peak_rss_mb:.1f}",
               f"{m.p50_ms:.2f}", "yes" if meets else "no"]
        table.append([*row, "yes" if all(b.met(m) for b in drop_only) else "no"] if bench.vision_protocol else row)
    _write(bench, out, table, measured, budgets, search, wall=time.perf_counter() - start)


def _harness(variants: dict[str, Path], family: Any, samples: list[Any], settings: Any, folder: Path,
             compared_to: dict[str, str | None]) -> dict[str, Any]:
    from edgepack import stages
    from edgepack.runtime.providers import parse_providers

    return stages.validate(variants, family, samples=samples, providers=parse_providers("cpu"), settings=settings,
                           compared_to=compared_to, folder=folder, cache_dir=folder.parent / "ep-cache"
                           ).metrics["variants"]


def _cross_fidelity(path: Path, family: Any, reference: Path, reference_family: Any,
                    samples: list[Any]) -> dict[str, float]:
    """Logit cosine of a model fed at its own resolution to the FP32 reference at its own, on the same crops
    (scripts/bench_vision.py's logits / cosine helpers)."""
    from bench_vision import _cosine, logits

    cosine = _cosine(logits(path, list(family.feeds(samples))), logits(reference, list(reference_family.feeds(samples))))
    return {"cosine_mean": float(cosine.mean()), "cosine_min": float(cosine.min())}


def _verdict(measured: dict[str, Any], meets: set[str], chosen: str | None, objective: str) -> str:
    """auto's chosen model against the best hand recipe meeting the same budgets, by the search's objective."""
    unit, what = {"size_mb": ("MB", "smaller"), "p50_ms": ("ms p50", "faster"),
                  "peak_rss_mb": ("MiB peak RSS", "leaner")}[objective]
    hand = sorted((k for k in meets if k.startswith("hand:")), key=lambda k: getattr(measured[k], objective))
    if not hand:
        return "no hand recipe meets the budgets"
    if chosen not in measured or chosen not in meets:
        return f"auto's chosen model ({chosen}) does not meet the budgets on these figures"
    ours, theirs = getattr(measured[chosen], objective), getattr(measured[hand[0]], objective)
    ratio = theirs / ours
    return (f"auto's model ({chosen}, {ours:.2f} {unit}) is **{ratio:.2f}x {what}** than the best hand recipe that "
            f"meets the same budgets ({hand[0]}, {theirs:.2f} {unit}); target 1.5x: "
            f"{'met' if ratio >= 1.5 else 'MISSED'}")


def _write(bench: Bench, out: Path, table: list[list[str]], measured: dict[str, Any], budgets: list[Any],
           search: dict[str, Any], *, wall: float) -> None:
    from edgepack.report.auto import PARETO_COLUMNS, pareto_rows
    from edgepack.report.model import AutoSummary

    meets = {k for k, m in measured.items() if all(b.met(m) for b in budgets)}
    summary = AutoSummary.model_validate(search["auto"])
    chosen = f"auto-trial-{summary.chosen}" if summary.chosen is not None else None
    verdict = _verdict(measured, meets, chosen, summary.objective) if chosen else \
        f"auto chose nothing: {summary.verdict}"
    counts = summary.counts
    stage_times = ", ".join(f"{k} {v['count']}x {v['seconds']:.0f} s" for k, v in search["stages"].items())
    key = next(k for k, b in BENCHES.items() if b == bench)
    columns = ["variant", "size MB", bench.metric_label, "accuracy drop (pt)", "cosine to FP32",
               "peak RSS MiB (model)", "p50 ms", "meets budgets"]
    if bench.vision_protocol:
        columns.append("meets accuracy_drop alone")
    shape = "224 x 224 images" if bench.vision_protocol else "sequence 128"
    body = "\n".join([
        f"## Auto search: compression x quantization against budgets ({bench.title}, {bench.auto_recipe})", "",
        f"Machine: {machine_line()}", "",
        f"Budgets: {', '.join(b.describe() for b in budgets)} ({bench.reads}; peak_rss_mb: the model's VmHWM over "
        f"the runtime baseline); objective {summary.objective}. Commands: `python scripts/bench_auto.py "
        f"hand --model {key}`, `... search --model {key}` (no lock), then `flock /work/bench.lock nice -n 0 python "
        f"scripts/bench_auto.py measure --model {key}` "
        f"(this table: {bench.passes} harness pass(es), fresh processes, CPU EP, 2 threads, batch 1, {shape}, 100 "
        f"timed runs; p50 the best pass; {wall:.0f} s).", "",
        markdown_table(columns, table), "",
        f"- {verdict}",
        f"- search wall time: {search['wall_s'] / 60:.1f} min (target 60) for {len(summary.candidates)} trials on "
        f"{summary.backend}: {counts.get('built', 0)} built, {counts.get('pruned_by_proxy', 0)} pruned by proxies, "
        f"{counts.get('pruned_by_halving', 0)} by successive halving (rungs {summary.rung_samples}), "
        f"{counts.get('pruned_by_fidelity', 0)} unmeasurable for min_cosine, {counts.get('same_model', 0)} the same model "
        f"as an earlier trial, {counts.get('failed', 0)} failed, {counts.get('promoted', 0)} promoted; stage time: "
        f"{stage_times}",
        f"- the search's own verdict: {summary.verdict}", "",
        "The search's Pareto front (its own figures: harness for finalists, last rung otherwise):", "",
        markdown_table(list(PARETO_COLUMNS), pareto_rows(summary)),
    ])
    write_section(bench.section or f"auto-{Path(bench.auto_recipe).stem}", body)
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
