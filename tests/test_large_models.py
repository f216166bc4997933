"""Models over 2 GB: external data through export, quantization (the calibration copy), validation and bundling.

Normal suite: the one threshold (`onnx_files.external_data_threshold`) lowered to 1000 bytes carries the tiny BERT
through every stage as external data, and the artifacts are compared with the same run kept in one file.
`make test-slow` (marker `huge`): a real 2.25 GiB model, measured.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from edgepack.errors import BadInputError
from edgepack.onnx_files import externalize_if_large, model_digest
from edgepack.pipeline import run_recipe
from edgepack.recipe import parse_recipe
from tests.huge_models import BIG_WIDTH, make_onnx_mlp

REPO = Path(__file__).resolve().parents[1]


def small_recipe(model: Path, data: Path) -> dict:
    return {"name": "external", "model": {"path": str(model)},
            "data": {"path": str(data), "n_calibration": 8, "n_evaluation": 4},
            "quantize": {"max_cosine_drop": None}, "validate": {"warmup": 0, "runs": 2, "sequence_length": 32},
            "bundle": {"samples": 1, "fixed_shapes": {"batch": 1, "sequence": 32}}, "gates": {"min_cosine": 0.9}}


def _manifest(out: Path, stage: str) -> dict:
    return json.loads(next(out.glob(f"{stage}-*/manifest.json")).read_text())


def test_every_stage_carries_external_data_and_ends_with_the_same_bundle(tiny_bert_dir, small_sentences, tmp_path,
                                                                       monkeypatch):
    """EDGEPACK_EXTERNAL_DATA_BYTES=1000: export and quantize write model.onnx + model.onnx.data (the calibration
    and SmoothQuant copies too), validation probes load them, the bundle reads them in; the .ort files and every
    metric equal those of the same run with weights inline."""
    recipe = parse_recipe(small_recipe(tiny_bert_dir, small_sentences))
    inline = run_recipe(recipe, tmp_path / "inline")
    monkeypatch.setenv("EDGEPACK_EXTERNAL_DATA_BYTES", "1000")
    external = run_recipe(recipe, tmp_path / "external")
    for stage in ("export", "quantize"):
        outputs = _manifest(tmp_path / "external", stage)["outputs"]
        assert outputs["model.onnx.data"]["size_bytes"] > 10 * outputs["model.onnx"]["size_bytes"]
        assert "model.onnx.data" not in _manifest(tmp_path / "inline", stage)["outputs"]
    bundles = [tmp_path / run / r.bundle.path for run, r in (("inline", inline), ("external", external))]
    for name in ("model.ort", "fixed/model.ort", "model_data.c"):
        assert (bundles[0] / name).read_bytes() == (bundles[1] / name).read_bytes(), name
    for name, variant in inline.variants.items():
        assert external.variants[name].providers["cpu"].metrics == variant.providers["cpu"].metrics
    # the same .onnx bytes can carry other weights: inputs and cache keys hash the data files too
    export = next((tmp_path / "external").glob("export-*"))
    assert model_digest(export / "model.onnx") != json.loads((export / "manifest.json").read_text()
                                                             )["outputs"]["model.onnx"]["sha256"]


def test_weights_in_other_data_files_are_gathered_into_one_a_tensor_at_a_time(tmp_path):
    """torch.onnx over 2 GB writes a file per weight beside the model: they become <name>.data, same outputs."""
    (tmp_path / "per_tensor").mkdir()
    model_path = make_onnx_mlp(tmp_path / "per_tensor" / "model.onnx", layers=3, width=64)
    model = onnx.load(str(model_path))
    onnx.save_model(model, str(model_path), save_as_external_data=True, all_tensors_to_one_file=False,
                    size_threshold=0)
    assert sorted(p.name for p in model_path.parent.iterdir()) == ["W0", "W1", "W2", "model.onnx"]
    x = np.random.default_rng(0).standard_normal((2, 64)).astype(np.float32)
    before = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    externalize_if_large(model_path)
    assert sorted(p.name for p in model_path.parent.iterdir()) == ["model.onnx", "model.onnx.data"]
    after = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert np.array_equal(before, after)


def test_calibration_plans_on_the_graph_without_serializing_the_weights(tmp_path, monkeypatch):
    """The real 2.25 GiB model crashed in `tensors_to_calibrate` (EncodeError: protobuf cannot serialize 2 GiB):
    shape inference now gets a weightless copy, whatever the model's size, and finds the same tensors."""
    from edgepack.onnx_files import without_weights
    from edgepack.quantization.quantize import tensors_to_calibrate
    from edgepack.quantization.recipes import plan_quantization

    model = onnx.load(str(make_onnx_mlp(tmp_path / "model.onnx", layers=3, width=512)))  # 3 MiB of weights
    seen: list[int] = []
    infer = onnx.shape_inference.infer_shapes

    def spy(proto: onnx.ModelProto, *args: object, **kwargs: object) -> onnx.ModelProto:
        seen.append(proto.ByteSize())
        return infer(proto, *args, **kwargs)

    monkeypatch.setattr(onnx.shape_inference, "infer_shapes", spy)
    tensors = tensors_to_calibrate(model, plan_quantization(model, family="generic", exclude=()))
    assert tensors == ["x", "m0", "r0", "m1", "r1", "m2"] and seen and max(seen) < 4096 < model.ByteSize() // 100
    assert len(without_weights(model).graph.initializer) == 3 and model.ByteSize() > 3 * 2**20  # input untouched


def test_the_bundle_refuses_over_the_ort_format_limit_before_reading_a_weight(tmp_path, monkeypatch):
    from edgepack.exporters import bundle

    model_path = make_onnx_mlp(tmp_path / "model.onnx", layers=2, width=256)  # 512 KiB of weights
    monkeypatch.setattr(bundle, "ORT_FORMAT_LIMIT_BYTES", 2**19 + bundle.ORT_FORMAT_MARGIN_BYTES)

    def no_reading(*args: object, **kwargs: object) -> None:
        raise AssertionError("the weights were read")

    monkeypatch.setattr("onnx.external_data_helper.load_external_data_for_model", no_reading)
    with pytest.raises(BadInputError, match=r"0\.00 GiB with its weights; an ORT format model is one FlatBuffer"):
        bundle.make_bundle(model_path, tmp_path / "b", feeds=[{"x": np.ones((1, 256), np.float32)}])
    assert not (tmp_path / "b").exists()


# ------------------------------------------------------------------------------------------- a real 2.25 GiB model


def _run_measured(args: list[str], *, cwd: Path) -> tuple[int, str, float]:
    """(exit code, stderr, peak RSS in GiB of the process and its children, sampled every 0.1 s)."""
    import psutil

    proc = subprocess.Popen(args, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    peak = 0.0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            try:
                root = psutil.Process(proc.pid)
                total = sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])
                peak = max(peak, total / 2**30)
            except psutil.Error:
                pass
            time.sleep(0.1)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    _, err = proc.communicate(timeout=3600)
    stop.set()
    thread.join()
    return proc.returncode, err, peak


def _disk_gib(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**30


@pytest.mark.huge
def test_a_real_model_over_2_gib_through_export_validate_quantize_and_bundle(tmp_path, monkeypatch):
    """9 x 8192 x 8192 float32 (2.25 GiB): export writes one .data file; validation runs it; the FP32 bundle is
    refused (FlatBuffers' 2 GiB) before a weight is read; quantization runs when the memory guard says it fits and
    is refused with both numbers when not; the INT8 model (0.56 GiB) is bundled and verified."""
    from edgepack import memory_guard

    free_disk = shutil.disk_usage(tmp_path).free / 2**30
    if free_disk < 16:
        pytest.skip(f"needs 16 GiB of free disk, {free_disk:.0f} here")
    edgepack = [sys.executable, "-m", "edgepack.cli"]
    np.savez(tmp_path / "x.npz", x=np.random.default_rng(0).standard_normal((4, BIG_WIDTH)).astype(np.float32))
    facts: dict[str, object] = {}

    code, err, peak = _run_measured([*edgepack, "export", "tests.huge_models:make_big_mlp", "--input",
                                     f"x:1x{BIG_WIDTH}", "--output", "y", "--data", "x.npz", "--out", "exp"],
                                    cwd=tmp_path)
    assert code == 0, err
    exp = tmp_path / "exp"
    assert sorted(p.name for p in exp.iterdir() if p.name.startswith(("model", "onnx"))) == \
        ["model.onnx", "model.onnx.data"]
    data_bytes = (exp / "model.onnx.data").stat().st_size
    assert data_bytes > 2**31
    facts["export"] = {"peak_rss_gib": round(peak, 2), "data_gib": round(data_bytes / 2**30, 2)}

    code, err, peak = _run_measured([*edgepack, "validate", "exp/model.onnx", "--data", "x.npz", "--samples", "2",
                                     "--runs", "2", "--out", "val"], cwd=tmp_path)
    assert code == 0, err
    report = json.loads((tmp_path / "val" / "report.json").read_text())
    assert report["variants"]["model"]["providers"]["cpu"]["status"] == "ok"
    facts["validate"] = {"peak_rss_gib": round(peak, 2),
                         "probe_peak_mb": report["variants"]["model"]["providers"]["cpu"]["memory_mb"]["peak"]}

    code, err, peak = _run_measured([*edgepack, "bundle", "exp/model.onnx", "--out", "b32", "--data", "x.npz"],
                                    cwd=tmp_path)
    assert code == 2 and "an ORT format model is one FlatBuffer" in err, err
    assert peak < 1.5  # refused from the file sizes: the 2.25 GiB were never read
    facts["bundle_fp32"] = {"refused": err.strip().splitlines()[-1][:160], "peak_rss_gib": round(peak, 2)}

    # This machine is shared: plan for a share of it (6 GiB unless EDGEPACK_MEMORY_LIMIT_BYTES says more).
    share = os.environ.get("EDGEPACK_MEMORY_LIMIT_BYTES", str(6 * 2**30))
    monkeypatch.setenv("EDGEPACK_MEMORY_LIMIT_BYTES", share)
    feed = {"x": np.zeros((1, BIG_WIDTH), np.float32)}
    estimate = memory_guard.estimate_calibration(exp / "model.onnx", feed)
    free, source = memory_guard.available_memory()
    facts["quantize_estimate_gib"] = round(estimate.peak_bytes / 2**30, 2)
    facts["available_gib"] = (round(free / 2**30, 2), source)
    code, err, peak = _run_measured([*edgepack, "quantize", "exp/model.onnx", "--calibration", "x.npz", "--samples",
                                     "4", "--max-cosine-drop", "-1", "--smoothquant", "off", "--out", "int8"],
                                    cwd=tmp_path)
    facts["quantize_peak_rss_gib"] = round(peak, 2)
    if estimate.peak_bytes > free:
        assert code == 2 and "GiB is available" in err and "max-length" in err, err
        assert peak < 2  # refused before the model was loaded
        facts["quantize"] = {"refused": err.strip().splitlines()[-1][:200]}
    else:
        assert code == 0, err
        facts["quantize"] = {"peak_rss_gib": round(peak, 2)}
        code, err, peak = _run_measured([*edgepack, "bundle", "int8/model.onnx", "--out", "b8", "--data", "x.npz",
                                         "--samples", "1"], cwd=tmp_path)
        assert code == 0, err
        assert subprocess.run([*edgepack, "verify", "b8"], cwd=tmp_path, capture_output=True).returncode == 0
        facts["bundle_int8"] = {"peak_rss_gib": round(peak, 2), "ort_gib": round(
            (tmp_path / "b8" / "model.ort").stat().st_size / 2**30, 2)}
    facts["disk_gib"] = round(_disk_gib(tmp_path), 2)
    print(json.dumps(facts, indent=1))  # make test-slow runs with -s: the figures docs/reliability.md quotes
