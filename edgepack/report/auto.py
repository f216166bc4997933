"""The `edgepack auto` part of the report: the verdict, the Pareto table, every trial, and the front as a figure.

Rendered from `Report.auto` (`model.AutoSummary`); writer.py, html.py and figures.py each call one function here.
"""

from __future__ import annotations

import html
from typing import Any

from matplotlib.figure import Figure

from edgepack.report.model import AutoCandidate, AutoFigures, AutoSummary, Report

PARETO_COLUMNS = ("trial", "knobs", "size MB", "task metric", "accuracy drop (pt)", "cosine to FP32 (mean)",
                  "peak RSS MiB (model)", "p50 ms", "measured", "meets budgets")
HOW = {"harness": "fresh processes, every EP, the recipe's warm-up and runs",
       "rung": "the first n evaluation samples in a fresh process, a short latency",
       "proxy": "exact size and a memory lower bound (≥), nothing run"}


def _fmt(value: Any, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def _knobs(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in params.items()) or "the recipe"


def _measured(f: AutoFigures) -> str:
    if f.how == "proxy":
        return "proxy"
    return f"{f.how}, {f.samples} samples" if f.samples else f.how


def candidate_cells(c: AutoCandidate, summary: AutoSummary) -> list[str]:
    f = c.figures
    mark = " **(chosen)**" if summary.chosen == c.trial else ""
    meets = {True: "yes", False: "no", None: "–"}[c.meets_budgets]
    return [f"{c.trial}{mark}", _knobs(c.params), _fmt(f.size_mb, ".2f"), _fmt(f.metric, ".4f"),
            _fmt(f.accuracy_drop, ".2f"), _fmt(f.cosine_mean, ".4f"), _fmt(f.peak_rss_mb, ".1f") + ("≥" if "peak_rss_mb" in f.estimated else ""),
            _fmt(f.p50_ms, ".2f"), _measured(f), meets]


def pareto_rows(summary: AutoSummary) -> list[list[str]]:
    """The Pareto front, smallest first."""
    front = [c for c in summary.candidates if c.pareto]
    front.sort(key=lambda c: (c.figures.size_mb is None, c.figures.size_mb or 0.0))
    return [candidate_cells(c, summary) for c in front]


def _trial_line(c: AutoCandidate) -> str:
    f = c.figures
    figures = ", ".join(p for p in (
        f"{f.size_mb:.2f} MB" if f.size_mb is not None else "",
        f"drop {f.accuracy_drop:.2f} pt on {f.samples}" if f.accuracy_drop is not None else "",
        f"cosine {f.cosine_mean:.4f}" if f.cosine_mean is not None else "",
        f"p50 {f.p50_ms:.2f} ms" if f.p50_ms is not None and f.how != "proxy" else "") if p)
    return (f"| {c.trial} | {_knobs(c.params)} | {c.state} | {figures or '–'} | "
            f"{(c.reason or '').replace('|', '/')[:140]} |")


def auto_markdown(report: Report) -> list[str]:
    summary = report.auto
    if summary is None:
        return []
    budgets = ", ".join(f"{b.name} >= {b.limit:g}" if b.name.startswith("min_") else f"{b.name} <= {b.limit:g} {b.unit}"
                        for b in summary.budgets)
    counts = summary.counts
    lines = ["## Auto search", "",
             f"- verdict: **{summary.verdict}**",
             f"- budgets (on {summary.ep}): {budgets}; objective: smallest {summary.objective}; task metric: "
             f"{summary.metric or 'none'}",
             "- space: " + "; ".join(f"{k} {v}" for k, v in summary.space.items()),
             f"- {len(summary.candidates)} trials on {summary.backend}: {counts.get('built', 0)} built, "
             f"{counts.get('pruned_by_proxy', 0)} pruned by proxies, {counts.get('pruned_by_halving', 0)} by "
             f"successive halving (rungs of {', '.join(map(str, summary.rung_samples))} evaluation samples, "
             f"factor {summary.reduction_factor}), {counts.get('failed', 0)} failed, "
             f"{sum(1 for c in summary.candidates if c.finalist)} finalists through the full harness; "
             f"{_fmt(summary.wall_time_s, '.0f')} s",
             "", "Pareto front over (task metric, size, peak RSS, p50):", "",
             "| " + " | ".join(PARETO_COLUMNS) + " |", "|" + "---|" * len(PARETO_COLUMNS),
             *("| " + " | ".join(row) + " |" for row in pareto_rows(summary)), "",
             "- measured: " + "; ".join(f"{k}: {v}" for k, v in HOW.items()),
             "- peak RSS (model): VmHWM of the measuring process minus its RSS after importing onnxruntime + numpy",
             "", "<details><summary>Every trial</summary>", "",
             "| trial | knobs | state | figures | why |", "|---|---|---|---|---|",
             *(_trial_line(c) for c in summary.candidates), "", "</details>", ""]
    return lines


def auto_html(report: Report) -> str:
    summary = report.auto
    if summary is None:
        return ""
    head = "".join(f"<th>{html.escape(c)}</th>" for c in PARETO_COLUMNS)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(cell.replace('**', ''))}</td>" for cell in row) + "</tr>"
                   for row in pareto_rows(summary))
    return (f'<h2 id="auto">Auto search</h2><p><strong>{html.escape(summary.verdict)}</strong></p>'
            f"<p>Pareto front over (task metric, size, peak RSS, p50); the figure below plots every measured "
            f"trial.</p><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")


def pareto_figure(report: Report) -> tuple[Figure, str] | None:
    """Task metric vs size and vs p50 for every measured trial, the front joined, the chosen ringed."""
    summary = report.auto
    if summary is None:
        return None
    measured = [c for c in summary.candidates if c.figures.how != "proxy" and c.figures.metric is not None]
    if not measured:
        return None
    figure = Figure(figsize=(10, 4.2), layout="constrained")
    by_size, by_latency = figure.subplots(1, 2, sharey=True)
    for axis, field, label in ((by_size, "size_mb", "model size, MB"), (by_latency, "p50_ms", "p50 latency, ms")):
        _scatter(axis, measured, field, summary)
        axis.set(xlabel=label)
    by_size.set(ylabel=f"{summary.metric or 'task metric'} (evaluation split)", title="task metric vs size")
    by_latency.set(title="task metric vs latency")
    by_size.legend(fontsize=7, loc="lower right")
    caption = ("Every trial measured on the evaluation split: harness figures for the finalists (squares), the "
               "last rung's for the rest (dots; pruned trials at their rung's sample count); the Pareto front over "
               "(task metric, size, peak RSS, p50) joined; the chosen trial ringed. Budgets: "
               + ", ".join(f"{b.name} <= {b.limit:g} {b.unit}" for b in summary.budgets) + f" on {summary.ep}.")
    return figure, caption


def _scatter(axis: Any, measured: list[AutoCandidate], field: str, summary: AutoSummary) -> None:
    points = [(c, getattr(c.figures, field)) for c in measured if getattr(c.figures, field) is not None]
    for state, color in (("complete", "C0"), ("pruned", "C7"), ("failed", "C3")):
        chosen = [(c, x) for c, x in points if c.state == state]
        if chosen:
            axis.scatter([x for _, x in chosen], [c.figures.metric for c, _ in chosen], s=18, color=color,
                         marker="o", alpha=0.7, label=state)
    finalists = [(c, x) for c, x in points if c.finalist]
    if finalists:
        axis.scatter([x for _, x in finalists], [c.figures.metric for c, _ in finalists], s=40, marker="s",
                     facecolors="none", edgecolors="C1", label="finalist (harness)")
    front = sorted(((x, c.figures.metric) for c, x in points if c.pareto), key=lambda p: p[0])
    if front:
        axis.plot([p[0] for p in front], [p[1] for p in front], color="C2", linewidth=1, label="Pareto front")
    for c, x in points:
        if c.trial == summary.chosen:
            axis.scatter([x], [c.figures.metric], s=160, facecolors="none", edgecolors="C3", linewidths=2,
                         label="chosen")
        if c.pareto or c.finalist:
            axis.annotate(str(c.trial), (x, c.figures.metric), fontsize=7, xytext=(4, 4), textcoords="offset points")


__all__ = ["auto_html", "auto_markdown", "pareto_figure", "pareto_rows"]
