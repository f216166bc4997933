"""report.json, report.md and report.html (html.py), all rendered from the typed `Report` (model.py)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from edgepack.artifacts import atomic_write_text, clear_interrupted, write_json
from edgepack.report import decoder
from edgepack.report.auto import auto_markdown
from edgepack.report.model import ProviderResult, Report

COLUMNS = ("variant", "EP", "how", "size MB", "size ×", "p50 ms", "p90 ms", "peak RSS MB", "cosine mean",
           "cosine min", "task metric", "nodes on EP", "partitions")


def _fmt(value: Any, spec: str) -> str:
    return "–" if value is None else format(value, spec)


#: short names of task metrics in the table (report.json keeps the full names)
SHORT_METRICS = {"paraphrase_recall_at_1": "R@1", "paraphrase_mrr": "MRR", "paraphrase_margin": "margin",
                 "top1_agreement": "top-1 agr.", "top1_accuracy": "top-1 acc.", "top5_agreement": "top-5 agr.",
                 "top5_accuracy": "top-5 acc.", "mask_iou": "mask IoU"}


#: the columns of their own; every other metric goes into "task metric"
_OWN_COLUMNS = frozenset({"cosine_mean", "cosine_min", "max_abs_diff", "sqnr_db"})


def _task(metrics: dict[str, Any]) -> str:
    if decoder.is_decoder(metrics):  # decoders: perplexity and agreement here, the rest in their own section
        return decoder.table_cell(metrics)
    task = [(SHORT_METRICS.get(k, k), v) for k, v in metrics.items() if k not in _OWN_COLUMNS and v is not None]
    return ", ".join(f"{k} {v:.4f}" for k, v in task) or "–"


def _coverage(entry: ProviderResult) -> list[str]:
    cov = entry.coverage
    if cov is None or not cov.nodes_total:
        return ["–", "–"]
    return [f"{cov.nodes_on_ep}/{cov.nodes_total}", _fmt(cov.partitions, "d")]


def results_rows(report: Report) -> list[list[str]]:
    """One row per variant x EP, the columns of COLUMNS, as display strings."""
    ref_size = report.variants[report.reference].size_bytes
    rows = []
    for name, variant in report.variants.items():
        size = variant.size_bytes
        for ep, entry in variant.providers.items():
            head = [name, ep, entry.how, _fmt(size / 1e6, ".1f"), _fmt(size / ref_size, ".2f")]
            if entry.status != "ok":
                rows.append([*head, entry.status, "", "", "", "", (entry.error or "")[:80], "", ""])
                continue
            if entry.how == "static-analysis" or entry.latency_ms is None or entry.memory_mb is None:
                rows.append([*head, "–", "–", "–", "–", "–", "static analysis", *_coverage(entry)])
                continue
            lat, met = entry.latency_ms, entry.metrics
            mark = "*" if entry.how == "emulated" else ""  # not a device timing; see the note under the table
            task = "no reference data" if not met and entry.evaluation_samples == 0 else _task(met)
            rows.append([*head, _fmt(lat.p50, ".2f") + mark, _fmt(lat.p90, ".2f") + mark,
                         _fmt(entry.memory_mb.peak, ".0f"), _fmt(met.get("cosine_mean"), ".4f"),
                         _fmt(met.get("cosine_min"), ".4f"), task, *_coverage(entry)])
    return rows


def _fidelity_lines(report: Report) -> list[str]:
    if report.data.generated:
        return [f"- {report.reference}: measured on generated inputs; no fidelity figures (no reference data)"]
    pairs = [f"{name} vs {v.compared_to}" for name, v in report.variants.items() if v.compared_to]
    notes = sorted({f"{name}: {e.fidelity_note}" for name, v in report.variants.items()
                    for e in v.providers.values() if e.fidelity_note})
    lines = [f"- fidelity: cosine of `{report.primary_output}` against the variant each was made from "
             f"({', '.join(pairs) or 'none'}), on its CPU EP outputs, evaluation split"]
    return lines + [f"- {note}" for note in [*notes, *report.notes]]


def render_markdown(report: Report) -> str:
    recipe, data = report.recipe, report.data
    v = recipe.get("validate", {})
    lines = [
        f"# edgepack report: {recipe.get('name', 'edgepack')}",
        "",
        *device_markdown(report),
        f"- model: `{report.model.get('source')}` (family {report.model.get('family')}, task "
        f"{report.model.get('task')})",
        *_data_lines(data),
        f"- latency: batch 1, sequence {v.get('sequence_length')}, {v.get('threads')} threads, {v.get('warmup')} "
        f"warm-up + {v.get('runs')} timed runs, fresh process per row",
        *_fidelity_lines(report),
        f"- result: **{'PASSED' if report.passed else 'FAILED'}**",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
        *("| " + " | ".join(row) + " |" for row in results_rows(report)),
        "",
        *_how_notes(report),
    ]
    lines += _evaluation_set_lines(report)
    if report.gates:
        lines += ["## Gates", "", "| gate | variant | threshold | value | passed |", "|---|---|---|---|---|"]
        lines += [f"| {g.name} | {g.variant} | {g.threshold} | {_fmt(g.value, '.4f')} | "
                  f"{'yes' if g.passed else '**no**'} |" for g in report.gates]
        lines.append("")
    lines += decoder.decoder_lines(report)
    lines += _quantization_lines(report.quantization.model_dump() if report.quantization else None)
    lines += auto_markdown(report)
    lines += ["## Artifacts", ""]
    lines += [f"- {name}: `{variant.path}` (sha256 `{variant.sha256[:16]}…`)"
              for name, variant in report.variants.items()]
    if report.bundle:
        lines.append(f"- bundle ({report.bundle.variant}): `{report.bundle.path}/` — model.ort, "
                     "model_data.c/.h, required_operators_and_types.config, golden vectors; check it with "
                     f"`edgepack verify {report.bundle.path}`")
    if report.stages:
        lines += ["", "Stages: " + ", ".join(f"{s.folder} ({'reused' if s.reused else f'{s.wall_time_s:.1f} s'})"
                                             for s in report.stages)]
    lines += ["", "Memory: " + _memory_method(report), ""]
    return "\n".join(lines)


def device_markdown(report: Report) -> list[str]:
    """The device block that heads the report (the lines `edgepack doctor` prints), EP lines left to the table."""
    if report.device is None:
        return []
    from edgepack.runtime.doctor import device_lines

    block = report.device.model_dump()
    block["providers"] = {}
    return [f"- {line}" for line in device_lines(block)]


def _data_lines(data: Any) -> list[str]:
    if data.generated:
        made = "; ".join(f"`{name}` {how}" for name, how in data.generated.items())
        return [f"- data: none, inputs generated from the model's signature ({made}); fidelity: no reference data"]
    return [f"- data: `{data.path}`: {data.n_calibration} calibration, {data.n_evaluation} evaluation samples "
            "(disjoint)"]


def _evaluation_set_lines(report: Report) -> list[str]:
    """Task metrics per variant on the named evaluation sets, with the ratio to the reference's."""
    ref = report.variants[report.reference].evaluation_sets
    if not ref:
        return []
    lines = ["## Evaluation sets (CPU EP)", "",
             "| variant | " + " | ".join(f"{name} ({entry.samples})" for name, entry in ref.items()) + " |",
             "|---|" + "---|" * len(ref)]
    for name, variant in report.variants.items():
        cells = []
        for set_name, base in ref.items():
            got = variant.evaluation_sets.get(set_name)
            metric = next(iter(base.metrics), None)
            value = got.metrics.get(metric) if got is not None and metric else None
            ratio = f" ({value / base.metrics[metric]:.2f}x)" if value is not None and base.metrics.get(metric) else ""
            cells.append(f"{SHORT_METRICS.get(metric or '', metric)} {_fmt(value, '.3f')}{ratio}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def _short(tensor: str) -> str:
    """'/encoder/encoder/layer.3/output/LayerNorm/LayerNormalization_output_0' -> 'layer.3/output/LayerNorm'."""
    parts = [p for p in tensor.split("/") if p and p != "encoder"]
    return "/".join(parts[:-1] if len(parts) > 1 else parts) or tensor


def _quantization_lines(q: dict[str, Any] | None) -> list[str]:
    if not q:
        return []
    if q.get("mode") == "weight-only":
        return decoder.weight_only_lines(q)
    lines = ["## INT8 quantization", ""]
    budget = q.get("budget")
    if budget:
        fallback = budget.get("fallback_nodes") or []
        drop = budget.get("max_cosine_drop")
        cosine = (budget.get("check_fidelity") or {}).get("cosine_mean")
        lines.append(f"- accuracy budget: max cosine drop {drop if drop is not None else 'none'} on "
                     f"{budget.get('check_samples')} calibration samples: cosine {_fmt(cosine, '.4f')}, "
                     f"{'met' if budget.get('met') else 'NOT met'}, {len(fallback)} layer(s) in float"
                     + (f" ({', '.join(fallback)})" if fallback else ""))
    sq = q.get("smoothquant") or {}
    layers = sq.get("layers") or []
    lines.append(f"- SmoothQuant: {sq.get('mode', '–')}" + (f", {len(layers)} layers searched" if layers else ""))
    if layers:
        lines += ["", "| smoothed activation | role | alpha | INT8 output error (relative) | unsmoothed |",
                  "|---|---|---|---|---|"]
        lines += [f"| {_short(x['tensor'])} | {x['role']} | {'none' if x['alpha'] is None else x['alpha']} | "
                  f"{x['error']:.2e} | {x['error_unsmoothed']:.2e} |" for x in layers]
    top = q.get("sensitivity_top") or []
    if top:
        lines += ["", "Most sensitive layers (cosine with that layer alone in float; gain over all-INT8):", "",
                  "| layer | cosine | gain |", "|---|---|---|"]
        lines += [f"| {s['node']} | {s['cosine_mean']:.4f} | {s['gain']:+.4f} |" for s in top]
    return [*lines, ""]


HOW_NOTES = {
    "emulated": "emulated rows (*): a simulator or software device (the QNN HTP backend's simulator on this x86 "
                "host, WebGPU on a software Vulkan adapter); numerics and node assignment are real, timings are NOT "
                "device timings, and fidelity covers the first `evaluation_samples` samples only",
    "static-analysis": "static-analysis rows: partitions from ONNX Runtime's usability checker (op support lists); "
                       "nothing was run, so there is no latency, memory or fidelity",
}


def _how_notes(report: Report) -> list[str]:
    hows = {entry.how for variant in report.variants.values() for entry in variant.providers.values()}
    notes = [f"- {text}" for how, text in HOW_NOTES.items() if how in hows]
    return [*notes, ""] if notes else []


def _memory_method(report: Report) -> str:
    for variant in report.variants.values():
        for entry in variant.providers.values():
            if entry.memory_mb is not None:
                return str(getattr(entry.memory_mb, "method", ""))
    return "not measured"


def write_reports(report: Report, out: Path) -> None:
    """report.json (validated: the model is built before anything is written), report.md, report.html.

    Like a stage, the report is written into `.tmp-report-<pid>` first; then the figures, report.md and
    report.html are renamed into `out`, and report.json last: a killed run leaves the previous report.json (or
    none) and only complete files, and a leftover `.tmp-report-*` is cleared by the next report.
    """
    from edgepack.report.html import write_html  # matplotlib is imported only when a report is written

    report = Report.model_validate(report.model_dump())  # re-check what was assigned after construction
    out.mkdir(parents=True, exist_ok=True)
    clear_interrupted(out / "report")
    staging = out / f".tmp-report-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        write_json(staging / "report.json", report.model_dump(mode="json", exclude_none=False))
        atomic_write_text(staging / "report.md", render_markdown(report))
        write_html(report, staging)
        for path in sorted(staging.rglob("*"), key=lambda p: p.name == "report.json"):
            if path.is_file():
                target = out / path.relative_to(staging)
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(path, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
