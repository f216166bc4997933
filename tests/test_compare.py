"""`edgepack compare`: per variant x EP changes with a noise band, exit 3 on a crossed threshold, bad input for
reports of different models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgepack.cli import main
from edgepack.errors import BadInputError
from edgepack.report.compare import CompareThresholds, compare_reports, median_band, parse_fraction
from edgepack.report.model import Report

SIGNATURE = {"inputs": {"input_ids": {"dims": ["batch", "sequence"], "dtype": "int64"}},
             "outputs": {"sentence_embedding": {"dims": ["batch", 384], "dtype": "float32"}}}


def _row(p50: float, *, iqr: float = 0.4, runs: int = 50, peak: float = 200.0, cosine: float = 0.997) -> dict:
    return {"status": "ok", "how": "device", "device": "local",
            "latency_ms": {"p50": p50, "p90": p50 * 1.1, "p99": p50 * 1.3, "runs": runs, "p25": p50 - iqr / 2,
                           "p75": p50 + iqr / 2, "std": iqr},
            "memory_mb": {"baseline": 50.0, "after_session": 150.0, "after_first_run": 160.0, "peak": peak},
            "metrics": {"cosine_mean": cosine, "paraphrase_recall_at_1": 1.0}}


def _report(rows: dict[str, dict], **model: object) -> dict:
    return {"edgepack_version": "test", "recipe": {"name": "minilm"},
            "model": {"family": "sentence-encoder", "task": "feature-extraction", "source": "m",
                      "signature": SIGNATURE, **model},
            "data": {"path": "d", "n_calibration": 1, "n_evaluation": 1}, "reference": "fp32",
            "primary_output": "sentence_embedding", "passed": True,
            "variants": {"int8": {"path": "q/model.onnx", "size_bytes": 1, "sha256": "0" * 64, "providers": rows}}}


def _write(path: Path, report: dict) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "report.json").write_text(json.dumps(report))
    return path / "report.json"


def test_noise_band_comes_from_the_runs_spread():
    band = median_band({"p25": 9.8, "p75": 10.2, "runs": 100})
    assert band == pytest.approx(1.58 * 0.4 / 10)
    assert median_band({"std": 1.0, "runs": 4}) == pytest.approx(1.96 * 1.2533 / 2)
    assert median_band({"runs": 1}) is None
    assert parse_fraction("5%", option="x") == pytest.approx(0.05) and parse_fraction("0.03", option="x") == 0.03
    with pytest.raises(BadInputError, match="give a percentage"):
        parse_fraction("five", option="--max-latency-regression")


def test_a_regression_inside_the_noise_band_passes_and_outside_it_fails():
    old = Report.model_validate(_report({"cpu": _row(10.0)}))
    # +6 % but the runs are noisy (IQR 4 ms over 10 runs: band ~ +-28 %): not a regression
    noisy = Report.model_validate(_report({"cpu": _row(10.6, iqr=4.0, runs=10)}))
    limits = CompareThresholds(max_latency_regression=0.05)
    assert compare_reports(Report.model_validate(_report({"cpu": _row(10.0, iqr=4.0, runs=10)})), noisy,
                           limits).passed
    # +6 % with a tight spread (band ~ +-1.3 %): a regression past 5 %
    tight = Report.model_validate(_report({"cpu": _row(10.6)}))
    comparison = compare_reports(old, tight, limits)
    assert not comparison.passed and comparison.failed[0].key == "int8 / cpu"
    assert "p50 10 -> 10.6 ms (+6.0%" in comparison.failed[0].failures[0]
    p50 = comparison.rows[0].latency[0]
    assert p50.relative == pytest.approx(0.06) and p50.band == pytest.approx(2**0.5 * 1.58 * 0.4 / 50**0.5 / 10)
    # faster is never a failure
    assert compare_reports(tight, old, limits).passed


def test_memory_and_metric_thresholds():
    old = Report.model_validate(_report({"cpu": _row(10.0)}))
    new = Report.model_validate(_report({"cpu": _row(10.0, peak=210.0, cosine=0.990)}))
    assert compare_reports(old, new, CompareThresholds()).passed  # no thresholds: a report, not a gate
    failures = compare_reports(old, new, CompareThresholds(max_memory_regression=0.03, max_metric_drop=0.005)
                               ).failed[0].failures
    assert len(failures) == 2
    assert "peak memory 200 -> 210 MiB (+5.0%) exceeds +3.0%" in failures[0]
    assert "cosine_mean 0.9970 -> 0.9900 (worse by 0.0070) exceeds 0.005" in failures[1]


def test_cli_exit_codes_and_bad_input(tmp_path, capsys):
    old = _write(tmp_path / "old", _report({"cpu": _row(10.0), "mobile-cpu/t1": _row(20.0)}))
    new = _write(tmp_path / "new", _report({"cpu": _row(10.9), "qnn-htp": _row(99.0)}))
    assert main(["compare", str(old), str(new)]) == 0
    out = capsys.readouterr().out
    assert "10.000 → 10.900 (+9.0% ±" in out and "only in OLD: int8 / mobile-cpu/t1" in out
    assert "only in NEW: int8 / qnn-htp" in out
    assert main(["compare", str(old.parent), str(new.parent), "--max-latency-regression", "5%"]) == 3
    err = capsys.readouterr().err
    assert "error: 1 row(s) crossed a threshold; first: int8 / cpu: p50" in err
    assert main(["compare", str(old), str(new), "--max-latency-regression", "10%", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["passed"] and data["rows"][0]["latency_ms"]["p50"]["relative"] == pytest.approx(0.09)
    other = _write(tmp_path / "other", _report({"cpu": _row(10.0)}, family="sequence-classifier"))
    assert main(["compare", str(old), str(other)]) == 2
    assert "are reports of different models (family 'sentence-encoder' vs 'sequence-classifier')" in \
        capsys.readouterr().err
    renamed = {**SIGNATURE, "inputs": {"pixel_values": {"dims": [1, 3, 224, 224], "dtype": "float32"}}}
    wider = _write(tmp_path / "wider", _report({"cpu": _row(10.0)}, signature=renamed))
    assert main(["compare", str(old), str(wider)]) == 2
    assert "graph inputs ['input_ids'] vs ['pixel_values']" in capsys.readouterr().err
    (tmp_path / "junk.json").write_text('{"hello": 1}')
    assert main(["compare", str(old), str(tmp_path / "junk.json")]) == 2
    assert "not an edgepack report" in capsys.readouterr().err
    assert main(["compare", str(old), str(tmp_path / "absent")]) == 2
    disjoint = _write(tmp_path / "disjoint", _report({"coreml": _row(1.0)}))
    assert main(["compare", str(old), str(disjoint)]) == 2
    assert "no variant x EP row that both measured" in capsys.readouterr().err
