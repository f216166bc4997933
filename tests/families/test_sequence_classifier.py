"""Family sequence-classifier on a tiny BertForSequenceClassification the tests train (questions vs statements),
and on all-MiniLM-L6-v2 with a classification head (slow): export, metric, quantize, validate."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch

from edgepack import stages
from edgepack.calibration_data import TextSample, read_samples
from edgepack.errors import BadInputError
from edgepack.exporters.onnx import export_onnx
from edgepack.families import open_model
from edgepack.families.sequence_classifier import accuracy, top1_agreement
from edgepack.pipeline import run_recipe
from edgepack.recipe import ExportSection, parse_recipe

FAMILY = "sequence-classifier"


def test_export_logits_match_torch(tiny_classifier_dir, tmp_path):
    family = open_model(str(tiny_classifier_dir))
    assert family.name == FAMILY and family.io.output_names == ["logits"] and family.num_labels == 2
    samples = [TextSample("Is the museum open on Sundays?"), TextSample("The museum opens at ten.")]
    metrics = export_onnx(family, tmp_path / "model.onnx", check_feeds=list(family.feeds(samples)))
    assert metrics["check"]["logits"]["max_abs_diff"] < 1e-4
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    batch = next(family.feeds(samples, batch_size=2))
    logits = session.run(["logits"], batch)[0]
    assert logits.shape == (2, 2)
    assert logits.argmax(axis=1).tolist() == [1, 0]  # the trained model tells the question from the statement


def test_metric_accuracy_from_indices_or_names_and_top1_agreement():
    assert accuracy(np.array([1, 0, 1]), ["question", 0, "1"], label2id={"question": 1}, where="x") == 1.0
    with pytest.raises(BadInputError, match="label 'maybe' is neither a class index nor one of the model's labels"):
        accuracy(np.array([0]), ["maybe"], label2id={"question": 1, "statement": 0}, where="data.jsonl")
    reference = [{"logits": np.array([[0.0, 1.0], [2.0, 0.0]])}, {"logits": np.array([[0.0, 1.0]])}]
    variant = [{"logits": np.array([[0.0, 0.9], [0.0, 2.0]])}, {"logits": np.array([[0.0, 3.0]])}]
    assert top1_agreement(reference, variant, output="logits") == pytest.approx(2 / 3)


def test_metric_reads_labels_from_the_data(tiny_classifier_dir, labelled_sentences):
    family = open_model(str(tiny_classifier_dir))
    samples = read_samples(labelled_sentences, label_field="label")[:40]
    assert {s.label for s in samples} == {"question", "statement"}
    module = family.load_torch()
    with torch.no_grad():
        outputs = [{"logits": module(*(torch.from_numpy(f[n]) for n in family.io.input_names)).numpy()}
                   for f in family.evaluation_feeds(samples, max_length=64)]
    assert family.task_metrics(outputs, samples)["accuracy"] >= 0.9
    assert "top1_agreement" in family.fidelity(outputs, outputs)


def test_quantize_and_validate_through_a_recipe(tiny_classifier_dir, labelled_sentences, tmp_path):
    recipe = parse_recipe({"name": "classifier", "model": {"path": str(tiny_classifier_dir)},
                           "data": {"path": str(labelled_sentences), "pair_field": None, "label_field": "label",
                                    "n_calibration": 32, "n_evaluation": 40, "max_length": 64},
                           "validate": {"warmup": 1, "runs": 3, "sequence_length": 32},
                           "bundle": {"enabled": False},
                           "gates": {"min_cosine": 0.9, "min_top1_agreement": 0.9}})
    report = run_recipe(recipe, tmp_path / "run")
    assert report.model["family"] == FAMILY
    assert report.quantization is not None and report.quantization.model_dump()["recipe"] == "transformer-encoder"
    fp32 = report.variants["fp32"].providers["cpu"].metrics
    int8 = report.variants["int8"].providers["cpu"].metrics
    assert fp32["accuracy"] >= 0.9 and fp32["top1_agreement"] == 1.0
    assert int8["top1_agreement"] >= 0.9 and abs(int8["accuracy"] - fp32["accuracy"]) <= 0.1
    assert report.passed and {g.name for g in report.gates} == {"min_cosine", "min_top1_agreement"}
    assert "accuracy" in (tmp_path / "run" / "report.md").read_text()


def test_quantize_needs_text_the_tokenizer_reads(tiny_classifier_dir, tmp_path):
    family = open_model(str(tiny_classifier_dir))
    exported = stages.export(family, check_samples=[TextSample("Is it raining?")], options=ExportSection(),
                             max_length=32, root=tmp_path)
    with pytest.raises(BadInputError, match="family sequence-classifier needs text samples"):
        list(open_model(str(exported.folder / "model.onnx")).feeds([{"x": np.zeros(3)}]))


@pytest.mark.slow
def test_minilm_with_a_classification_head(minilm_path, labelled_sentences, tmp_path):
    """all-MiniLM-L6-v2's encoder under a head trained for seconds: the real model through export, INT8, validate."""
    from transformers import AutoTokenizer, BertForSequenceClassification

    from tests.conftest import train_classifier

    folder = tmp_path / "minilm-classifier"
    model = BertForSequenceClassification.from_pretrained(
        minilm_path, num_labels=2, id2label={0: "statement", 1: "question"},
        label2id={"statement": 0, "question": 1}, attn_implementation="eager")
    for parameter in model.bert.parameters():
        parameter.requires_grad_(False)  # the head only: the encoder's features already separate the classes
    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    train_classifier(model, tokenizer, steps=120, lr=1e-2)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    recipe = parse_recipe({"name": "minilm-classifier", "model": {"path": str(folder)},
                           "data": {"path": str(labelled_sentences), "pair_field": None, "label_field": "label",
                                    "n_calibration": 64, "n_evaluation": 60, "max_length": 64},
                           "validate": {"warmup": 2, "runs": 10}, "bundle": {"enabled": False}})
    report = run_recipe(recipe, tmp_path / "run")
    fp32 = report.variants["fp32"].providers["cpu"].metrics
    int8 = report.variants["int8"].providers["cpu"].metrics
    assert fp32["accuracy"] >= 0.9
    # Two logits: a sample whose logits are both near 0 swings the cosine (min 0.13 in the fused graph, 0.66 in
    # QDQ), so the error is bounded by SQNR (measured 27.3 dB fused, 27.6 dB QDQ) and the mean cosine loosely
    # (0.985-0.988 fused, 0.991 QDQ).
    assert int8["top1_agreement"] >= 0.95 and int8["sqnr_db"] >= 25 and int8["cosine_mean"] >= 0.98
    assert report.variants["int8"].size_bytes < 0.3 * report.variants["fp32"].size_bytes


def test_quantize_and_validate_from_the_command_line(tiny_classifier_dir, labelled_sentences, tmp_path, capsys):
    """The README's classifier commands: export, quantize (no --tokenizer: the folder carries it), validate."""
    from edgepack.cli import main

    assert main(["export", str(tiny_classifier_dir), "--out", str(tmp_path / "cls"), "--data",
                 str(labelled_sentences)]) == 0
    assert main(["quantize", str(tmp_path / "cls" / "model.onnx"), "--calibration", str(labelled_sentences),
                 "--samples", "32", "--out", str(tmp_path / "cls-int8")]) == 0
    capsys.readouterr()
    assert main(["validate", str(tmp_path / "cls-int8" / "model.onnx"), "--reference",
                 str(tmp_path / "cls" / "model.onnx"), "--data", str(labelled_sentences), "--label-field", "label",
                 "--samples", "30", "--runs", "3", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    model = report["variants"]["model"]
    assert report["model"]["family"] == FAMILY and model["compared_to"] == "reference"
    assert model["providers"]["cpu"]["metrics"]["top1_agreement"] >= 0.9
    assert model["providers"]["cpu"]["metrics"]["accuracy"] >= 0.85
