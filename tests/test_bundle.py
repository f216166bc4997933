"""edgepack bundle / verify: .ort + operator config + aligned C array + golden vectors, on tiny real models.

The C array goes through a real compiler (gcc) and the bytes a real program reads back are compared with
model.ort; the operator config is compared with the graph ONNX Runtime really runs; a full disk is a real
RLIMIT_FSIZE in a subprocess.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, numpy_helper
from onnx import helper as oh

from edgepack.cli import main
from edgepack.errors import BadInputError
from edgepack.exporters.bundle import BundleOptions, make_bundle, parse_fixed_shapes
from edgepack.exporters.c_sources import c_array_lines
from edgepack.exporters.ort_format import read_operator_config
from edgepack.exporters.verify import verify_bundle
from edgepack.runtime.providers import get_provider

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------ tiny models


def _save(graph: onnx.GraphProto, path: Path, *, opsets: list | None = None) -> Path:
    model = oh.make_model(graph, opset_imports=opsets or [oh.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def make_conv_model(path: Path) -> Path:
    """Conv -> Relu -> mean over (H, W) -> MatMul: x (batch, 3, h, 8) -> y (batch, 4). ORT fuses Conv+Relu."""
    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "W"),
               numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "B"),
               numpy_helper.from_array(rng.standard_normal((8, 4)).astype(np.float32), "M")]
    nodes = [oh.make_node("Conv", ["x", "W", "B"], ["c"], pads=[1, 1, 1, 1]),  # (batch, 8, h, 8)
             oh.make_node("Relu", ["c"], ["r"]),
             oh.make_node("ReduceMean", ["r"], ["p"], axes=[2, 3], keepdims=0),  # (batch, 8)
             oh.make_node("MatMul", ["p", "M"], ["y"])]  # (batch, 4)
    graph = oh.make_graph(nodes, "conv", [oh.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, "h", 8])],
                          [oh.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])], weights)
    return _save(graph, path)


def make_qdq_model(path: Path) -> Path:
    """MatMul + Add, static INT8 QDQ by onnxruntime.quantization: x -> QuantizeLinear ... DequantizeLinear -> y."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    rng = np.random.default_rng(1)
    weights = [numpy_helper.from_array(rng.standard_normal((6, 4)).astype(np.float32), "W"),
               numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "B")]
    nodes = [oh.make_node("MatMul", ["x", "W"], ["mm"]), oh.make_node("Add", ["mm", "B"], ["y"])]
    graph = oh.make_graph(nodes, "linear", [oh.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 6])],
                          [oh.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])], weights)
    fp32 = _save(graph, path.with_name("linear_fp32.onnx"))

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.feeds = iter([{"x": rng.standard_normal((1, 6)).astype(np.float32)} for _ in range(16)])

        def get_next(self) -> dict | None:
            return next(self.feeds, None)

    quantize_static(str(fp32), str(path), Reader(), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return path


def conv_feeds(n: int = 3, *, h: int = 8) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(2)
    return [{"x": rng.standard_normal((1, 3, h, 8)).astype(np.float32)} for _ in range(n)]


def qdq_feeds(n: int = 3) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(3)
    return [{"x": rng.standard_normal((1, 6)).astype(np.float32)} for _ in range(n)]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("models")
    return {"conv": make_conv_model(folder / "conv.onnx"), "qdq": make_qdq_model(folder / "qdq.onnx")}


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, models: dict[str, Path]) -> Path:
    """A bundle of the conv model with a fixed-shape variant; tests copy it before changing anything."""
    out = tmp_path_factory.mktemp("bundles") / "conv"
    make_bundle(models["conv"], out, feeds=conv_feeds(),
                options=BundleOptions(fixed_shapes={"batch": 1, "h": 8}))
    return out


@pytest.fixture
def bundle(built: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "bundle"
    shutil.copytree(built, copy)
    return copy


def manifest_of(folder: Path) -> dict:
    """The bundle's description (bundle.json: what the bundle is; manifest.json is the stage runner's)."""
    return json.loads((folder / "bundle.json").read_text())


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------------------------------------ C array


C_DUMP = r"""
#include <stdint.h>
#include <stdio.h>
#include "model_data.h"

int main(int argc, char **argv) {
    FILE *out = argc > 1 ? fopen(argv[1], "wb") : NULL;
    if (!out || fwrite(tiny_net_data, 1, tiny_net_size, out) != tiny_net_size) return 1;
    fclose(out);
    printf("%lu %lu %d %s\n", (unsigned long)((uintptr_t)tiny_net_data % TINY_NET_ALIGNMENT),
           (unsigned long)tiny_net_size, TINY_NET_ALIGNMENT, tiny_net_sha256);
    return 0;
}
"""


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")
@pytest.mark.parametrize("std", ["c99", "c11"])
def test_c_array_compiles_and_holds_the_ort_bytes_aligned(models, tmp_path, std):
    out = tmp_path / "bundle"
    make_bundle(models["qdq"], out, feeds=qdq_feeds(1),
                options=BundleOptions(alignment=4096, symbol_prefix="tiny_net"))
    (tmp_path / "dump.c").write_text(C_DUMP)
    exe = tmp_path / "dump"
    # c99 takes the __attribute__((aligned)) branch, c11 _Alignas; -pedantic -Werror keeps both strictly valid.
    compile_ = subprocess.run(["gcc", f"-std={std}", "-Wall", "-Wextra", "-pedantic", "-Werror", f"-I{out}", "-o",
                               str(exe), str(tmp_path / "dump.c"), str(out / "model_data.c")], capture_output=True, text=True)
    assert compile_.returncode == 0, compile_.stderr
    run = subprocess.run([str(exe), str(tmp_path / "embedded.bin")], check=True, capture_output=True, text=True)
    misalignment, size, alignment, digest = run.stdout.split()
    ort_bytes = (out / "model.ort").read_bytes()
    assert (tmp_path / "embedded.bin").read_bytes() == ort_bytes
    assert (int(misalignment), int(size), int(alignment)) == (0, len(ort_bytes), 4096)
    assert digest == hashlib.sha256(ort_bytes).hexdigest() == manifest_of(out)["variants"]["default"]["c_array"]["sha256"]
    # the session the integration guide creates from those bytes, reading them in place, gives the golden output
    options = ort.SessionOptions()
    for key in ("session.use_ort_model_bytes_directly", "session.use_ort_model_bytes_for_initializers"):
        options.add_session_config_entry(key, "1")
    session = ort.InferenceSession((tmp_path / "embedded.bin").read_bytes(), options, providers=["CPUExecutionProvider"])
    vector = out / "test_data_set_0"
    golden = numpy_helper.to_array(onnx.load_tensor(str(vector / "output_0.pb")))
    x = numpy_helper.to_array(onnx.load_tensor(str(vector / "input_0.pb")))
    np.testing.assert_array_equal(session.run(["y"], {"x": x})[0], golden)


@pytest.mark.parametrize("size", [0, 1, 15, 16, 17, 47, 48, 1000])
def test_c_array_lines_round_trip_across_chunk_and_line_ends(size):
    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
    text = b"".join(c_array_lines(data, per_line=16, chunk_bytes=40)).decode()  # 40 -> 32: chunks end mid-way
    assert all(line.startswith("  0x") and len(line) <= 2 + 16 * 5 for line in text.splitlines())
    assert bytes(int(cell, 16) for cell in text.replace("\n", "").replace(" ", "").split(",") if cell) == data


@pytest.mark.skipif(shutil.which("cmake") is None or shutil.which("gcc") is None, reason="needs cmake and gcc")
def test_cmake_snippet_adds_the_model_to_a_target(built, tmp_path):
    project = tmp_path / "app"
    project.mkdir()
    (project / "main.c").write_text('#include <stdio.h>\n#include "model_data.h"\n'
                                    'int main(void) { printf("%lu %s\\n", (unsigned long)edgepack_model_size, '
                                    "edgepack_model_sha256); return 0; }\n")
    (project / "CMakeLists.txt").write_text(f"cmake_minimum_required(VERSION 3.16)\nproject(app LANGUAGES C)\n"
                                            f"include({built.as_posix()}/CMakeLists.snippet.cmake)\n"
                                            "add_executable(app main.c)\nedgepack_model_add_to_target(app)\n")
    build = tmp_path / "build"
    subprocess.run(["cmake", "-S", str(project), "-B", str(build)], check=True, capture_output=True)
    subprocess.run(["cmake", "--build", str(build)], check=True, capture_output=True)
    size, digest = subprocess.run([str(build / "app")], check=True, capture_output=True, text=True).stdout.split()
    assert int(size) == (built / "model.ort").stat().st_size and digest == sha256(built / "model.ort")


# ------------------------------------------------------------------------------------------------ verify


def test_verify_passes_on_a_fresh_bundle(built):
    result = verify_bundle(built)
    assert result.passed and result.mismatches == [] and result.provider == "cpu"
    assert result.vectors == 6  # 3 feeds x (dynamic + fixed-shape variant)


def test_verify_flags_a_tampered_vector_by_its_sha256(bundle):
    pb = bundle / "test_data_set_1" / "output_0.pb"
    golden = numpy_helper.to_array(onnx.load_tensor(str(pb)))
    pb.write_bytes(numpy_helper.from_array(golden + 1.0, "y").SerializeToString())
    result = verify_bundle(bundle)
    assert not result.passed and result.vectors == 0
    assert result.mismatches == [result.mismatches[0]]
    assert result.mismatches[0].startswith("test_data_set_1/output_0.pb: sha256 mismatch (manifest ")
    assert result.mismatches[0].endswith("the bundle was modified — rebuild it with edgepack bundle")


def test_verify_flags_a_tampered_model(bundle):
    model = bundle / "fixed" / "model.ort"
    data = bytearray(model.read_bytes())
    data[-20] ^= 0xFF
    model.write_bytes(bytes(data))
    result = verify_bundle(bundle)
    assert not result.passed
    assert [m.split(":")[0] for m in result.mismatches] == ["fixed/model.ort"]


def test_verify_names_the_output_beyond_tolerance_when_the_hash_was_updated(bundle, capsys):
    pb = bundle / "test_data_set_2" / "output_0.pb"
    golden = numpy_helper.to_array(onnx.load_tensor(str(pb)))
    manifest = manifest_of(bundle)
    atol = manifest["variants"]["default"]["golden"]["tolerances"]["y"]["atol"]
    changed = golden.copy()
    changed[0, 1] += 3 * atol  # (1, 4): one element moves by three tolerances
    pb.write_bytes(numpy_helper.from_array(changed, "y").SerializeToString())
    manifest["files"]["test_data_set_2/output_0.pb"]["sha256"] = sha256(pb)
    (bundle / "bundle.json").write_text(json.dumps(manifest))
    result = verify_bundle(bundle)
    assert not result.passed and result.vectors == 6
    assert len(result.mismatches) == 1
    assert result.mismatches[0].startswith("test_data_set_2: output 'y' max |error| ")
    assert f"> atol {atol:.3g}" in result.mismatches[0]
    # the CLI turns it into exit 3 naming the first mismatch and the count, on one line
    assert main(["verify", str(bundle)]) == 3
    error = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "test_data_set_2: output 'y'" in error[0] and "(1 mismatch(es) in total)" in error[0]


def test_verify_refuses_a_folder_that_is_not_a_bundle_and_a_missing_ep(built, tmp_path):
    with pytest.raises(BadInputError, match="no bundle.json; this is not an edgepack bundle"):
        verify_bundle(tmp_path)
    if get_provider("qnn-htp").availability() is not None:  # QNN built in, or the onnxruntime_qnn plugin, runs
        with pytest.raises(BadInputError, match="--ep qnn-htp: "):
            verify_bundle(built, provider="qnn-htp")


# ------------------------------------------------------------------------------------------------ contents


def _ops_of_graph_as_ort_runs_it(ort_model: Path, saved: Path, *, replay: bool) -> set[tuple[str, str]]:
    """Load the .ort with ONNX Runtime (full optimization level, as an app would) and save the graph it runs."""
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(saved)
    options.log_severity_level = 3
    if replay:
        options.add_session_config_entry("session.enable_saved_runtime_optimizations", "1")
    ort.InferenceSession(str(ort_model), options, providers=["CPUExecutionProvider"])
    graph = onnx.load(str(saved)).graph
    return {(node.domain or "ai.onnx", node.op_type) for node in graph.node}


@pytest.mark.parametrize(("name", "style", "fused"), [("conv", "Fixed", ("com.microsoft", "FusedConv")),
                                                       ("conv", "Runtime", ("com.microsoft", "FusedConv")),
                                                       ("qdq", "Fixed", ("ai.onnx", "QLinearMatMul"))])
def test_operator_config_lists_every_op_of_the_optimized_graph(models, tmp_path, name, style, fused):
    feeds = conv_feeds(1) if name == "conv" else qdq_feeds(1)
    out = tmp_path / "bundle"
    make_bundle(models[name], out, feeds=feeds, options=BundleOptions(optimization_style=style))
    manifest = manifest_of(out)
    config = read_operator_config(out / "required_operators_and_types.config")  # ORT's own parser
    listed = {(domain, op) for domain, ops in config.items() for op in ops}
    running = _ops_of_graph_as_ort_runs_it(out / "model.ort", tmp_path / "as_run.onnx", replay=style == "Runtime")
    source = {(n.domain or "ai.onnx", n.op_type) for n in onnx.load(str(models[name])).graph.node}
    assert running <= listed
    if style == "Fixed":
        assert listed == running  # exactly the optimized graph
    else:  # Runtime: also the ops of the graph without replay (Conv, Relu), since replay may not happen
        assert {("ai.onnx", "Conv"), ("ai.onnx", "Relu")} <= listed
    # the point of deriving it from the .ort: a fused op the source graph does not have (onnxruntime #23018)
    assert fused in listed and fused not in source
    assert manifest["variants"]["default"]["operators"] == {d: sorted(ops) for d, ops in sorted(config.items())}


def test_manifest_records_io_quantization_opset_and_every_file(models, tmp_path):
    out = tmp_path / "bundle"
    result = make_bundle(models["qdq"], out, feeds=qdq_feeds(), validated={"cpu": {"how": "device"}})
    manifest = manifest_of(out)
    assert result.folder == out and result.manifest["stage"] == "bundle" and not result.reused
    assert make_bundle(models["qdq"], out, feeds=qdq_feeds(), validated={"cpu": {"how": "device"}}).reused
    assert manifest["kind"] == "edgepack-bundle" and manifest["quantized"] is True
    assert manifest["opset"]["ai.onnx"] >= 17 and manifest["onnxruntime_version"] == ort.__version__
    assert manifest["validated"] == {"cpu": {"how": "device"}}
    init = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(models["qdq"])).graph.initializer}
    variant = manifest["variants"]["default"]
    (x,), (y,) = variant["inputs"], variant["outputs"]
    assert (x["name"], x["dtype"], x["shape"]) == ("x", "float32", ["batch", 6])
    assert x["quantization"]["node"] == "QuantizeLinear"
    assert x["quantization"]["scale"] == pytest.approx(float(init["x_scale"]))
    assert x["quantization"]["zero_point"] == int(init["x_zero_point"]) and x["quantization"]["zero_point_dtype"] == "uint8"
    assert y["quantization"]["node"] == "DequantizeLinear"
    assert y["quantization"]["scale"] == pytest.approx(float(init["y_scale"]))
    assert variant["golden"]["tolerances"]["y"]["atol"] >= 2 * float(init["y_scale"])  # two output steps
    on_disk = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()} - {"manifest.json", "bundle.json"}
    assert set(manifest["files"]) == on_disk
    for name, entry in manifest["files"].items():
        assert entry == {"sha256": sha256(out / name), "size_bytes": (out / name).stat().st_size}
    assert {"model.ort", "model_data.h", "model_data.c", "CMakeLists.snippet.cmake",
            "required_operators_and_types.config", "test_data_set_2/input_0.pb", "test_data_set_2/output_0.pb"} <= on_disk


def test_golden_vectors_are_onnx_test_layout_and_match_the_source_model(models, built):
    manifest = manifest_of(built)
    session = ort.InferenceSession(str(models["conv"]), providers=["CPUExecutionProvider"])
    atol = manifest["variants"]["default"]["golden"]["tolerances"]["y"]["atol"]
    assert atol == pytest.approx(max(1e-5, 1e-4 * max(
        float(np.abs(numpy_helper.to_array(onnx.load_tensor(str(built / v / "output_0.pb")))).max())
        for v in manifest["variants"]["default"]["golden"]["vectors"])))
    for index, feed in enumerate(conv_feeds()):
        x = onnx.load_tensor(str(built / f"test_data_set_{index}" / "input_0.pb"))
        y = onnx.load_tensor(str(built / f"test_data_set_{index}" / "output_0.pb"))
        assert (x.name, y.name) == ("x", "y")
        np.testing.assert_array_equal(numpy_helper.to_array(x), feed["x"])
        # the .ort (fused, optimized) agrees with the plain .onnx well within the stated tolerance
        np.testing.assert_allclose(numpy_helper.to_array(y), session.run(["y"], feed)[0], rtol=0, atol=atol / 10)


# ------------------------------------------------------------------------------------------------ fixed shapes


def test_fixed_variant_has_no_symbolic_dims_and_validates(built):
    fixed = manifest_of(built)["variants"]["fixed"]
    assert fixed["fixed_shapes"] == {"batch": 1, "h": 8}
    assert [v["shape"] for v in fixed["inputs"]] == [[1, 3, 8, 8]] and [v["shape"] for v in fixed["outputs"]] == [[1, 4]]
    session = ort.InferenceSession(str(built / "fixed" / "model.ort"), providers=["CPUExecutionProvider"])
    assert all(isinstance(d, int) for v in session.get_inputs() + session.get_outputs() for d in v.shape)
    assert fixed["agreement"]["max_abs_diff"]["y"] <= fixed["golden"]["tolerances"]["y"]["atol"]
    assert fixed["c_array"]["symbols"]["data"] == "edgepack_model_fixed_data"
    assert "edgepack_model_fixed_data[EDGEPACK_MODEL_FIXED_SIZE]" in (built / "fixed" / "model_data.h").read_text()


def test_a_dim_left_dynamic_is_bad_input(models, tmp_path):
    with pytest.raises(BadInputError) as err:
        make_bundle(models["conv"], tmp_path / "b", feeds=conv_feeds(1), options=BundleOptions(fixed_shapes={"batch": 1}))
    assert "input 'x' dim 2 ('h') is still dynamic" in str(err.value) and "add h=N" in str(err.value)
    with pytest.raises(BadInputError, match=r"'bach=1' names no symbolic dim .*did you mean 'batch'"):
        make_bundle(models["conv"], tmp_path / "b", feeds=conv_feeds(1), options=BundleOptions(fixed_shapes={"bach": 1}))
    assert not (tmp_path / "b").exists()


def test_a_feed_off_the_fixed_shape_is_bad_input(models, tmp_path):
    with pytest.raises(BadInputError) as err:
        make_bundle(models["conv"], tmp_path / "b", feeds=conv_feeds(2, h=12),
                    options=BundleOptions(fixed_shapes={"batch": 1, "h": 8}))
    assert "feed 0: input 'x' has shape (1, 3, 12, 8) but the fixed shape is (1, 3, 8, 8)" in str(err.value)


# ------------------------------------------------------------------------------------------------ bad input


def test_foreign_out_folder_is_refused_unless_forced(models, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(BadInputError, match="exists and is not an edgepack artifact folder.*--force"):
        make_bundle(models["conv"], out, feeds=conv_feeds(1))
    assert (out / "notes.txt").read_text() == "keep me"
    make_bundle(models["conv"], out, feeds=conv_feeds(1), force=True)
    assert not (out / "notes.txt").exists() and manifest_of(out)["kind"] == "edgepack-bundle"
    make_bundle(models["qdq"], out, feeds=qdq_feeds(1))  # an existing bundle is simply rebuilt
    assert manifest_of(out)["quantized"] is True
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # no temporary folders left beside it


def test_an_operator_ort_cannot_convert_is_named(tmp_path):
    graph = oh.make_graph([oh.make_node("Foo", ["x"], ["y"], domain="com.example")], "custom",
                          [oh.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
                          [oh.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])])
    model = _save(graph, tmp_path / "custom.onnx", opsets=[oh.make_opsetid("", 17), oh.make_opsetid("com.example", 1)])
    with pytest.raises(BadInputError) as err:
        make_bundle(model, tmp_path / "b", feeds=[{"x": np.zeros((1, 3), np.float32)}])
    assert "custom.onnx: ONNX Runtime cannot convert the model to ORT format: operator(s) com.example:Foo" in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["custom.onnx"]


@pytest.mark.parametrize(("options", "message"), [
    ({"alignment": 48}, "power of two"), ({"alignment": 4}, "power of two"),
    ({"symbol_prefix": "9lives"}, "not a C identifier"), ({"optimization_style": "fixed"}, "did you mean 'Fixed'"),
    ({"target_platform": "arm64"}, "not one of arm, amd64"), ({"fixed_shapes": {}}, "fixed_shapes is empty")])
def test_options_are_checked_when_built(options, message):
    with pytest.raises(BadInputError, match=message):
        BundleOptions(**options)


def test_feeds_must_match_the_model_inputs(models, tmp_path):
    with pytest.raises(BadInputError, match="no feeds for the golden vectors"):
        make_bundle(models["conv"], tmp_path / "b", feeds=[])
    with pytest.raises(BadInputError, match=r"feed 0: input 'x' is float64, the model takes float32"):
        make_bundle(models["conv"], tmp_path / "b", feeds=[{"x": np.zeros((1, 3, 8, 8))}])
    with pytest.raises(BadInputError, match="feed 0: 'z' is not a model input"):
        make_bundle(models["conv"], tmp_path / "b", feeds=[conv_feeds(1)[0] | {"z": np.zeros(1)}])


DISK_FULL = """
import resource, signal, sys
from pathlib import Path
import numpy as np
import onnxruntime.tools.convert_onnx_models_to_ort, onnxruntime.tools.reduced_build_config_parser  # noqa: F401
from edgepack.errors import BadInputError
from edgepack.exporters.bundle import make_bundle
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of killing us
limit = int(sys.argv[3])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
try:
    make_bundle(Path(sys.argv[1]), Path(sys.argv[2]), feeds=[{"x": np.ones((1, 3, 8, 8), np.float32)}])
except BadInputError as err:
    print(err)
    sys.exit(2)
"""


def test_a_write_that_fails_midway_leaves_the_old_bundle_untouched(models, built, tmp_path):
    out = tmp_path / "bundle"
    shutil.copytree(built, out)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    limit = (built / "model.ort").stat().st_size + 4096  # model.ort fits, its ~5x larger C array does not
    assert (built / "model_data.c").stat().st_size > limit
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", PYTHONPATH=str(REPO))
    run = subprocess.run([sys.executable, "-c", DISK_FULL, str(models["conv"]), str(out), str(limit)],
                         capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 2, run.stderr
    assert "writing the bundle failed: File too large" in run.stdout
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]  # no .tmp-* / .old-* folder left
    assert verify_bundle(out).passed


# ------------------------------------------------------------------------------------------------ CLI


def test_cli_bundle_from_npz_with_fixed_shape_then_verify(models, tmp_path, capsys):
    rng = np.random.default_rng(4)
    np.savez(tmp_path / "eval.npz", x=rng.standard_normal((5, 3, 8, 8)).astype(np.float32))  # (N, 3, h, 8)
    out = tmp_path / "bundle"
    assert main(["bundle", str(models["conv"]), "--out", str(out), "--data", str(tmp_path / "eval.npz"),
                 "--samples", "2", "--fixed-shape", "batch=1,h=8", "--alignment", "128"]) == 0
    printed = capsys.readouterr().out
    assert "model.ort" in printed and f"next: edgepack verify {out}" in printed
    manifest = manifest_of(out)
    assert manifest["options"]["alignment"] == 128 and len(manifest["variants"]["fixed"]["golden"]["vectors"]) == 2
    assert main(["verify", str(out), "--ep", "cpu"]) == 0
    assert "4 golden vectors within tolerance on cpu" in capsys.readouterr().out


def test_cli_validation_report_is_matched_by_sha256(models, tmp_path, capsys):
    report = {"variants": {"int8": {"sha256": sha256(models["qdq"]), "providers": {
        "cpu": {"status": "ok", "how": "device", "latency_ms": {"p50": 1.0}, "metrics": {"cosine_min": 0.999}}}}}}
    (tmp_path / "report.json").write_text(json.dumps(report))
    np.savez(tmp_path / "eval.npz", x=np.ones((1, 6), np.float32))
    args = ["--out", str(tmp_path / "b"), "--data", str(tmp_path / "eval.npz"), "--validation-report",
            str(tmp_path / "report.json")]
    assert main(["bundle", str(models["qdq"]), *args]) == 0
    validated = manifest_of(tmp_path / "b")["validated"]
    assert validated["variant"] == "int8"
    assert validated["providers"] == {"cpu": {"status": "ok", "how": "device", "metrics": {"cosine_min": 0.999}}}
    assert main(["bundle", str(models["conv"]), *args, "--force"]) == 2
    assert "no variant has the sha256 of" in capsys.readouterr().err


@pytest.mark.parametrize(("text", "message"), [("batch", "is not DIM=N"), ("batch=0", "is not DIM=N"),
                                               ("batch=1,batch=2", "given twice"), ("batch=1,", "is not DIM=N")])
def test_fixed_shape_argument_errors(text, message):
    with pytest.raises(BadInputError, match=message):
        parse_fixed_shapes(text)
    assert parse_fixed_shapes("batch=1, sequence=128") == {"batch": 1, "sequence": 128}


def test_cli_text_data_is_padded_to_the_fixed_sequence(tiny_bert_dir, small_sentences, tmp_path):
    assert main(["export", str(tiny_bert_dir), "--out", str(tmp_path / "exported")]) == 0
    out = tmp_path / "bundle"
    # the exported folder carries its tokenizer: no --tokenizer needed
    assert main(["bundle", str(tmp_path / "exported" / "model.onnx"), "--out", str(out), "--data",
                 str(small_sentences), "--samples", "3", "--fixed-shape", "batch=1,sequence=32"]) == 0
    fixed = manifest_of(out)["variants"]["fixed"]
    assert all(v["shape"] == [1, 32] for v in fixed["inputs"])
    ids = numpy_helper.to_array(onnx.load_tensor(str(out / "fixed" / "test_data_set_0" / "input_0.pb")))
    assert ids.shape == (1, 32) and ids[0, -1] == 0  # padded with [PAD] (id 0) to the fixed length
    assert verify_bundle(out).passed
