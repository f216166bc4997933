"""report.html: one self-contained page (figures embedded as base64 PNGs, no scripts, no external files).

The figures come from `figures.py` (matplotlib, Agg); they are also written to `figures/*.png` next to the
page, as the run-folder layout promises. Every row and every figure says how its numbers were obtained.

>>> write_html(Report.model_validate_json(Path("runs/demo/report.json").read_text()), Path("runs/demo"))  # doctest: +SKIP
PosixPath('runs/demo/report.html')
"""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

from edgepack.artifacts import atomic_write_bytes, atomic_write_text
from edgepack.report.auto import auto_html
from edgepack.report.figures import HOW_TEXT, ReportFigure, report_figures
from edgepack.report.model import ProviderResult, Report

_STYLE = """
:root { --ink: #1d2433; --muted: #5b6475; --line: #dfe3ea; --head: #f4f6fa; --accent: #2f5bd3; }
* { box-sizing: border-box; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0; color: var(--ink);
       background: #f7f8fb; }
main { max-width: 1360px; margin: 0 auto; padding: 24px 32px 48px; }
header.banner { background: linear-gradient(90deg, #1f3b8f, #2f5bd3); color: #fff; padding: 18px 32px; }
header.banner h1 { margin: 0; font-size: 22px; font-weight: 600; }
header.banner .sub { opacity: .85; font-size: 13px; margin-top: 4px; }
h2 { font-size: 17px; margin: 28px 0 10px; padding-bottom: 4px; border-bottom: 2px solid var(--line); }
h3 { font-size: 14px; margin: 18px 0 6px; color: var(--accent); }
.cards { display: grid; grid-template-columns: repeat(auto-fit, minmax(380px, 1fr)); gap: 14px; }
.card { background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: 12px 16px; }
.card h2 { margin-top: 0; border: 0; font-size: 15px; }
dl { display: grid; grid-template-columns: max-content 1fr; gap: 3px 14px; margin: 0; font-size: 13px; }
dt { color: var(--muted); } dd { margin: 0; }
table { border-collapse: collapse; font-size: 12.5px; margin: 6px 0 14px; background: #fff; width: 100%; }
th, td { border: 1px solid var(--line); padding: 4px 8px; text-align: right; white-space: nowrap; }
th { background: var(--head); font-weight: 600; } td.text { text-align: left; white-space: normal; }
tbody tr:nth-child(even) td { background: #fafbfd; }
tr.emulated td { background: #fff7e6 !important; } tr.static-analysis td { background: #eef6ff !important; }
tr.failed td, tr.unavailable td { color: #8a8f99; }
.badge { display: inline-block; padding: 1px 8px; border-radius: 10px; font-size: 12px; font-weight: 600; }
.badge.passed { background: #dcf5e3; color: #17803d; } .badge.failed-result { background: #fde3e1; color: #b42318; }
.badge.device { background: #e7edfb; color: #2f5bd3; } .badge.emulated { background: #fff0d1; color: #8a5a00; }
.badge.static-analysis { background: #e3f0ff; color: #1f5f9e; }
figure { margin: 18px 0; background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: 10px; }
figure img { max-width: 100%; display: block; margin: 0 auto; }
figcaption { font-size: 12.5px; color: var(--muted); margin-top: 6px; }
ul.notes { margin: 6px 0; padding-left: 20px; font-size: 13px; color: var(--muted); }
code { background: #eef1f6; padding: 0 4px; border-radius: 3px; font-size: 12.5px; }
"""

COLUMNS = ("variant", "EP", "how", "status", "size MB", "p50 ms", "p90 ms", "peak MiB", "cosine mean",
           "cosine min", "nodes on EP", "partitions", "MatMul on EP", "fell back", "samples", "device")


def _fmt(value: Any, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def _coverage_cells(entry: ProviderResult) -> list[str]:
    coverage = entry.coverage.model_dump() if entry.coverage is not None else {}
    if not coverage.get("nodes_total"):
        return ["–", "–", "–", "–"]
    fallback = ", ".join(f"{op}×{count}" for op, count in list(coverage.get("fallback_ops", {}).items())[:4])
    return [f"{coverage['nodes_on_ep']}/{coverage['nodes_total']}", _fmt(coverage.get("partitions"), "d"),
            f"{coverage.get('matmul_on_ep', 0)}/{coverage.get('matmul_total', 0)}", fallback or "none"]


def _row(variant: str, ep: str, size_mb: float, entry: ProviderResult) -> list[str]:
    error = entry.error or ""
    error = error if len(error) <= 90 else error[:89] + "…"  # the full message is in report.json
    status = entry.status
    head = [variant, ep, entry.how, status if status == "ok" else f"{status}: {error}", _fmt(size_mb, ".1f")]
    if status != "ok":
        return head + [""] * (len(COLUMNS) - len(head))
    latency, memory = entry.latency_ms, entry.memory_mb
    # A simulator's timing next to device timings must not read as one: it carries its label in the cell.
    mark = " (emulated)" if entry.how == "emulated" else ""
    timed = latency is not None
    return head + [_fmt(latency.p50 if timed else None, ".2f") + mark * timed,
                   _fmt(latency.p90 if timed else None, ".2f") + mark * timed,
                   _fmt(memory.peak if memory is not None else None, ".0f"),
                   *_cosine_cells(entry), *_coverage_cells(entry), _fmt(entry.evaluation_samples, "d"),
                   entry.device or "–"]


def _cosine_cells(entry: ProviderResult) -> list[str]:
    metrics = entry.metrics
    if "cosine_mean" not in metrics and entry.evaluation_samples == 0:
        return ["no reference data", "–"]  # measured on generated inputs
    return [_fmt(metrics.get("cosine_mean"), ".4f"), _fmt(metrics.get("cosine_min"), ".4f")]


def _table(report: Report) -> str:
    """One table per EP (its rows: the variants), so each EP's figures read side by side."""
    by_ep: dict[str, list[tuple[str, Any, ProviderResult]]] = {}
    for variant, data in report.variants.items():
        for ep, entry in data.providers.items():
            by_ep.setdefault(ep, []).append((variant, data, entry))
    head = "<tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in COLUMNS) + "</tr>"
    parts = []
    for ep, rows in by_ep.items():
        hows = sorted({entry.how for _, _, entry in rows})
        badges = "".join(f' <span class="badge {html.escape(h)}">{html.escape(h)}</span>' for h in hows)
        lines = [f'<h3 id="ep-{html.escape(ep)}">{html.escape(ep)}{badges}</h3>', "<table>", f"<thead>{head}</thead>",
                 "<tbody>"]
        for variant, data, entry in rows:
            cells = _row(variant, ep, data.size_bytes / 1e6, entry)
            css = entry.status if entry.status != "ok" else entry.how
            tds = "".join(f'<td class="text">{html.escape(c)}</td>' if i in _TEXT_COLUMNS else
                          f"<td>{html.escape(c)}</td>" for i, c in enumerate(cells))
            lines.append(f'<tr class="{html.escape(str(css))}">{tds}</tr>')
        parts.append("\n".join([*lines, "</tbody></table>"]))
    return "\n".join(parts)


_TEXT_COLUMNS = frozenset({0, 1, 2, 3, 13})


def _gates(report: Report) -> str:
    if not report.gates:
        return ""
    rows = "".join(f"<tr><td class='text'>{html.escape(g.name)}</td><td>{html.escape(g.variant)}</td>"
                   f"<td>{g.threshold}</td><td>{_fmt(g.value, '.4f')}</td>"
                   f"<td>{'yes' if g.passed else '<b>no</b>'}</td></tr>" for g in report.gates)
    return ("<h2>Gates</h2><table><tr><th>gate</th><th>variant</th><th>threshold</th><th>value</th><th>passed</th>"
            f"</tr>{rows}</table>")


def _figure(figure: ReportFigure) -> str:
    data = base64.b64encode(figure.png).decode("ascii")
    return (f'<figure id="fig-{figure.name}"><img alt="{html.escape(figure.name)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{html.escape(figure.caption)}</figcaption></figure>")


def _device_card(report: Report) -> str:
    device = report.device
    if device is None:
        return ""

    def gib(value: float | None) -> str:
        return "–" if value is None else f"{value / 1024:.1f} GiB"

    quota = f", quota {device.cpu_quota:g} CPUs" if device.cpu_quota else ""
    items = [("device", device.label), ("host", f"{device.hostname} ({device.os}, {device.machine})"),
             ("CPU", device.cpu), ("int8 ISA", device.int8_isa),
             ("cores", f"{device.cores} ({device.usable_cores} usable{quota})"
                       + (f"; {device.threads} intra-op threads measured" if device.threads else "")),
             ("memory", f"{gib(device.memory_total_mb)} total, {gib(device.memory_available_mb)} available, limit "
                        f"{gib(device.memory_limit_mb) if device.memory_limit_mb else 'none'}"),
             ("runtime", f"Python {device.python}, onnxruntime {device.onnxruntime}, numpy {device.numpy}")]
    items += [(f"EP {name}", state) for name, state in device.providers.items()]
    rows = "".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(str(v))}</dd>" for k, v in items)
    return f'<section class="card" id="device"><h2>Device</h2><dl>{rows}</dl></section>'


def _run_card(report: Report, result: str) -> str:
    data = report.data
    if data.generated:
        made = "; ".join(f"{name}: {how}" for name, how in data.generated.items())
        data_text = f"none — inputs generated from the model's signature ({made}); no reference data for fidelity"
    else:
        data_text = f"{data.path}: {data.n_calibration} calibration, {data.n_evaluation} evaluation samples"
    validate = report.recipe.get("validate", {})
    items = [("result", result), ("model", f"{report.model.get('source', '')} (family {report.model.get('family', '')}"
                                           f", task {report.model.get('task', '')})"),
             ("data", data_text), ("reference", report.reference),
             ("latency", f"batch 1, sequence {validate.get('sequence_length')}, {validate.get('warmup')} warm-up + "
                         f"{validate.get('runs')} timed runs, a fresh process per row"),
             ("fidelity", f"cosine of {report.primary_output} vs the variant each was made from, on its CPU EP")]
    rows = "".join(f"<dt>{html.escape(k)}</dt><dd>{v if k == 'result' else html.escape(str(v))}</dd>"
                   for k, v in items)
    return f'<section class="card" id="run"><h2>Run</h2><dl>{rows}</dl></section>'


def _header(report: Report) -> str:
    name = report.recipe.get("name", "edgepack")
    result = ("<span class='badge passed'>PASSED</span>" if report.passed else
              "<span class='badge failed-result'>FAILED</span>")
    hows = sorted({entry.how for variant in report.variants.values() for entry in variant.providers.values()},
                  key=list(HOW_TEXT).index)
    notes = "".join(f"<li><b>{html.escape(how)}</b>: {html.escape(HOW_TEXT[how])}</li>" for how in hows)
    extra = "".join(f"<li>{html.escape(note)}</li>" for note in report.notes)
    where = f" on {html.escape(report.device.label)} ({html.escape(report.device.hostname)})" if report.device else ""
    return (f'<header class="banner"><h1>edgepack report: {html.escape(str(name))}</h1>'
            f'<div class="sub">edgepack {html.escape(report.edgepack_version)}{where}</div></header><main>'
            f'<div class="cards">{_device_card(report)}{_run_card(report, result)}</div>'
            f'<h2>How each row was obtained</h2><ul class="notes">{notes}{extra}</ul>')


def _quantization(report: Report) -> str:
    quantization = report.quantization.model_dump() if report.quantization is not None else None
    if not quantization:
        return ""
    budget = quantization.get("budget") or {}
    lines = []
    if budget:
        cosine = (budget.get("check_fidelity") or {}).get("cosine_mean")
        fallback = budget.get("fallback_nodes") or []
        lines.append(f"accuracy budget (max cosine drop {budget.get('max_cosine_drop')}): cosine {_fmt(cosine, '.4f')}"
                     f" on {budget.get('check_samples')} calibration samples, {'met' if budget.get('met') else 'NOT met'}"
                     f", {len(fallback)} layer(s) in float")
    sq = quantization.get("smoothquant") or {}
    if sq:
        lines.append(f"SmoothQuant: {sq.get('mode', '–')}, {len(sq.get('layers') or [])} activations smoothed")
    items = "".join(f"<li>{html.escape(line)}</li>" for line in lines)
    return f'<h2 id="int8">INT8 quantization</h2><ul class="notes">{items}</ul>'


def render_html(report: Report, figures: list[ReportFigure]) -> str:
    body = _header(report) + "<h2>Results per execution provider</h2>" + _table(report) + _gates(report)
    body += _quantization(report) + auto_html(report)
    body += "<h2>Figures</h2>" + "".join(_figure(figure) for figure in figures) + "</main>"
    title = html.escape(f"edgepack report: {report.recipe.get('name', '')}")
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
            f"<style>{_STYLE}</style></head><body>{body}</body></html>\n")


def write_html(report: Report, out_dir: Path) -> Path:
    """Write out_dir/report.html and out_dir/figures/<name>.png; returns the page's path."""
    figures = report_figures(report)
    (out_dir / "figures").mkdir(parents=True, exist_ok=True)
    for figure in figures:
        atomic_write_bytes(out_dir / "figures" / f"{figure.name}.png", figure.png)
    path = out_dir / "report.html"
    atomic_write_text(path, render_html(report, figures))
    return path
