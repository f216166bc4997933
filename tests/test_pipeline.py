"""The whole pipeline on a tiny BERT: report keys, manifests, caching by content hash, gates and exit code 3."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from edgepack.artifacts import sha256_file
from edgepack.cli import main
from edgepack.pipeline import run_recipe
from edgepack.recipe import parse_recipe


def tiny_recipe(model: Path, data_path: Path, **sections: dict) -> dict:
    recipe = {"name": "tiny", "model": {"path": str(model)},
              "data": {"path": str(data_path), "n_calibration": 16, "n_evaluation": 8},
              "validate": {"warmup": 2, "runs": 5, "sequence_length": 32}, "gates": {"min_cosine": 0.9}}
    for key, value in sections.items():
        recipe[key] = {**recipe.get(key, {}), **value}
    return recipe


@pytest.fixture(scope="module")
def tiny_run(tiny_bert_dir, small_sentences, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("run")
    report = run_recipe(parse_recipe(tiny_recipe(tiny_bert_dir, small_sentences)), out)
    return out, report.model_dump(mode="json")


def test_report_has_the_design_keys(tiny_run):
    out, report = tiny_run
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["passed"] == report["passed"]
    assert {"edgepack_version", "recipe", "reference", "passed", "variants", "gates"} <= on_disk.keys()
    assert on_disk["reference"] == "fp32" and set(on_disk["variants"]) == {"fp32", "int8"}
    for name, variant in on_disk["variants"].items():
        path = out / variant["path"]
        assert path.is_file() and variant["path"].startswith("export-" if name == "fp32" else "quantize-")
        assert variant["sha256"] == sha256_file(path) and variant["size_bytes"] == path.stat().st_size
        cpu = variant["providers"]["cpu"]
        assert cpu["status"] == "ok" and cpu["how"] == "device"
        lat, mem = cpu["latency_ms"], cpu["memory_mb"]
        assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] and lat["runs"] == 5
        assert 0 < mem["baseline"] <= mem["after_session"] <= mem["peak"]
        assert {"cosine_mean", "cosine_min", "paraphrase_recall_at_1", "paraphrase_mrr"} <= cpu["metrics"].keys()
    fp32 = on_disk["variants"]["fp32"]["providers"]["cpu"]["metrics"]
    assert fp32["cosine_mean"] == pytest.approx(1.0) and fp32["cosine_min"] == pytest.approx(1.0)
    int8 = on_disk["variants"]["int8"]["providers"]["cpu"]["metrics"]
    assert 0.9 < int8["cosine_mean"] < 1.0
    assert on_disk["variants"]["int8"]["size_bytes"] < 0.5 * on_disk["variants"]["fp32"]["size_bytes"]
    gate = on_disk["gates"][0]
    assert gate["name"] == "min_cosine" and gate["value"] == pytest.approx(int8["cosine_mean"], abs=1e-6)


def test_report_md_shows_both_variants(tiny_run):
    out, _ = tiny_run
    text = (out / "report.md").read_text()
    assert "| fp32 | cpu | device |" in text and "| int8 | cpu | device |" in text
    assert "**PASSED**" in text and "min_cosine" in text


def test_report_says_how_the_int8_model_was_made(tiny_run):
    out, report = tiny_run
    q = report["quantization"]
    assert q["stage"] == Path(report["variants"]["int8"]["path"]).parent.name
    layers = q["smoothquant"]["layers"]
    assert q["smoothquant"]["mode"] == "search" and {x["role"] for x in layers} == {"qkv", "ffn_in", "ffn_out"}
    assert all(x["error"] <= x["error_unsmoothed"] for x in layers)
    assert q["budget"]["max_cosine_drop"] == 0.005 and q["budget"]["met"] is True
    text = (out / "report.md").read_text()
    assert "## INT8 quantization" in text and "| smoothed activation | role | alpha |" in text
    assert f"- SmoothQuant: search, {len(layers)} layers searched" in text


def test_manifests_record_config_inputs_and_checks(tiny_run):
    out, _ = tiny_run
    export = json.loads(next(out.glob("export-*/manifest.json")).read_text())
    assert export["stage"] == "export"
    assert export["metrics"]["check"]["sentence_embedding"]["max_abs_diff"] < 1e-4
    assert export["outputs"]["model.onnx"]["sha256"] == sha256_file(next(out.glob("export-*/model.onnx")))
    assert {"onnxruntime", "torch", "edgepack"} <= export["tool_versions"].keys() and export["peak_rss_mb"] > 0
    quant = json.loads(next(out.glob("quantize-*/manifest.json")).read_text())
    assert quant["inputs"]["model"] == export["outputs"]["model.onnx"]["sha256"]
    assert quant["metrics"]["calibrated_tensors"] > 0
    assert not list(out.glob(".tmp-*"))


def test_rerun_reuses_stages_and_a_config_change_does_not(tiny_run, tiny_bert_dir, small_sentences):
    out, report = tiny_run
    export_model = out / report["variants"]["fp32"]["path"]
    quant_model = out / report["variants"]["int8"]["path"]
    stamps = export_model.stat().st_mtime_ns, quant_model.stat().st_mtime_ns
    again = run_recipe(parse_recipe(tiny_recipe(tiny_bert_dir, small_sentences)), out)
    assert again.variants["int8"].path == report["variants"]["int8"]["path"]
    assert (export_model.stat().st_mtime_ns, quant_model.stat().st_mtime_ns) == stamps
    assert all(stage.reused for stage in again.stages)
    assert [s.stage for s in again.stages] == ["export", "quantize", "validate", "bundle"]
    changed = run_recipe(parse_recipe(tiny_recipe(tiny_bert_dir, small_sentences,
                                                  quantize={"per_channel": False})), out)
    assert changed.variants["fp32"].path == report["variants"]["fp32"]["path"]
    assert changed.variants["int8"].path != report["variants"]["int8"]["path"]
    assert [s.reused for s in changed.stages] == [True, False, False, False]


def test_failed_gate_exits_3_and_still_writes_the_report(tiny_bert_dir, small_sentences, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(tiny_bert_dir, small_sentences, gates={"max_size_ratio": 0.01})))
    code = main(["run", str(recipe), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 3
    assert "gate(s) failed: max_size_ratio" in err
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["passed"] is False
    failed = [g for g in report["gates"] if not g["passed"]]
    assert [g["name"] for g in failed] == ["max_size_ratio"] and failed[0]["value"] > 0.01


def test_too_few_samples_for_the_split(tiny_bert_dir, small_sentences, tmp_path):
    from edgepack.errors import BadInputError

    recipe = parse_recipe(tiny_recipe(tiny_bert_dir, small_sentences, data={"n_calibration": 500}))
    with pytest.raises(BadInputError, match=r"500 calibration \+ 8 evaluation"):
        run_recipe(recipe, tmp_path / "run")
    assert not list((tmp_path / "run").glob("export-*"))


def test_bundle_of_the_final_variant_verifies(tiny_run):
    from edgepack.exporters.verify import read_bundle_description, verify_bundle

    out, report = tiny_run
    folder = out / report["bundle"]["path"]
    assert report["bundle"]["variant"] == "int8"
    result = verify_bundle(folder)
    assert result.passed and result.vectors == 4 and result.mismatches == []
    description = read_bundle_description(folder)
    assert (folder / "model.ort").is_file() and (folder / "model_data.c").is_file()
    assert description["validated"] == {"cpu": {"status": "ok", "how": "device"}}
    assert json.loads((folder / "manifest.json").read_text())["stage"] == "bundle"  # the one stage runner's


def test_distill_and_prune_stages_feed_the_export(tiny_bert_dir, small_sentences, tmp_path):
    recipe = parse_recipe(tiny_recipe(
        tiny_bert_dir, small_sentences, data={"n_calibration": 24},
        distill={"enabled": True, "keep_layers": [1], "ffn_ratio": 0.5, "epochs": 1, "batch_size": 8},
        prune={"enabled": True, "heads_ratio": 0.5, "calibration_samples": 8, "calibration_batch_size": 8},
        bundle={"enabled": False}, gates={"min_cosine": None}))
    report = run_recipe(recipe, tmp_path).model_dump(mode="json")
    assert list(report["variants"]) == ["fp32", "compressed-fp32", "int8"]
    distill = json.loads(next(tmp_path.glob("distill-*/manifest.json")).read_text())["metrics"]
    prune = json.loads(next(tmp_path.glob("prune-*/manifest.json")).read_text())["metrics"]
    assert distill["params_after"] < distill["params_before"]
    assert prune["params_after"] < prune["params_before"] == distill["params_after"]
    config = json.loads(next(tmp_path.glob("prune-*/model/config.json")).read_text())
    assert config["num_hidden_layers"] == 1 and config["intermediate_size"] == 32
    sizes = {k: v["size_bytes"] for k, v in report["variants"].items()}
    assert sizes["int8"] < sizes["compressed-fp32"] < sizes["fp32"]
    quant = json.loads(next(tmp_path.glob("quantize-*/manifest.json")).read_text())
    export_sha = {json.loads(m.read_text())["outputs"]["model.onnx"]["sha256"] for m in tmp_path.glob("export-*/manifest.json")}
    assert quant["inputs"]["model"] in export_sha
    assert report["variants"]["compressed-fp32"]["providers"]["cpu"]["status"] == "ok"


def test_report_is_typed_validated_and_its_schema_is_published(tiny_run):
    from pydantic import ValidationError

    from edgepack.report.model import SCHEMA_VERSION, Report, report_schema

    out, report = tiny_run
    published = json.loads((Path(__file__).resolve().parents[1] / "docs" / "report.schema.json").read_text())
    assert published == json.loads(json.dumps(report_schema(), sort_keys=True)), \
        "docs/report.schema.json is stale: regenerate it from edgepack.report.model.report_schema()"
    on_disk = Report.model_validate_json((out / "report.json").read_text())
    assert on_disk.schema_version == SCHEMA_VERSION and on_disk.model["family"] == "sentence-encoder"
    broken = json.loads((out / "report.json").read_text())
    broken["variants"]["int8"]["providers"]["cpu"]["staus"] = "ok"  # a misspelt key is an error, not a gap
    with pytest.raises(ValidationError, match="staus"):
        Report.model_validate(broken)


def test_a_narrower_student_is_compared_by_task_metric_and_its_int8_against_it(tiny_bert_dir, small_sentences,
                                                                            tmp_path):
    """The configuration of scripts/bench_compress.py (hidden width narrowed): no shape error after the work."""
    recipe = parse_recipe(tiny_recipe(
        tiny_bert_dir, small_sentences, data={"n_calibration": 24},
        distill={"enabled": True, "keep_layers": [0], "ffn_ratio": 0.5, "hidden_ratio": 0.5, "epochs": 1,
                 "batch_size": 8, "data": {"path": str(small_sentences), "pair_field": "paraphrase",
                                           "combinations": 10}},
        bundle={"enabled": False}))
    report = run_recipe(recipe, tmp_path)
    student = report.variants["compressed-fp32"].providers["cpu"]
    assert student.status == "ok" and "cosine_mean" not in student.metrics
    assert "paraphrase_recall_at_1" in student.metrics
    assert "[1, 16] here and [1, 32] in 'fp32': no cosine; compared by task metric only" in student.fidelity_note
    int8 = report.variants["int8"]
    assert int8.compared_to == "compressed-fp32" and int8.providers["cpu"].metrics["cosine_mean"] > 0.9
    assert report.gates[0].name == "min_cosine" and report.gates[0].passed  # INT8 vs the student it came from
    distill = json.loads(next(tmp_path.glob("distill-*/manifest.json")).read_text())
    # the file's 40 records minus the 8 evaluation and 4 early-stopping ones, text and pair each, plus combinations
    assert 56 <= distill["metrics"]["train_texts"] <= 56 + 10 and distill["metrics"]["held_out_pairs"] == 4
    md = (tmp_path / "report.md").read_text()
    assert "compared by task metric only" in md and "int8 vs compressed-fp32" in md


def test_distill_data_missing_or_empty_is_one_line_before_any_training(tiny_bert_dir, small_sentences, tmp_path):
    from edgepack.errors import BadInputError

    def recipe(path: Path) -> dict:
        return tiny_recipe(tiny_bert_dir, small_sentences, data={"n_calibration": 24},
                           distill={"enabled": True, "keep_layers": [0], "data": {"path": str(path)}},
                           bundle={"enabled": False})

    with pytest.raises(BadInputError, match=r"none.txt: file not found"):
        run_recipe(parse_recipe(recipe(tmp_path / "none.txt")), tmp_path / "a")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    with pytest.raises(BadInputError, match=r"empty.txt: no samples"):
        run_recipe(parse_recipe(recipe(empty)), tmp_path / "b")
    # text that is all in the evaluation split leaves nothing to train on: said, not trained on the test set
    from edgepack.calibration_data import read_samples, split_samples

    split = split_samples(read_samples(small_sentences, pair_field="paraphrase"), n_calibration=24, n_evaluation=8,
                          seed=0, source="x")
    held = tmp_path / "held.txt"
    held.write_text("\n".join(s.text for s in split.evaluation) + "\n")
    with pytest.raises(BadInputError, match=r"held.txt: no training text left after holding out the evaluation"):
        run_recipe(parse_recipe(recipe(held)), tmp_path / "c")
    assert not list((tmp_path / "c").glob("distill-*"))
