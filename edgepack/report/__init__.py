"""Reports: report.json (the contract other tools read), report.md (the table a person reads), and gates."""

from edgepack.report.gates import evaluate_gates
from edgepack.report.writer import render_markdown, results_rows, write_reports

__all__ = ["evaluate_gates", "render_markdown", "results_rows", "write_reports"]
