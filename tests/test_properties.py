"""Property-based tests (hypothesis): random bytes and random valid-looking files into every reader edgepack has.

The property: a reader returns its result or raises `BadInputError` with one line naming the file, and the CLI
turns that into exit 2 with a message, never a traceback. Runs are derandomized (the same examples every run,
no example database), so the counts in docs/reliability.md are the counts each run tries. Image readers and the
image preprocessing spec are not on this branch (the vision work lands them); they get the same test then.
"""

from __future__ import annotations

import json
import string
import zipfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgepack.calibration_data import TextSample, read_samples, read_split, split_samples
from edgepack.errors import BadInputError
from edgepack.recipe import load_recipe

REPO = Path(__file__).resolve().parents[1]
#: examples per property (x 11 properties below, and 12 through the CLI): the "bad inputs tried" of docs/reliability.md
EXAMPLES = 100
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def _one_line(err: BadInputError, path: Path) -> None:
    message = str(err)
    assert "\n" not in message and message, message
    assert str(path) in message or path.name in message, message


def _read_or_refuse(path: Path, **options: object) -> list:
    try:
        samples = read_samples(path, **options)
    except BadInputError as err:
        _one_line(err, path)
        return []
    assert samples
    return samples


@pytest.fixture()
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("prop")


# ------------------------------------------------------------------------------------------------- random bytes


@SETTINGS
@given(data=st.binary(max_size=2048), suffix=st.sampled_from([".txt", ".jsonl", ".csv", ".npz"]))
def test_random_bytes_in_any_data_format(folder, data, suffix):
    path = folder / f"data{suffix}"
    path.write_bytes(data)
    for sample in _read_or_refuse(path):
        assert isinstance(sample, (TextSample, dict))


@SETTINGS
@given(data=st.binary(max_size=4096))
def test_random_bytes_as_a_recipe(folder, data):
    path = folder / "recipe.yaml"
    path.write_bytes(data)
    try:
        load_recipe(path)
    except BadInputError as err:
        _one_line(err, path)


def _valid_onnx() -> bytes:
    import onnx
    from onnx import TensorProto, numpy_helper
    from onnx import helper as oh

    weight = numpy_helper.from_array(np.arange(16, dtype=np.float32).reshape(4, 4), "W")
    graph = oh.make_graph([oh.make_node("MatMul", ["x", "W"], ["y"], name="mm")], "g",
                          [oh.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
                          [oh.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])], [weight])
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


_ONNX = _valid_onnx()


@SETTINGS
@given(data=st.binary(max_size=4096), cut=st.integers(0, len(_ONNX)), flip=st.integers(0, len(_ONNX) - 1),
       how=st.sampled_from(["random", "truncated", "flipped"]))
def test_random_truncated_and_flipped_onnx_models(folder, data, cut, flip, how):
    from edgepack.onnx_files import load_onnx_checked

    path = folder / "model.onnx"
    if how == "random":
        path.write_bytes(data)
    elif how == "truncated":
        path.write_bytes(_ONNX[:cut])
    else:
        flipped = bytearray(_ONNX)
        flipped[flip] ^= 0xFF
        path.write_bytes(bytes(flipped))
    try:
        load_onnx_checked(path)
    except BadInputError as err:
        _one_line(err, path)


# ---------------------------------------------------------------------------------------- valid-looking files

_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12)
_keys = st.sampled_from(["text", "paraphrase", "label", "txt", "Text", "", "id"]) | st.text(max_size=6)


@SETTINGS
@given(records=st.lists(st.dictionaries(_keys, _json_values, max_size=4) | _json_values, max_size=12),
       blank=st.booleans(), field=st.sampled_from(["text", "label"]),
       pair=st.sampled_from([None, "paraphrase"]), label=st.sampled_from([None, "label"]))
def test_jsonl_of_random_records(folder, records, blank, field, pair, label):
    path = folder / "data.jsonl"
    lines = [json.dumps(r) for r in records]
    path.write_text(("\n\n" if blank else "\n").join(lines) + "\n", encoding="utf-8")
    for sample in _read_or_refuse(path, field=field, pair_field=pair, label_field=label):
        assert isinstance(sample, TextSample) and sample.text.strip() == sample.text and sample.text


_cells = st.text(alphabet=string.printable + "é€\u2028\x85\"", max_size=12)


@SETTINGS
@given(header=st.lists(_cells, max_size=4), rows=st.lists(st.lists(_cells, max_size=5), max_size=8),
       field=st.sampled_from(["text", "a"]), raw=st.booleans())
def test_csv_of_random_rows(folder, header, rows, field, raw):
    import csv
    import io

    path = folder / "data.csv"
    if raw:  # cells joined by hand: broken quoting, ragged rows
        path.write_text("\n".join(",".join(r) for r in [header, *rows]) + "\n", encoding="utf-8")
    else:
        buffer = io.StringIO()
        csv.writer(buffer).writerows([header, *rows])
        path.write_text(buffer.getvalue(), encoding="utf-8")
    for sample in _read_or_refuse(path, field=field):
        assert isinstance(sample, TextSample) and sample.text


@SETTINGS
@given(text=st.text(max_size=400), encoding=st.sampled_from(["utf-8", "utf-8-sig", "utf-16", "latin-1"]))
def test_text_of_random_unicode(folder, text, encoding):
    path = folder / "data.txt"
    try:
        path.write_bytes(text.encode(encoding))
    except UnicodeEncodeError:
        return
    samples = _read_or_refuse(path)
    if encoding.startswith("utf-8"):  # what whole-file splitlines gave, less a byte-order mark
        expected = [line.strip() for line in text.removeprefix("\ufeff").splitlines() if line.strip()]
        assert [s.text for s in samples] == expected


_dtypes = st.sampled_from(["float32", "float64", "int64", "int32", "uint8", "bool", "float16", "complex64", "<U3"])


@SETTINGS
@given(arrays=st.dictionaries(st.text(alphabet=string.ascii_letters + "_", min_size=1, max_size=6),
                              st.tuples(_dtypes, st.lists(st.integers(0, 4), max_size=3)), max_size=3),
       compressed=st.booleans(), corrupt=st.integers(0, 3), offset=st.integers(0, 10_000))
def test_npz_of_random_arrays_and_corruptions(folder, arrays, compressed, corrupt, offset):
    path = folder / "data.npz"
    values = {name: np.zeros(shape, dtype) for name, (dtype, shape) in arrays.items()}
    (np.savez_compressed if compressed else np.savez)(path, **values)
    data = bytearray(path.read_bytes())
    if corrupt == 1 and data:  # a flipped byte
        data[offset % len(data)] ^= 0xFF
    elif corrupt == 2:  # truncated
        data = data[: offset % max(len(data), 1)]
    elif corrupt == 3:  # a member that is not .npy inside a real zip
        with zipfile.ZipFile(path, "a") as archive:
            archive.writestr("extra.npy", bytes(data[: offset % 64]))
        data = bytearray(path.read_bytes())
    path.write_bytes(bytes(data))
    for sample in _read_or_refuse(path):
        assert isinstance(sample, dict)


# ------------------------------------------------------------------------------------------ the split, streamed


@SETTINGS
@given(lines=st.lists(st.sampled_from(["a", "b", "c", "d", "e", "f", "g"]) | st.text(max_size=5), max_size=30),
       n_calibration=st.integers(1, 6), n_evaluation=st.integers(0, 6), seed=st.integers(0, 3))
def test_streamed_split_equals_the_split_of_the_whole_file(folder, lines, n_calibration, n_evaluation, seed):
    path = folder / "data.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    options = {"n_calibration": n_calibration, "n_evaluation": n_evaluation, "seed": seed, "source": str(path)}
    try:
        expected = split_samples(read_samples(path), **options)
    except BadInputError as err:
        with pytest.raises(BadInputError) as raised:
            read_split(path, **options)
        assert str(raised.value) == str(err)
        return
    assert read_split(path, **options) == expected


# ------------------------------------------------------------------------------------------------------ recipes

_base = yaml.safe_load((REPO / "recipes" / "minilm.yaml").read_text())
_scalars = st.none() | st.booleans() | st.integers(-5, 10**6) | st.floats(allow_nan=True) | st.text(max_size=12)
_values = st.recursive(_scalars, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c,
                                                                                      max_size=3), max_leaves=8)


def _paths(tree: object, prefix: tuple = ()) -> list[tuple]:
    if isinstance(tree, dict):
        return [prefix] + [p for k, v in tree.items() for p in _paths(v, (*prefix, k))]
    return [prefix]


@SETTINGS
@given(where=st.sampled_from(_paths(_base)), action=st.sampled_from(["set", "rename", "delete"]), value=_values,
       typo=st.text(alphabet=string.ascii_lowercase + "_", min_size=1, max_size=3))
def test_the_recipe_parser_on_mutations_of_a_real_recipe(folder, where, action, value, typo):
    """recipes/minilm.yaml with one value replaced by anything, one key misspelt or one key dropped."""
    import copy

    recipe = copy.deepcopy(_base)
    node = recipe
    for key in where[:-1]:
        node = node[key]
    if where:
        key = where[-1]
        if action == "set":
            node[key] = value
        elif action == "rename":
            node[key + typo] = node.pop(key)
        else:
            node.pop(key)
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    try:
        load_recipe(path)
    except BadInputError as err:
        _one_line(err, path)


@SETTINGS
@given(tree=st.dictionaries(st.sampled_from(["name", "model", "data", "quantize", "validate", "bundle", "gates",
                                             "distill", "prune", "export", "nope"]), _values, max_size=5))
def test_the_recipe_parser_on_random_trees(folder, tree):
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(tree))
    try:
        load_recipe(path)
    except BadInputError as err:
        _one_line(err, path)


# ---------------------------------------------------------------------------------------------- through the CLI


@settings(max_examples=12, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.binary(min_size=1, max_size=512), kind=st.sampled_from(["model.onnx", "data.jsonl", "data.txt",
                                                                      "data.npz"]))
def test_the_cli_turns_any_bad_file_into_exit_2_and_one_line(folder, capsys, data, kind):
    from edgepack.cli import main

    path = folder / kind
    path.write_bytes(data)
    good_model = folder / "good.onnx"
    if not good_model.exists():
        from tests.huge_models import make_onnx_mlp

        make_onnx_mlp(good_model, layers=1, width=4)
    command = {"model.onnx": ["validate", str(path), "--data", str(path)],
               "data.jsonl": ["quantize", str(good_model), "--calibration", str(path), "--out", str(folder / "q")],
               "data.txt": ["bundle", str(good_model), "--data", str(path), "--out", str(folder / "b")],
               "data.npz": ["quantize", str(good_model), "--calibration", str(path), "--out", str(folder / "q")]}[kind]
    code = main(command)
    err = capsys.readouterr().err
    if code == 0:  # random bytes that happen to be a valid file: nothing to check
        return
    assert code == 2, (code, err)
    assert "Traceback" not in err and err.startswith("error: ") and err.count("\n") == 1, err
