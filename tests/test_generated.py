"""Data-free measurement: inputs generated from the model's signature (per dtype), shape overrides, every family,
ONNX files from other tools, and ONNX Runtime kept quiet unless --debug."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, numpy_helper
from onnx import helper as oh

from edgepack import stages
from edgepack.cli import main
from edgepack.errors import BadInputError
from edgepack.families import TensorSpec, open_model
from edgepack.families.generated import (
    InputSizes,
    embedding_rows,
    generate_inputs,
    generated_array,
    parse_dim_overrides,
    parse_shape_overrides,
    resolve_shapes,
)
from edgepack.recipe import ExportSection
from edgepack.runtime.harness import NO_REFERENCE_DATA
from tests.tiny_models import CNN_OPTIONS


def foreign_encoder(path: Path, *, ids_dtype: int = TensorProto.INT64, unused: bool = True) -> Path:
    """A BERT-like graph as another exporter writes it: ids -> Gather(embedding 1000 x 8) (through a Cast when the
    ids are int32), masked mean over the sequence; an unused initializer, which ONNX Runtime warns about."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((1000, 8)).astype(np.float32), "embeddings"),
             numpy_helper.from_array(np.array([1], dtype=np.int64), "axis")]
    if unused:
        inits.append(numpy_helper.from_array(np.zeros(4, np.float32), "left_over_by_the_exporter"))
    nodes = []
    ids = "input_ids"
    if ids_dtype != TensorProto.INT64:
        nodes.append(oh.make_node("Cast", ["input_ids"], ["ids64"], to=TensorProto.INT64))
        ids = "ids64"
    nodes += [oh.make_node("Gather", ["embeddings", ids], ["tokens"]),  # (B, T, 8)
              oh.make_node("Cast", ["attention_mask"], ["maskf"], to=TensorProto.FLOAT),
              oh.make_node("Unsqueeze", ["maskf", "axis2"], ["mask3"]),
              oh.make_node("Mul", ["tokens", "mask3"], ["masked"]),
              oh.make_node("ReduceMean", ["masked", "axis"], ["pooled"], keepdims=0)]  # (B, 8)
    inits.append(numpy_helper.from_array(np.array([2], dtype=np.int64), "axis2"))
    graph = oh.make_graph(nodes, "encoder", [
        oh.make_tensor_value_info("input_ids", ids_dtype, ["batch_size", "sequence_length"]),
        oh.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch_size", "sequence_length"])],
        [oh.make_tensor_value_info("pooled", TensorProto.FLOAT, ["batch_size", 8])], inits)
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.save(model, path)
    return path


def test_every_dtype_gets_values_of_its_kind():
    rng = np.random.default_rng(0)

    def make(name: str, dtype: str, shape: tuple[int, ...], vocab: int | None = 50) -> tuple[np.ndarray, str]:
        return generated_array(TensorSpec(name, shape, dtype), shape, rng, vocab_size=vocab)

    ids, how = make("input_ids", "int64", (2, 64))
    assert ids.dtype == np.int64 and ids.min() >= 0 and ids.max() < 50 and len(np.unique(ids)) > 20
    assert how == "token ids uniform in [0, 50)"
    ids32, _ = make("input_ids", "int32", (1, 16), vocab=7)
    assert ids32.dtype == np.int32 and ids32.max() < 7
    mask, how = make("attention_mask", "int64", (1, 16))
    assert (mask == 1).all() and "ones" in how
    assert (make("token_type_ids", "int64", (1, 16))[0] == 0).all()
    positions, _ = make("position_ids", "int64", (2, 5))
    assert positions.tolist() == [[0, 1, 2, 3, 4]] * 2
    flags, _ = make("keep", "bool", (3,))
    assert flags.dtype == np.bool_ and flags.all()
    image, how = make("pixel_values", "float16", (1, 3, 32, 32))
    assert image.dtype == np.float16 and image.min() > -2.2 and image.max() < 2.7 and image.std() > 0.4
    assert "range [-2.12, 2.64]" in how
    nhwc, _ = make("images", "float32", (1, 24, 24, 3))
    assert nhwc.shape == (1, 24, 24, 3) and nhwc.min() > -2.2
    pixels, how = make("image", "uint8", (1, 3, 16, 16))
    assert pixels.dtype == np.uint8 and pixels.max() > 200 and how == "pixels uniform in [0, 255]"
    features, how = make("x", "float32", (4, 8))
    assert how == "standard normal" and abs(features.mean()) < 0.5
    fmask, _ = make("attention_mask", "float32", (1, 8))
    assert (fmask == 1).all()
    unknown, how = make("input_ids", "int64", (1, 8), vocab=None)
    assert unknown.max() < 2 and "no vocabulary found" in how
    with pytest.raises(BadInputError, match="input 'text' is of type object"):
        make("text", "object", (1,))


def test_symbolic_dims_defaults_and_overrides():
    inputs = [TensorSpec("input_ids", ("batch_size", "sequence_length"), "int64"),
              TensorSpec("pixel_values", ("batch", 3, "height", "width"))]
    sizes = InputSizes(dims={"height": 64, "width": 48}, sequence_length=32)
    assert resolve_shapes(inputs, sizes) == {"input_ids": (1, 32), "pixel_values": (1, 3, 64, 48)}
    sizes = InputSizes(shapes={"pixel_values": (2, 3, 8, 8)}, dims={"batch_size": 4})
    assert resolve_shapes(inputs, sizes) == {"input_ids": (4, 128), "pixel_values": (2, 3, 8, 8)}
    with pytest.raises(BadInputError, match=r"dim 2 'height'; give --dim height=N or --shape pixel_values=Nx3xNxN"):
        resolve_shapes(inputs, InputSizes())
    with pytest.raises(BadInputError, match=r"no input 'pixel_value' \(did you mean 'pixel_values'\?\)"):
        resolve_shapes(inputs, InputSizes(shapes={"pixel_value": (1, 3, 8, 8)}))
    with pytest.raises(BadInputError, match=r"no input has a dim named 'sequence' .*symbolic dims: batch, "
                                            "batch_size, height, sequence_length, width"):
        resolve_shapes(inputs, InputSizes(dims={"sequence": 9, "height": 8, "width": 8}))
    with pytest.raises(BadInputError, match="the input has rank 4"):
        resolve_shapes(inputs, InputSizes(shapes={"pixel_values": (3, 8, 8)}))
    with pytest.raises(BadInputError, match="dim 1 is fixed to 3 in the model, not 4"):
        resolve_shapes(inputs, InputSizes(shapes={"pixel_values": (1, 4, 8, 8)}))
    assert parse_dim_overrides("batch=2, sequence=64") == {"batch": 2, "sequence": 64}
    assert parse_shape_overrides(["x=1x8"]) == {"x": (1, 8)}
    for bad in ("batch", "batch=0", "=3"):
        with pytest.raises(BadInputError, match="--dim"):
            parse_dim_overrides(bad)
    with pytest.raises(BadInputError, match="--shape 'x=1xa'"):
        parse_shape_overrides(["x=1xa"])


def test_foreign_onnx_ids_stay_in_its_embedding_table(tmp_path):
    for dtype in (TensorProto.INT64, TensorProto.INT32):
        model = foreign_encoder(tmp_path / f"m{dtype}.onnx", ids_dtype=dtype)
        assert embedding_rows(model, "input_ids") == 1000 and embedding_rows(model, "attention_mask") is None
        generated = generate_inputs(model, sizes=InputSizes(sequence_length=16), vocab_size=None)
        ids = generated.feed["input_ids"]
        assert ids.shape == (1, 16) and ids.max() < 1000 and ids.dtype == np.dtype(oh.tensor_dtype_to_np_dtype(dtype))
        assert generated.description["input_ids"].endswith("token ids uniform in [0, 1000)")
        assert (generated.feed["attention_mask"] == 1).all()
    # a tokenizer smaller than the table wins (ids must be real tokens), a larger one cannot leave the table
    assert generate_inputs(model, sizes=InputSizes(), vocab_size=300).feed["input_ids"].max() < 300
    assert "[0, 1000)" in generate_inputs(model, sizes=InputSizes(), vocab_size=5000).description["input_ids"]


def test_validate_without_data_on_a_foreign_onnx_is_quiet_and_says_no_reference_data(capfd, tmp_path):
    model = foreign_encoder(tmp_path / "other-tool.onnx")
    out = tmp_path / "out"
    code = main(["validate", str(model), "--ep", "cpu", "--runs", "5", "--dim", "sequence_length=32", "--out",
                 str(out)])
    captured = capfd.readouterr()
    assert code == 0, captured.err
    assert "graph.cc" not in captured.err and "Removing initializer" not in captured.err  # ORT quiet by default
    assert "no --data: input_ids int64 [1, 32]: token ids uniform in [0, 1000)" in captured.err
    report = json.loads((out / "report.json").read_text())
    row = report["variants"]["model"]["providers"]["cpu"]
    assert row["status"] == "ok" and row["latency_ms"]["p50"] > 0 and row["memory_mb"]["peak"] > 0
    assert row["coverage"]["nodes_on_ep"] == row["coverage"]["nodes_total"] > 0
    assert row["metrics"] == {} and row["fidelity_note"] == NO_REFERENCE_DATA
    assert row["latency_ms"]["shape"] == {"input_ids": [1, 32], "attention_mask": [1, 32]}
    assert report["data"]["generated"]["attention_mask"].startswith("int64 [1, 32]: ones")
    assert report["device"]["label"] == "local" and report["device"]["int8_isa"]
    assert "no reference data" in (out / "report.md").read_text()
    # --debug lets ONNX Runtime's warnings through again, for every session the process creates
    import onnxruntime as ort

    from edgepack.runtime.quiet import set_ort_logging

    for debug in (False, True):
        set_ort_logging(debug=debug)
        ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
        assert ("Removing initializer" in capfd.readouterr().err) == debug
    set_ort_logging(debug=False)


def test_shape_flags_are_checked_against_the_model(capsys, tmp_path):
    model = foreign_encoder(tmp_path / "m.onnx")
    code = main(["validate", str(model), "--shape", "input_id=1x8", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "no input 'input_id' (did you mean 'input_ids'?)" in err
    code = main(["validate", str(model), "--dim", "seq=8", "--out", str(tmp_path / "out")])
    assert code == 2 and "no input has a dim named 'seq'" in capsys.readouterr().err
    code = main(["validate", str(model), "--data", "x.npz", "--dim", "batch_size=1"])
    assert code == 2 and "--shape / --dim size generated inputs" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def _export(family, folder: Path, samples) -> Path:
    return stages.export(family, check_samples=samples, options=ExportSection(), max_length=16,
                         folder=folder).folder / "model.onnx"


def test_every_family_validates_without_data(tmp_path, capsys, tiny_bert_dir, tiny_classifier_dir, small_sentences):
    from edgepack.calibration_data import read_samples

    texts = read_samples(small_sentences)[:2]
    images = [{"pixel_values": np.zeros((3, 16, 16), np.float32)}]
    models = {
        "sentence-encoder": _export(open_model(str(tiny_bert_dir)), tmp_path / "se", texts),
        "sequence-classifier": _export(open_model(str(tiny_classifier_dir)), tmp_path / "sc", texts),
        "torch-module": _export(open_model("tests.tiny_models:make_cnn", options=CNN_OPTIONS), tmp_path / "tm",
                                images),
        "onnx": foreign_encoder(tmp_path / "foreign.onnx"),
    }
    for family, model in models.items():
        opened = open_model(str(model))
        assert opened.name == family
        generated = opened.generated_inputs(model, sizes=InputSizes(sequence_length=16))
        if family in ("sentence-encoder", "sequence-classifier"):
            assert opened.vocab_size() == 30522 and generated.feed["input_ids"].max() < 30522
        out = tmp_path / f"out-{family}"
        code = main(["validate", str(model), "--runs", "3", "--sequence-length", "16", "--out", str(out)])
        assert code == 0, capsys.readouterr().err
        row = json.loads((out / "report.json").read_text())["variants"]["model"]["providers"]["cpu"]
        assert row["status"] == "ok" and row["fidelity_note"] == NO_REFERENCE_DATA, (family, row)
        assert row["latency_ms"]["p50"] > 0 and row["coverage"]["nodes_total"] > 0
