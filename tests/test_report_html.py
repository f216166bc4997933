"""report.html: self-contained page with embedded matplotlib figures, rendered in headless Chromium."""

from __future__ import annotations

import base64
import io
import re
import shutil
import subprocess

import numpy as np
import pytest
from matplotlib.image import imread

from edgepack.report.figures import HOW_TEXT, report_figures
from edgepack.report.html import write_html
from edgepack.report.model import Report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def _entry(how: str, p50: float, cosine: float, *, on_ep: int, total: int, partitions: int | None) -> dict:
    breakdown = {"runtime_baseline": 50.0, "weights": 22.0, "prepacked": 20.0 if how == "device" else None,
                 "activations": 3.0, "other": 9.0, "methods": {"weights": "graph initializers"}}
    return {"status": "ok", "how": how, "latency_ms": {"p50": p50, "p90": p50 * 1.1, "p99": p50 * 1.2, "runs": 5},
            "memory_mb": {"baseline": 50.0, "after_session": 90.0, "after_first_run": 100.0, "peak": 110.0,
                          "breakdown": breakdown},
            "metrics": {"cosine_mean": cosine, "cosine_min": cosine - 0.01}, "evaluation_samples": 4,
            "coverage": {"nodes_on_ep": on_ep, "nodes_total": total, "partitions": partitions,
                         "fallback_ops": {} if on_ep == total else {"Erf": total - on_ep},
                         "matmul_on_ep": 48, "matmul_total": 48}}


def _report(**changes: object) -> Report:
    static = {"status": "ok", "how": "static-analysis",
              "coverage": {"nodes_on_ep": 212, "nodes_total": 237, "partitions": 22,
                           "fallback_ops": {"LayerNormalization": 13}, "matmul_on_ep": 48, "matmul_total": 48}}
    return Report.model_validate({
        "edgepack_version": "test", "recipe": {"name": "minilm <test>"},
        "model": {"source": "all-MiniLM-L6-v2", "family": "sentence-encoder"},
        "data": {"path": "bundled:sentences.jsonl", "n_calibration": 10, "n_evaluation": 20}, "reference": "fp32",
        "primary_output": "sentence_embedding", "passed": True,
        "variants": {
            "fp32": {"path": "export/model.onnx", "sha256": "0" * 64, "size_bytes": 90_000_000, "providers": {
                "cpu": _entry("device", 21.0, 1.0, on_ep=255, total=255, partitions=1), "nnapi": static}},
            "int8": {"path": "quantize/model.onnx", "sha256": "1" * 64, "size_bytes": 23_000_000,
                     "compared_to": "fp32", "providers": {
                         "cpu": _entry("device", 9.5, 0.994, on_ep=560, total=560, partitions=1),
                         "qnn-htp": _entry("emulated", 48000.0, 0.991, on_ep=549, total=549, partitions=1),
                         "xnnpack": {"status": "unavailable", "how": "device", "error": "not in this build"}}}},
        "gates": [{"name": "min_cosine", "variant": "int8", "provider": "cpu", "threshold": 0.99, "value": 0.994,
                   "passed": True}],
        **changes})


DEVICE = {"label": "ssh://pi@board", "hostname": "board", "os": "Linux 6.1", "machine": "aarch64",
          "cpu": "Cortex-A76", "int8_isa": "ARM dot-product", "cores": 4, "usable_cores": 4, "python": "3.11.2",
          "onnxruntime": "1.32.0", "numpy": "2.4.6", "threads": 2, "memory_total_mb": 8000.0,
          "providers": {"cpu": "available", "xnnpack": "not in this build"}}
QUANTIZATION = {"stage": "quantize-abc", "budget": {"max_cosine_drop": 0.005, "met": True, "check_samples": 32,
                                                    "check_fidelity": {"cosine_mean": 0.9962}, "fallback_nodes": []},
                "sensitivity_top": [{"node": f"/encoder/layer.{i}/output/dense/MatMul", "cosine_mean": 0.9962 + g,
                                     "gain": g} for i, g in enumerate((0.0021, 0.0009, 0.0004, -0.0001))]}


def test_device_block_per_ep_tables_and_the_sensitivity_chart(tmp_path):
    report = _report(device=DEVICE, quantization=QUANTIZATION)
    figures = {figure.name: figure for figure in report_figures(report)}
    assert list(figures) == ["tradeoff", "memory", "coverage", "sensitivity"]
    assert "Device: ssh://pi@board (board, Cortex-A76, int8 ISA ARM dot-product" in figures["memory"].caption
    assert "32 calibration samples" in figures["sensitivity"].caption
    page = write_html(report, tmp_path).read_text()
    assert 'id="device"' in page and "ARM dot-product" in page and "EP xnnpack" in page
    assert [ep for ep in re.findall(r'<h3 id="ep-([^"]+)"', page)] == ["cpu", "nnapi", "qnn-htp", "xnnpack"]
    assert 'id="fig-sensitivity"' in page and "accuracy budget (max cosine drop 0.005)" in page


def test_figures_captions_say_how_each_number_was_obtained():
    figures = {figure.name: figure for figure in report_figures(_report())}
    assert list(figures) == ["tradeoff", "memory", "coverage"]
    for figure in figures.values():
        assert figure.png.startswith(b"\x89PNG")
        assert HOW_TEXT["device"] in figure.caption and HOW_TEXT["emulated"] in figure.caption
    assert HOW_TEXT["static-analysis"] in figures["coverage"].caption
    assert "left out of the latency panel" in figures["tradeoff"].caption
    assert report_figures(_report(variants={})) == []


def test_html_is_self_contained_and_escaped(tmp_path):
    page = write_html(_report(), tmp_path).read_text()
    assert sorted(p.name for p in (tmp_path / "figures").iterdir()) == ["coverage.png", "memory.png", "tradeoff.png"]
    assert "minilm &lt;test&gt;" in page and "<test>" not in page
    assert "timings are NOT device timings" in page and 'class="emulated"' in page
    assert "unavailable: not in this build" in page
    assert not re.search(r'src="(?!data:)', page)  # nothing loaded from outside the file


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")
def test_html_renders_in_headless_chromium_with_every_figure(tmp_path):
    page = write_html(_report(device=DEVICE, quantization=QUANTIZATION), tmp_path / "run")
    flags = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,3000"]
    dom = subprocess.run([*flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=90,
                         check=True).stdout
    images = re.findall(r'<img alt="(\w+)" src="data:image/png;base64,([A-Za-z0-9+/=]+)"', dom)
    assert [name for name, _ in images] == ["tradeoff", "memory", "coverage", "sensitivity"]
    assert "Cortex-A76" in dom and dom.count("<table>") == 5  # the device card is a list, the 4 EPs and the gates
    for _, data in images:
        pixels = imread(io.BytesIO(base64.b64decode(data)), format="png")  # (H, W, 4) floats in [0, 1]
        assert pixels.shape[0] > 200 and pixels[..., :3].std() > 0.05  # a drawn figure, not a blank canvas
    shot = tmp_path / "shot.png"
    subprocess.run([*flags, f"--screenshot={shot}", page.as_uri()], capture_output=True, timeout=90, check=True)
    pixels = imread(shot)[..., :3]
    assert pixels.shape[:2] == (3000, 1200)
    assert np.mean(pixels.min(axis=2) < 0.9) > 0.02  # text, table and figures put ink on at least 2% of the page
