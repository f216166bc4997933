"""`run_auto`: the search (`search.py`), then the full harness for the finalists, the Pareto front, the choice and
the report (report.json's `auto` section, the tables in report.md, the front as a figure in report.html).

The chosen model is the one with the smallest objective (size by default) among the finalists that meet every
budget on the harness's figures; when none does, the report says "no candidate meets X; closest is ..." and is
still written (`report.passed` false; `raise_if_unmet` turns that into GateFailedError, exit 3, for the CLI).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from edgepack import __version__, stages
from edgepack.auto.backends import get_backend
from edgepack.auto.budgets import Budget, Measurement, merge_budgets
from edgepack.auto.pareto import choose, pareto_front, total_violation
from edgepack.auto.search import Candidate, Search, SearchSettings, describe_params, promote_pruned
from edgepack.auto.space import SearchSpace
from edgepack.errors import BadInputError, GateFailedError
from edgepack.recipe import Recipe
from edgepack.report.model import (
    AutoBudget,
    AutoCandidate,
    AutoFigures,
    AutoSummary,
    BundleInfo,
    DataInfo,
    Gate,
    Report,
)
from edgepack.reporter import get_reporter


def run_auto(recipe: Recipe, out: Path, *, budgets: Sequence[str] = (), ep: str = "cpu", backend: str = "local",
             address: str | None = None, trials: int | None = None, workers: int | None = None) -> Report:
    """Search `recipe.auto.space` for the smallest model meeting every budget; write the report into `out`."""
    from edgepack.runner import share_stage_folders
    from edgepack.runtime.providers import get_provider, parse_providers

    start = time.perf_counter()
    chosen_budgets = merge_budgets(recipe.auto.budgets, budgets)
    if not chosen_budgets:
        raise BadInputError("edgepack auto needs at least one budget: --budget accuracy_drop=0.5 (or auto.budgets "
                            "in the recipe)")
    budget_ep = get_provider(ep)
    parse_providers(",".join(dict.fromkeys([*recipe.validate_.providers, budget_ep.key])))
    if recipe.data.n_evaluation < 1:
        raise BadInputError("data.n_evaluation is 0; the search measures candidates on the evaluation split")
    space = SearchSpace.build(recipe)
    settings = SearchSettings(budgets=chosen_budgets, objective=recipe.auto.objective,
                              trials=trials or recipe.auto.trials, ep=budget_ep.key,
                              provider_for_rungs=budget_ep.key if budget_ep.how == "device" else "cpu")
    out.mkdir(parents=True, exist_ok=True)
    share_stage_folders(out)
    runner = get_backend(backend, workers=workers or recipe.auto.workers, address=address)
    get_reporter().info(f"auto: up to {settings.trials} trials over {describe_space(space)}; budgets "
                        f"{', '.join(b.describe() for b in chosen_budgets)}; backend {runner.describe()}")
    try:
        search = Search(recipe, space, out.resolve(), settings=settings, backend=runner)
        search.measure_reference()
        search.run_trials()
        return finish(search, start=start, backend=runner.describe())
    finally:
        runner.close()


def describe_space(space: SearchSpace) -> str:
    return "; ".join(f"{name} {values}" for name, values in space.describe().items()) or "the recipe alone"


# ---------------------------------------------------------------------------------------------- finalists


def pick_finalists(candidates: Sequence[Candidate], budgets: Sequence[Budget], *, objective: str,
                   count: int) -> list[Candidate]:
    """The best by the objective that meet every budget on the full split, then the rest of the Pareto front, then
    the closest misses (so "closest is" is a harness figure too); one per distinct model file. When every candidate
    was pruned, the built ones closest to the budgets."""
    done = [c for c in candidates if c.state == "complete"]
    if not done:  # every candidate pruned: the harness still measures the closest built ones, for the verdict
        built = sorted((c for c in candidates if c.build.get("model")),
                       key=lambda c: (total_violation(c.measured, budgets), getattr(c.measured, objective) or 0.0))
        return _distinct_models(built, count)
    key = {id(c): (getattr(c.measured, objective) or float("inf")) for c in done}
    feasible = sorted((c for c in done if all(b.met(c.measured) for b in budgets)), key=lambda c: key[id(c)])
    front = set(pareto_front({str(c.trial): c.measured for c in done}))
    on_front = sorted((c for c in done if str(c.trial) in front), key=lambda c: key[id(c)])
    closest = sorted(done, key=lambda c: (total_violation(c.measured, budgets), key[id(c)]))
    return _distinct_models([*feasible, *on_front, *closest], count)


def _distinct_models(ordered: Sequence[Candidate], count: int) -> list[Candidate]:
    chosen: list[Candidate] = []
    models: set[str] = set()
    for candidate in ordered:
        if len(chosen) == count:
            break
        if candidate.build["model"] not in models:
            models.add(candidate.build["model"])
            chosen.append(candidate)
    return chosen


def run_harness(search: Search, finalists: list[Candidate]) -> tuple[Any, Any]:
    """The validate stage on the reference and the finalists: fresh processes, every EP, the recipe's runs."""
    from edgepack.families import open_model
    from edgepack.pipeline import load_split
    from edgepack.runtime.harness import ValidationSettings
    from edgepack.runtime.providers import parse_providers

    recipe, out = search.recipe, search.out
    family = open_model(search.reference["model"], options=recipe.model.options, task=recipe.model.task)
    variants = {"fp32": Path(search.reference["model"])}
    for candidate in finalists:
        candidate.variant = f"trial-{candidate.trial}"
        variants[candidate.variant] = Path(candidate.build["model"])
    compared = {name: (None if name == "fp32" else "fp32") for name in variants}
    v = recipe.validate_
    providers = parse_providers(",".join(dict.fromkeys([*v.providers, search.settings.ep])))
    settings = ValidationSettings(sequence_length=v.sequence_length, max_length=recipe.data.max_length,
                                  threads=v.threads, warmup=v.warmup, runs=v.runs, device=v.device)
    evaluation = load_split(recipe).evaluation
    get_reporter().info(f"auto: full harness for {len(finalists)} finalist(s) on {', '.join(p.key for p in providers)}")
    shape = family.io.inputs[0].dims
    own = {name: open_model(str(path)) for name, path in variants.items() if name != "fp32"}
    other = [name for name, fam in own.items() if fam.io.inputs[0].dims != shape]  # e.g. another input resolution
    result = stages.validate({k: p for k, p in variants.items() if k not in other}, family, samples=evaluation,
                             providers=providers, settings=settings,
                             compared_to={k: c for k, c in compared.items() if k not in other}, root=out,
                             cache_dir=out / "ep-cache")
    for name in other:  # its own preprocessing, so no parent in the same run: its cosine comes from its last rung
        alone = stages.validate({name: variants[name]}, own[name], samples=evaluation, providers=providers,
                                settings=settings, compared_to={name: None}, root=out, cache_dir=out / "ep-cache")
        result.metrics["variants"][name] = alone.metrics["variants"][name]
    return result, family


def harness_figures(search: Search, entry: dict[str, Any], *, size_mb: float) -> Measurement:
    """A finalist's figures from the validate stage's row of the budget EP (the task metric from its CPU row)."""
    providers = entry["providers"]
    row = providers.get(search.settings.ep) or providers.get("cpu") or {}
    cpu = providers.get("cpu") or row
    ref = search.harness_reference_metric
    metric = (cpu.get("metrics") or {}).get(search.metric) if search.metric else None
    drop = None if metric is None or ref is None else round((ref - metric) * 100, 6)
    memory, latency = row.get("memory_mb") or {}, row.get("latency_ms") or {}
    peak, base = memory.get("peak"), memory.get("baseline")
    fidelity = row.get("metrics") or {}  # vs the FP32 reference on CPU, on the whole evaluation split
    if fidelity.get("cosine_mean") is None:
        fidelity = cpu.get("metrics") or {}
    return Measurement(size_mb=size_mb, metric=metric, accuracy_drop=drop,
                       cosine_mean=fidelity.get("cosine_mean"), cosine_min=fidelity.get("cosine_min"),
                       peak_rss_mb=None if peak is None or base is None else peak - base, process_peak_rss_mb=peak,
                       p50_ms=latency.get("p50"), p90_ms=latency.get("p90"),
                       samples=cpu.get("evaluation_samples") or 0, how="harness")


def _with_rung_fidelity(harness: Measurement, rung: Measurement) -> Measurement:
    """A finalist the harness could not compare with the reference (its input differs: another resolution) keeps
    the cosine its last rung measured on the same samples against the reference's saved outputs."""
    if harness.cosine_mean is not None or rung.cosine_mean is None or rung.samples != harness.samples:
        return harness
    return replace(harness, cosine_mean=rung.cosine_mean, cosine_min=rung.cosine_min)


# --------------------------------------------------------------------------------------------------- finish


def finish(search: Search, *, start: float, backend: str) -> Report:
    from edgepack.pipeline import _device_info, _model_record, _report_variants, stage_summary

    recipe, out, settings = search.recipe, search.out, search.settings
    promote_pruned(search, wanted=recipe.auto.finalists)
    finalists = pick_finalists(search.candidates, settings.budgets, objective=settings.objective,
                               count=recipe.auto.finalists)
    report_variants: dict[str, Any] = {}
    validation = None
    family = None
    if finalists:
        validation, family = run_harness(search, finalists)
        rows = validation.metrics["variants"]
        ref_cpu = (rows["fp32"]["providers"].get("cpu") or {}).get("metrics") or {}
        search.harness_reference_metric = ref_cpu.get(search.metric) if search.metric else None
        for candidate in finalists:
            candidate.harness = _with_rung_fidelity(
                harness_figures(search, rows[candidate.variant], size_mb=candidate.measured.size_mb or 0.0),
                candidate.measured)
        paths = {name: Path(p) for name, p in [("fp32", search.reference["model"]),
                                                *((c.variant, c.build["model"]) for c in finalists)]}
        report_variants = _report_variants(paths, rows, out)
    measured = {str(c.trial): c.best for c in search.candidates if c.state == "complete"}
    front = [int(k) for k in pareto_front(measured)]
    decided = {str(c.trial): c.harness for c in finalists if c.harness is not None}
    choice = choose(decided or {str(c.trial): c.best for c in search.candidates if c.measured.how != "proxy"},
                    settings.budgets, objective=settings.objective)
    by_trial = {c.trial: c for c in search.candidates}
    chosen = by_trial[int(choice.chosen)] if choice.chosen is not None else None
    verdict = _verdict(choice, by_trial, settings.budgets, settings.objective)
    get_reporter().info(f"auto: {verdict}")
    ref_family = family
    if ref_family is None:
        from edgepack.families import open_model

        ref_family = open_model(search.reference["model"], options=recipe.model.options, task=recipe.model.task)
    split_n = recipe.data.n_evaluation
    report = Report(
        edgepack_version=__version__, recipe=recipe.dump(),
        device=_device_info(validation.metrics) if validation else None,
        model=_model_record(ref_family, Path(search.reference["model"])),
        data=DataInfo(path=recipe.data.path, n_calibration=recipe.data.n_calibration, n_evaluation=split_n),
        reference="fp32", primary_output=ref_family.primary_output, passed=chosen is not None,
        variants=report_variants, validation_folder=validation.folder.name if validation else None,
        stages=[stage_summary(validation)] if validation else [])
    report.auto = _summary(search, front=front, chosen=chosen, verdict=verdict, start=start, backend=backend)
    report.notes += _ep_notes(settings.ep)
    report.gates = _budget_gates(chosen or (by_trial[int(choice.closest)] if choice.closest else None),
                                 settings.budgets, ep=settings.ep)
    if chosen is not None and recipe.bundle.enabled and chosen.variant:
        report.bundle = _bundle(search, chosen, report)
    from edgepack.report import write_reports

    write_reports(report, out)
    get_reporter().info(f"report: {out / 'report.md'}")
    return report


def raise_if_unmet(report: Report) -> None:
    """Exit 3 with the verdict ("no candidate meets X; closest is ...") when nothing was chosen."""
    if report.auto is not None and report.auto.chosen is None:
        raise GateFailedError(f"auto: {report.auto.verdict}; the report is written, see report.md")


def _ep_notes(ep: str) -> list[str]:
    from edgepack.runtime.providers import get_provider

    how = get_provider(ep).how
    if how == "device":
        return []
    return [f"auto: the budgets are read on {ep}, which is {how} here: its latency is not a device timing (the "
            "successive-halving rungs measured on the CPU EP)"]


def _verdict(choice: Any, by_trial: dict[int, Candidate], budgets: Sequence[Budget], objective: str) -> str:
    if choice.chosen is not None:
        c = by_trial[int(choice.chosen)]
        return (f"chosen: trial {c.trial} ({describe_params(c.params)}): {_short(c.best)}; the smallest "
                f"{objective} of the finalists that meet {', '.join(b.describe() for b in budgets)}")
    missed = ", ".join(choice.missed) or "the budgets"
    if choice.closest is None:
        return f"no candidate meets {missed}; closest is none (every candidate failed or was pruned)"
    c = by_trial[int(choice.closest)]
    return f"no candidate meets {missed}; closest is trial {c.trial} ({describe_params(c.params)}): {_short(c.best)}"


def _short(m: Measurement) -> str:
    parts = [f"{m.size_mb:.2f} MB" if m.size_mb is not None else None,
             f"accuracy_drop {m.accuracy_drop:.2f} pt" if m.accuracy_drop is not None else None,
             f"peak RSS +{m.peak_rss_mb:.1f} MiB" if m.peak_rss_mb is not None else None,
             f"p50 {m.p50_ms:.2f} ms" if m.p50_ms is not None else None]
    return ", ".join(p for p in parts if p) + f" ({m.how}{f', {m.samples} samples' if m.samples else ''})"


def _figures(m: Measurement) -> AutoFigures:
    return AutoFigures.model_validate(m.to_json())


def _summary(search: Search, *, front: list[int], chosen: Candidate | None, verdict: str, start: float,
             backend: str) -> AutoSummary:
    settings, out = search.settings, search.out
    rows = []
    for c in search.candidates:
        model = c.build.get("model")
        rel = str(Path(model).relative_to(out)) if model and Path(model).is_relative_to(out) else model
        meets = None if c.best.how == "proxy" else all(b.met(c.best) for b in settings.budgets)
        rows.append(AutoCandidate(trial=c.trial, params=c.params, state=c.state, reason=c.reason,  # type: ignore[arg-type]
                                  figures=_figures(c.best), objective_value=c.value, pareto=c.trial in front,
                                  finalist=c.harness is not None, meets_budgets=meets, variant=c.variant, model=rel,
                                  workers=sorted(c.workers)))
    budgets = [AutoBudget(name=b.name, limit=b.limit, unit=b.kind.unit, meaning=b.kind.meaning)
               for b in settings.budgets]
    return AutoSummary(objective=settings.objective, metric=search.metric, ep=settings.ep, backend=backend,
                       space=search.space.describe(), budgets=budgets, rung_samples=search.sizes,
                       reduction_factor=search.eta, candidates=rows, pareto=front,
                       chosen=chosen.trial if chosen else None, chosen_variant=chosen.variant if chosen else None,
                       verdict=verdict, counts=dict(search.counts),
                       wall_time_s=round(time.perf_counter() - start, 1))


def _budget_gates(candidate: Candidate | None, budgets: Sequence[Budget], *, ep: str) -> list[Gate]:
    """The budgets as the report's gates, on the chosen candidate (or the closest)."""
    if candidate is None:
        return []
    m = candidate.best
    return [Gate(name=f"budget {b.name}", variant=candidate.variant or f"trial-{candidate.trial}", provider=ep,
                 threshold=b.limit, value=None if b.value(m) is None else round(float(b.value(m)), 6),
                 passed=bool(b.met(m))) for b in budgets]


def _bundle(search: Search, chosen: Candidate, report: Report) -> BundleInfo:
    from edgepack.families import open_model
    from edgepack.pipeline import load_split

    recipe = search.recipe
    entries = report.variants[chosen.variant].providers  # type: ignore[index]
    done = {ep: {"status": e.status, "how": e.how} for ep, e in entries.items()}
    family = open_model(chosen.build["model"], options=recipe.model.options, task=recipe.model.task)
    bundled = stages.bundle(Path(chosen.build["model"]), family, samples=load_split(recipe).evaluation,
                            options=recipe.bundle, max_length=recipe.data.max_length, validated=done, root=search.out)
    return BundleInfo(path=bundled.folder.name, variant=chosen.variant or "")


__all__ = ["pick_finalists", "raise_if_unmet", "run_auto"]
