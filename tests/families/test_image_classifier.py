"""Family image-classifier on tiny real models: a torchvision-style factory (`tests.tiny_models:make_mobilenet`), a
tiny Hugging Face ResNetForImageClassification folder, and a Paddle-style ONNX segmenter (task dense-prediction)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from edgepack import stages
from edgepack.calibration_data import read_samples
from edgepack.errors import BadInputError
from edgepack.families import open_model
from edgepack.families.image_classifier import dense_fidelity, mask_iou, topk_agreement
from edgepack.recipe import ExportSection, QuantizeSection
from tests.tiny_models import MOBILENET_OPTIONS
from tests.vision_graphs import paddle_style_segmenter, write_class_photos

FAMILY = "image-classifier"
FACTORY = "tests.tiny_models:make_mobilenet"


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """12 smooth RGB images and 2 grayscale ones in two class folders (labels 0 and 1)."""
    return write_class_photos(tmp_path_factory.mktemp("photos"), 14, grayscale=2)


@pytest.fixture(scope="module")
def tiny_resnet_dir(tmp_path_factory):
    """A 2-stage, 8/16-wide ResNetForImageClassification (5 classes) with a ConvNeXt-style preprocessor config."""
    import torch
    from transformers import ConvNextImageProcessor, ResNetConfig, ResNetForImageClassification

    folder = tmp_path_factory.mktemp("tiny-resnet")
    torch.manual_seed(0)
    config = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=5,
                          id2label={i: f"class {i}" for i in range(5)}, label2id={f"class {i}": i for i in range(5)})
    ResNetForImageClassification(config).eval().save_pretrained(folder, safe_serialization=True)
    ConvNextImageProcessor(size={"shortest_edge": 32}, crop_pct=0.875).save_pretrained(folder)
    return folder


def test_export_factory_reopens_with_its_preprocessing(tmp_path, photos):
    family = open_model(FACTORY, family=FAMILY, options=MOBILENET_OPTIONS)
    samples = read_samples(photos, label_field="folder")
    assert family.io.dynamic_axes == {"pixel_values": {0: "batch"}, "logits": {0: "batch"}}
    result = stages.export(family, check_samples=samples[:3], options=ExportSection(), max_length=1, root=tmp_path)
    assert result.metrics["check"]["logits"]["max_abs_diff"] < 1e-4
    artifact = open_model(str(result.folder / "model.onnx"))
    assert artifact.name == FAMILY and artifact.preprocessing.input_shape == (3, 32, 32)
    assert artifact.preprocessing == family.preprocessing  # it travelled in the manifest: no flags downstream
    feed = next(artifact.feeds(samples[:2], batch_size=2))
    assert feed["pixel_values"].shape == (2, 3, 32, 32) and feed["pixel_values"].dtype == np.float32


def test_export_hf_folder_reads_preprocessor_config(tmp_path, photos, tiny_resnet_dir):
    family = open_model(str(tiny_resnet_dir))
    assert family.name == FAMILY and family.preprocessing.resize == 36 and family.preprocessing.crop == 32
    assert family.preprocessing.mean == [0.5, 0.5, 0.5]
    result = stages.export(family, check_samples=read_samples(photos)[:2], options=ExportSection(), max_length=1,
                           root=tmp_path)
    assert {"preprocessor_config.json", "config.json"} <= {p.name for p in result.folder.iterdir()}
    artifact = open_model(str(result.folder / "model.onnx"))
    assert artifact.class_names()[3] == "class 3"
    logits = [{"logits": np.eye(5)[[3]]}]
    from edgepack.calibration_data import ImageSample

    labelled = [ImageSample(tmp_path / "a.png", "class 3"), ImageSample(tmp_path / "b.png", 2)]
    assert artifact.task_metrics(logits, [labelled[0]]) == {"top1_accuracy": 1.0, "top5_accuracy": 1.0}
    assert artifact.task_metrics([{"logits": np.eye(5)[[1]]}], [labelled[1]])["top1_accuracy"] == 0.0


def test_metric_top1_top5_agreement_and_labelled_accuracy(photos):
    family = open_model(FACTORY, family=FAMILY, options=MOBILENET_OPTIONS)
    reference = [{"logits": np.array([[0.1, 2.0, 0.0, 0.5, 0.3, 0.2, 0.1]])},
                 {"logits": np.array([[3.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])}]
    variant = [{"logits": np.array([[0.0, 1.9, 0.1, 0.5, 0.3, 0.2, 0.1]])},
               {"logits": np.array([[0.0, 0.1, 0.2, 5.0, 4.0, 3.0, 2.0]])}]
    metrics = family.fidelity(reference, variant)
    assert metrics["top1_agreement"] == 0.5 and metrics["top5_agreement"] == 0.5
    assert topk_agreement(reference, variant, output="logits", k=7) == 1.0
    samples = read_samples(photos, label_field="folder")[:2]  # labels "0", "0" (sorted: 0/img0, 0/img10)
    outputs = [{"logits": np.eye(10)[[0]]}, {"logits": np.eye(10)[[1]]}]
    assert family.task_metrics(outputs, samples) == {"top1_accuracy": 0.5, "top5_accuracy": 1.0}
    with pytest.raises(BadInputError, match="label 'tabby' is neither a class index nor one of the model's 0"):
        family._class_id("tabby")


def test_metric_dense_outputs_fidelity_and_mask_iou():
    reference = np.zeros((2, 1, 4, 4))
    reference[0, 0, :2] = 0.9  # sample 0: the top half is text
    variant = reference.copy()
    variant[0, 0, 2, :2] = 0.7  # 2 extra pixels above the threshold
    iou = mask_iou(reference, variant, threshold=0.5)
    assert iou.tolist() == [8 / 10, 1.0]  # empty masks agree
    metrics = dense_fidelity([{"prob": reference, "logits": reference - 0.5}],
                             [{"prob": variant, "logits": variant - 0.5}], probability=None, threshold=0.5)
    assert metrics["prob:mask_iou"] == pytest.approx(0.9) and "logits:mask_iou" not in metrics
    assert metrics["mask_iou"] == pytest.approx(0.9) and metrics["prob:cosine_mean"] < 1.0


def test_quantize_through_the_stage_with_the_cnn_recipe(tmp_path, photos):
    family = open_model(FACTORY, family=FAMILY, options=MOBILENET_OPTIONS)
    samples = read_samples(photos)
    exported = stages.export(family, check_samples=samples[:2], options=ExportSection(), max_length=1, root=tmp_path)
    artifact = open_model(str(exported.folder / "model.onnx"))
    result = stages.quantize(exported.folder / "model.onnx", artifact, calibration=samples, options=QuantizeSection(
        max_cosine_drop=0.02, budget_samples=8), max_length=1, padding="longest", root=tmp_path)
    metrics = result.metrics
    assert metrics["plan"]["notes"][0] == "family: cnn (detected)"
    assert metrics["cnn"]["corrected_layers"] == 8 and metrics["normalization"]["opset"]["from"] == 17
    assert metrics["budget"]["met"] and metrics["budget"]["candidates"] == 8  # every Conv / Gemm may fall back
    ops = [n.op_type for n in onnx.load(str(result.folder / "model.onnx")).graph.node]
    assert ops.count("Conv") == 7 and ops.count("DequantizeLinear") > 7  # weights and activations in INT8 and open_model(str(result.folder / "model.onnx")).name == FAMILY


def test_quantize_a_foreign_onnx_as_dense_prediction(tmp_path):
    path = tmp_path / "paddle.onnx"
    onnx.save(paddle_style_segmenter(), path)
    with pytest.raises(BadInputError, match=r"preprocessing gives \[3, 224, 224\] per image .* expects \['3', '32', "
                                            r"'32'\]"):
        open_model(str(path), family=FAMILY, task="dense-prediction", options={"input_name": "x"})
    with pytest.raises(BadInputError, match=r"no input 'pixel_values' \(inputs: x\); set model.input_name"):
        open_model(str(path), family=FAMILY, task="dense-prediction")
    options = {"input_name": "x", "preprocessing": {"resize": 36, "crop": 32}}
    family = open_model(str(path), family=FAMILY, task="dense-prediction", options=options)
    assert open_model(str(path)).name == "onnx"  # a bare ONNX file stays family onnx unless asked
    rng = np.random.default_rng(0)
    samples = [{"x": rng.normal(size=(3, 32, 32)).astype(np.float32)} for _ in range(16)]
    result = stages.quantize(path, family, calibration=samples, options=QuantizeSection(max_cosine_drop=None),
                             max_length=1, padding="longest", folder=tmp_path / "int8")
    norm = result.metrics["normalization"]
    assert norm["opset"] == {"from": 11, "to": 13, "note": None}
    assert norm["batch_norms_folded"] == {"Conv": 2, "ConvTranspose": 1} and norm["pads_fused"] == 1
    import onnxruntime as ort

    fp32 = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    int8 = ort.InferenceSession(str(result.folder / "model.onnx"), providers=["CPUExecutionProvider"])
    reference = [{"prob": fp32.run(None, {"x": s["x"][None]})[0]} for s in samples[:4]]
    got = [{"prob": int8.run(None, {"x": s["x"][None]})[0]} for s in samples[:4]]
    metrics = family.fidelity(reference, got)
    assert metrics["prob:mask_iou"] > 0.9 and metrics["cosine_mean"] > 0.99


def test_bad_inputs_name_the_problem(tmp_path, photos):
    with pytest.raises(BadInputError, match=r"family image-classifier needs images"):
        from edgepack.calibration_data import TextSample

        list(open_model(FACTORY, family=FAMILY, options=MOBILENET_OPTIONS).feeds([TextSample("a cat")]))
    family = open_model(FACTORY, family=FAMILY, options=MOBILENET_OPTIONS)
    with pytest.raises(BadInputError, match=r"sample 0 has shape \[3, 24, 24\], the model's preprocessing gives "
                                            r"\[3, 32, 32\]"):
        list(family.feeds([{"pixel_values": np.zeros((3, 24, 24), np.float32)}]))
    gray = [s for s in read_samples(photos) if s.path.name in ("img12.png", "img13.png")]
    feed = next(family.feeds(gray, batch_size=2))  # grayscale into an RGB model: the channel is repeated
    assert feed["pixel_values"].shape == (2, 3, 32, 32)
    assert np.allclose(feed["pixel_values"][0, 0] * 0.229 + 0.485, feed["pixel_values"][0, 1] * 0.224 + 0.456,
                       atol=1e-5)
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["ResNetForImageClassification"]}))
    with pytest.raises(BadInputError, match="no \\*.safetensors weights"):
        open_model(str(tmp_path))


def test_quantize_and_validate_commands_take_an_image_folder(tmp_path, photos, capsys):
    from edgepack.cli import main

    family = open_model(FACTORY, family=FAMILY, options=MOBILENET_OPTIONS)
    exported = stages.export(family, check_samples=read_samples(photos)[:2], options=ExportSection(), max_length=1,
                             folder=tmp_path / "fp32")
    model = exported.folder / "model.onnx"
    assert main(["quantize", str(model), "--calibration", str(photos), "--out", str(tmp_path / "int8"),
                 "--max-cosine-drop", "-1"]) == 0
    assert "next: edgepack validate" in capsys.readouterr().out
    assert main(["validate", str(tmp_path / "int8" / "model.onnx"), "--reference", str(model), "--data", str(photos),
                 "--label-field", "folder", "--runs", "2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    metrics = report["variants"]["model"]["providers"]["cpu"]["metrics"]
    assert {"top1_agreement", "top5_agreement", "top1_accuracy", "top5_accuracy"} <= set(metrics)
    assert main(["quantize", str(model), "--calibration", str(tmp_path / "nothing"), "--out", str(tmp_path / "x")]) == 2
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["quantize", str(model), "--calibration", str(empty), "--out", str(tmp_path / "y")]) == 2
    assert "empty: no images (the folder is empty)" in capsys.readouterr().err


def test_export_with_preprocessing_the_module_cannot_take_shows_the_shape(tmp_path, photos):
    gray = {"preprocessing": {"crop": 24, "channels": 1, "mean": 0.5, "std": 0.5}}  # a 1-channel spec, an RGB model
    family = open_model("tests.tiny_models:make_cnn", family=FAMILY, options=gray)
    samples = read_samples(photos)[:1]
    with pytest.raises(BadInputError, match=r"cannot take the preprocessed image shape \[1, 1, 24, 24\] \(.*channels"):
        stages.export(family, check_samples=samples, options=ExportSection(), max_length=1, root=tmp_path)


def test_readme_cli_chain_on_an_hf_folder(tmp_path, photos, tiny_resnet_dir, capsys):
    """The README's image-classifier lines as written: export an HF folder with an image folder, quantize with the
    folder, validate with folder labels (no preprocessing flags: they travel in the manifest)."""
    from edgepack.cli import main

    exported, int8 = tmp_path / "exported", tmp_path / "int8"
    assert main(["export", str(tiny_resnet_dir), "--out", str(exported), "--data", str(photos)]) == 0
    assert main(["quantize", str(exported / "model.onnx"), "--calibration", str(photos), "--out", str(int8),
                 "--max-cosine-drop", "-1"]) == 0
    capsys.readouterr()
    assert main(["validate", str(int8 / "model.onnx"), "--reference", str(exported / "model.onnx"), "--data",
                 str(photos), "--label-field", "folder", "--runs", "2", "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)["variants"]["model"]["providers"]["cpu"]["metrics"]
    assert metrics["top1_agreement"] >= 0.75 and 0.0 <= metrics["top1_accuracy"] <= 1.0
