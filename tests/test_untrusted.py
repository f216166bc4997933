"""Untrusted files: external data that points out of the model's folder, pickles in every disguise, YAML tags and
alias bombs, import paths into the standard library. Each is one line, exit 2, and nothing is read or run.

The payloads are real: a pickle whose unpickling would create a marker file, a FIFO that would block any reader
forever, a YAML tag that would run a shell command. The marker never appears and nothing blocks.
"""

from __future__ import annotations

import ast
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, numpy_helper
from onnx import helper as oh

from edgepack.cli import main

REPO = Path(__file__).resolve().parents[1]


def _external_model(folder: Path, location: str, *, in_constant: bool = False, in_subgraph: bool = False,
                    length: int | None = None) -> Path:
    """y = x @ W with W's data in `location` (relative to the model), optionally inside a Constant node or an If
    branch; a real 4x4 float32 weight file is written at folder/../outside/w.bin for the escapes to point at."""
    weight = np.arange(16, dtype=np.float32).reshape(4, 4)
    (folder.parent / "outside").mkdir(exist_ok=True)
    (folder.parent / "outside" / "w.bin").write_bytes(weight.tobytes())
    tensor = numpy_helper.from_array(weight, "W")
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(length or weight.nbytes))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    x = oh.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = oh.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    if in_constant or in_subgraph:
        const = oh.make_node("Constant", [], ["W"], name="const", value=tensor)
        body = [const, oh.make_node("MatMul", ["x", "W"], ["y"], name="mm")]
        if in_subgraph:
            branch = oh.make_graph(body, "branch", [], [y])
            cond = numpy_helper.from_array(np.array(True), "cond")
            graph = oh.make_graph([oh.make_node("If", ["cond"], ["y"], name="if", then_branch=branch,
                                                else_branch=branch)], "g", [x], [y], [cond])
        else:
            graph = oh.make_graph(body, "g", [x], [y])
    else:
        graph = oh.make_graph([oh.make_node("MatMul", ["x", "W"], ["y"], name="mm")], "g", [x], [y], [tensor])
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])
    model.ir_version = 8
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.onnx"
    path.write_bytes(model.SerializeToString())
    return path


def _escapes(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """name -> (model, what the message must say)."""
    cases: dict[str, tuple[Path, str]] = {}
    outside = str((tmp_path / "outside" / "w.bin").resolve())
    cases["absolute"] = (_external_model(tmp_path / "abs", outside), "outside the model's folder")
    cases["dotdot"] = (_external_model(tmp_path / "dotdot", "../outside/w.bin"), "outside the model's folder")
    cases["windows"] = (_external_model(tmp_path / "win", "..\\outside\\w.bin"), "outside the model's folder")
    link = _external_model(tmp_path / "link", "w.bin")
    os.symlink(outside, tmp_path / "link" / "w.bin")
    cases["symlink out"] = (link, "symbolic link")
    linked_dir = _external_model(tmp_path / "linkdir", "sub/w.bin")
    os.symlink(tmp_path / "outside", tmp_path / "linkdir" / "sub")
    cases["symlinked folder"] = (linked_dir, "symbolic link")
    fifo = _external_model(tmp_path / "fifo", "w.bin")
    os.mkfifo(tmp_path / "fifo" / "w.bin")  # any reader would block here forever
    cases["fifo"] = (fifo, "not a regular file")
    cases["missing"] = (_external_model(tmp_path / "missing", "nothere.bin"), "does not exist")
    short = _external_model(tmp_path / "short", "w.bin", length=1 << 20)
    (tmp_path / "short" / "w.bin").write_bytes(b"\0" * 64)
    cases["truncated"] = (short, "the file has 64 bytes")
    cases["in a Constant"] = (_external_model(tmp_path / "const", "../outside/w.bin", in_constant=True),
                              "outside the model's folder")
    cases["in an If branch"] = (_external_model(tmp_path / "if", "../outside/w.bin", in_subgraph=True),
                                "outside the model's folder")
    return cases


def test_external_data_outside_the_model_folder_is_refused_before_onnx_runtime_opens_it(tmp_path, monkeypatch,
                                                                                      capsys):
    import onnxruntime

    def no_session(*args: object, **kwargs: object) -> None:
        raise AssertionError("ONNX Runtime saw the model")

    monkeypatch.setattr(onnxruntime, "InferenceSession", no_session)
    np.savez(tmp_path / "x.npz", x=np.ones((2, 4), np.float32))
    for name, (model, says) in _escapes(tmp_path).items():
        for command in (["validate", str(model), "--data", str(tmp_path / "x.npz")],
                        ["quantize", str(model), "--calibration", str(tmp_path / "x.npz"), "--out",
                         str(tmp_path / f"q-{name}")],
                        ["bundle", str(model), "--data", str(tmp_path / "x.npz"), "--out", str(tmp_path / f"b-{name}")]):
            assert main(command) == 2, (name, command[0])
            err = capsys.readouterr().err
            assert says in err and "tensor 'W'" in err and err.count("\n") == 1, (name, command[0], err)
        assert not (tmp_path / f"q-{name}").exists() and not (tmp_path / f"b-{name}").exists()


def test_a_model_whose_data_stays_inside_its_folder_still_runs(tmp_path):
    model = _external_model(tmp_path / "ok", "w.bin")
    (tmp_path / "ok" / "w.bin").write_bytes(np.arange(16, dtype=np.float32).tobytes())
    np.savez(tmp_path / "x.npz", x=np.ones((2, 4), np.float32))
    assert main(["validate", str(model), "--data", str(tmp_path / "x.npz"), "--runs", "2"]) == 0


# ---------------------------------------------------------------------------------------------------- pickles


class _Payload:
    """Unpickling this creates the marker file: proof that nothing unpickled it is that the file is absent."""

    marker: Path

    def __reduce__(self) -> tuple:
        return (Path.touch, (self.marker,))


def _pickle_bytes(marker: Path) -> bytes:
    payload = _Payload()
    payload.marker = marker
    return pickle.dumps(payload)


def test_pickles_in_every_disguise_are_refused_and_never_unpickled(tiny_bert_dir, tmp_path, capsys):
    marker = tmp_path / "UNPICKLED"
    evil = _pickle_bytes(marker)
    hf = tmp_path / "hf"
    hf.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        (hf / name).write_bytes((tiny_bert_dir / name).read_bytes())
    (hf / "pytorch_model.bin").write_bytes(evil)
    assert main(["export", str(hf), "--out", str(tmp_path / "e1")]) == 2
    assert "refusing pickle checkpoint" in capsys.readouterr().err
    (hf / "model.safetensors").write_bytes(evil)  # a pickle renamed .safetensors, beside the .bin
    assert main(["export", str(hf), "--out", str(tmp_path / "e2")]) == 2
    assert "not a readable safetensors file" in capsys.readouterr().err
    (tmp_path / "data.npz").write_bytes(evil)  # a pickle renamed .npz (np.load would unpickle it)
    payload = _Payload()
    payload.marker = marker
    np.savez(tmp_path / "objects.npz", x=np.array([payload], dtype=object))  # an object array in a real npz
    from edgepack.calibration_data import read_samples
    from edgepack.errors import BadInputError

    for name, says in (("data.npz", "no zip header"), ("objects.npz", "Python objects")):
        with pytest.raises(BadInputError, match=says):
            read_samples(tmp_path / name)
    assert not marker.exists()


_LOADS = {("pickle", "load"), ("pickle", "loads"), ("pickle", "Unpickler"), ("dill", "load"), ("joblib", "load"),
          ("marshal", "loads"), ("shelve", "open"), ("yaml", "load"), ("yaml", "unsafe_load"),
          ("yaml", "full_load"), ("cloudpickle", "load"), ("cloudpickle", "loads")}


def _calls(tree: ast.AST) -> list[ast.Call]:
    return [node for node in ast.walk(tree) if isinstance(node, ast.Call)]


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return node.id if isinstance(node, ast.Name) else ""


def _keyword(call: ast.Call, name: str) -> object:
    for keyword in call.keywords:
        if keyword.arg == name and isinstance(keyword.value, ast.Constant):
            return keyword.value.value
    return None


def test_no_code_path_unpickles_evaluates_or_trusts_remote_code():
    """Every .py of edgepack and scripts, read as syntax trees: no unpickling loader, no eval/exec, torch.load only
    with weights_only=True, np.load never with allow_pickle=True, from_pretrained never with trust_remote_code,
    model weights only from safetensors, subprocesses never through a shell."""
    problems = []
    for path in sorted([*(REPO / "edgepack").rglob("*.py"), *(REPO / "scripts").rglob("*.py")]):
        tree = ast.parse(path.read_text(), filename=str(path))
        for call in _calls(tree):
            name = _dotted(call.func)
            where = f"{path.relative_to(REPO)}:{call.lineno} {name}"
            module, _, attr = name.rpartition(".")
            if (module.split(".")[-1], attr) in _LOADS or name in ("eval", "exec", "compile"):
                problems.append(where)
            if name.endswith("torch.load") and _keyword(call, "weights_only") is not True:
                problems.append(f"{where} without weights_only=True")
            if name in ("np.load", "numpy.load") and _keyword(call, "allow_pickle") is True:  # numpy's default: False
                problems.append(f"{where} with allow_pickle=True")
            if attr == "from_pretrained" and _keyword(call, "trust_remote_code") is True:
                problems.append(f"{where} with trust_remote_code=True")
            # a GGUF file (gguf_file=) is parsed by the gguf package: no pickle, no safetensors to ask for
            if attr == "from_pretrained" and "Tokenizer" not in module and "Config" not in module and \
                    _keyword(call, "use_safetensors") is not True and \
                    not any(k.arg == "gguf_file" for k in call.keywords):
                problems.append(f"{where} without use_safetensors=True")
            if _keyword(call, "shell") is True:
                problems.append(f"{where} with shell=True")
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
                if any(n and n.split(".")[0] in ("pickle", "dill", "cloudpickle", "joblib", "shelve") for n in names):
                    problems.append(f"{path.relative_to(REPO)}:{node.lineno} imports {names}")
    assert problems == []


# ------------------------------------------------------------------------------------------------------ recipes


def test_recipes_are_data_tags_aliases_and_import_paths_run_nothing(tmp_path, capsys):
    marker = tmp_path / "RAN"
    cases = {
        "tag.yaml": (f'name: x\nmodel: !!python/object/apply:os.system ["touch {marker}"]\n', "not valid YAML"),
        "tag2.yaml": (f"name: !!python/name:os.system\ndata: {{path: '{marker}'}}\n", "not valid YAML"),
        "bomb.yaml": ("".join(f"{c}: &{c} [{', '.join([f'*{p}'] * 9 if p else ['lol'] * 9)}]\n"
                              for p, c in zip(["", *"abcdefg"], "abcdefgh", strict=True)) + "name: *h\n",
                      "expands to more than 100,000 values"),
        "stdlib.yaml": ("name: x\nmodel: {path: 'os:abort', inputs: [{name: x, shape: [1, 4]}], outputs: [y]}\n"
                        "data: {path: x.npz, pair_field: null, n_calibration: 1, n_evaluation: 1}\n", "not Python's standard library"),
        "eval.yaml": ("name: x\nmodel: {path: \"__import__('os').system('touch RAN')\"}\n", "does not exist"),
        "deep.yaml": ("name: " + "[" * 5000 + "]" * 5000 + "\n", "nested too deeply"),
        "binary.yaml": (None, "not UTF-8"),
    }
    np.savez(tmp_path / "x.npz", x=np.random.default_rng(0).standard_normal((4, 4)).astype(np.float32))
    for name, (text, says) in cases.items():
        path = tmp_path / name
        if text is None:
            path.write_bytes(b"name: \xff\xfe\x00\n")
        else:
            path.write_text(text)
        code = subprocess.run([sys.executable, "-m", "edgepack.cli", "run", str(path), "--out", str(tmp_path / "o")],
                              capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert code.returncode == 2 and says in code.stderr, (name, code.returncode, code.stderr[-500:])
        assert "Traceback" not in code.stderr
    assert not marker.exists() and not (tmp_path / "RAN").exists()
    assert not [p for p in (tmp_path / "o").glob("*") if not p.name.startswith(".")] if (tmp_path / "o").exists() \
        else True
