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

from edgepack.artifacts import atomic_write_text
from edgepack.report.figures import HOW_TEXT, ReportFigure, report_figures
from edgepack.report.model import ProviderResult, Report

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1400px; color: #222; }
table { border-collapse: collapse; font-size: 12px; margin: 1em 0; }
td:nth-child(-n+3) { white-space: nowrap; }
th, td { border: 1px solid #ccc; padding: 3px 7px; text-align: right; }
th { background: #f3f3f3; } td.text { text-align: left; }
tr.emulated td { background: #fff7e6; } tr.static-analysis td { background: #eef6ff; }
tr.failed td, tr.unavailable td { color: #888; }
figure { margin: 1.5em 0; } figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { font-size: 13px; color: #444; margin-top: .4em; }
.passed { color: #17803d; } .failed-result { color: #b42318; }
"""

COLUMNS = ("variant", "EP", "how", "status", "size MB", "p50 ms", "p90 ms", "peak MiB", "cosine mean",
           "cosine min", "nodes on EP", "partitions", "MatMul on EP", "fell back", "samples")


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
    latency, memory, metrics = entry.latency_ms, entry.memory_mb, entry.metrics
    # A simulator's timing next to device timings must not read as one: it carries its label in the cell.
    mark = " (emulated)" if entry.how == "emulated" else ""
    timed = latency is not None
    return head + [_fmt(latency.p50 if timed else None, ".2f") + mark * timed,
                   _fmt(latency.p90 if timed else None, ".2f") + mark * timed,
                   _fmt(memory.peak if memory is not None else None, ".0f"),
                   _fmt(metrics.get("cosine_mean"), ".4f"), _fmt(metrics.get("cosine_min"), ".4f"),
                   *_coverage_cells(entry), _fmt(entry.evaluation_samples, "d")]


def _table(report: Report) -> str:
    lines = ["<table>", "<tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in COLUMNS) + "</tr>"]
    for variant, data in report.variants.items():
        for ep, entry in data.providers.items():
            cells = _row(variant, ep, data.size_bytes / 1e6, entry)
            css = entry.status if entry.status != "ok" else entry.how
            tds = "".join(f'<td class="text">{html.escape(c)}</td>' if i in (0, 1, 2, 3, 13) else
                          f"<td>{html.escape(c)}</td>" for i, c in enumerate(cells))
            lines.append(f'<tr class="{html.escape(str(css))}">{tds}</tr>')
    lines.append("</table>")
    return "\n".join(lines)


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


def _header(report: Report) -> str:
    name = report.recipe.get("name", "edgepack")
    result = "<b class='passed'>PASSED</b>" if report.passed else "<b class='failed-result'>FAILED</b>"
    hows = sorted({entry.how for variant in report.variants.values() for entry in variant.providers.values()},
                  key=list(HOW_TEXT).index)
    notes = "".join(f"<li><b>{html.escape(how)}</b>: {html.escape(HOW_TEXT[how])}</li>" for how in hows)
    extra = "".join(f"<li>{html.escape(note)}</li>" for note in report.notes)
    return (f"<h1>edgepack report: {html.escape(str(name))}</h1><ul>"
            f"<li>model: <code>{html.escape(str(report.model.get('source', '')))}</code> "
            f"({html.escape(str(report.model.get('family', '')))})</li>"
            f"<li>data: <code>{html.escape(report.data.path)}</code>, {report.data.n_evaluation} "
            "evaluation samples</li><li>fidelity of each variant vs the variant it was made from, on the CPU EP "
            f"(reference: <b>{html.escape(report.reference)}</b>)</li><li>result: {result}</li>{extra}</ul>"
            f"<h2>How each row was obtained</h2><ul>{notes}</ul>")


def render_html(report: Report, figures: list[ReportFigure]) -> str:
    body = _header(report) + "<h2>Results</h2>" + _table(report) + _gates(report)
    body += "<h2>Figures</h2>" + "".join(_figure(figure) for figure in figures)
    title = html.escape(f"edgepack report: {report.recipe.get('name', '')}")
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
            f"<style>{_STYLE}</style></head><body>{body}</body></html>\n")


def write_html(report: Report, out_dir: Path) -> Path:
    """Write out_dir/report.html and out_dir/figures/<name>.png; returns the page's path."""
    figures = report_figures(report)
    (out_dir / "figures").mkdir(parents=True, exist_ok=True)
    for figure in figures:
        (out_dir / "figures" / f"{figure.name}.png").write_bytes(figure.png)
    path = out_dir / "report.html"
    atomic_write_text(path, render_html(report, figures))
    return path
