"""Every bad input: one line naming the problem and the fix, exit code 2, nothing half-written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from edgepack.cli import main

REPO = Path(__file__).resolve().parents[1]


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def test_missing_model_folder(capsys, tmp_path):
    code, _, err = run_cli(capsys, "export", tmp_path / "nope", "--out", tmp_path / "out")
    assert code == 2
    assert "does not exist; pass a local Hugging Face folder, an .onnx file" in one_line_error(err)
    assert not (tmp_path / "out").exists()


def test_folder_that_is_not_a_model(capsys, tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("hello")
    code, _, err = run_cli(capsys, "export", tmp_path / "notes", "--out", tmp_path / "out")
    assert code == 2
    line = one_line_error(err)
    assert "no model family recognises" in line and "a folder without config.json" in line
    assert not (tmp_path / "out").exists()


def test_recipe_unknown_key_exit_2(capsys, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: r\nquantize:\n  per_chanel: true\n")
    code, _, err = run_cli(capsys, "run", recipe, "--out", tmp_path / "run")
    assert code == 2
    assert "unknown key 'quantize.per_chanel' (did you mean 'per_channel'?)" in one_line_error(err)
    assert not (tmp_path / "run").exists()


def test_recipe_wrong_type_exit_2(capsys, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("validate:\n  runs: many\n")
    code, _, err = run_cli(capsys, "run", recipe, "--out", tmp_path / "run")
    assert code == 2
    assert "validate.runs" in one_line_error(err)


def test_unknown_ep_lists_known_ones(capsys, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("validate:\n  providers: [cpu, qnn-htpp]\n")
    code, _, err = run_cli(capsys, "run", recipe, "--out", tmp_path / "run")
    assert code == 2
    line = one_line_error(err)
    assert "qnn-htpp" in line and "did you mean 'qnn-htp'" in line and "cpu" in line
    assert not (tmp_path / "run").exists()


@pytest.fixture()
def tiny_onnx(tiny_bert_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "exported"
    assert main(["export", str(tiny_bert_dir), "--out", str(out)]) == 0
    return out / "model.onnx"


def test_quantize_ranks_sensitive_layers_and_reuses_its_calibration(capsys, tmp_path, tiny_onnx, tiny_bert_dir,
                                                                     small_sentences):
    # the exported folder carries its tokenizer: no --tokenizer
    common = ["--calibration", small_sentences, "--samples", "16", "--range-cache", tmp_path / "cache"]
    code, out, _ = run_cli(capsys, "quantize", tiny_onnx, *common, "--out", tmp_path / "q", "--sensitivity", "3",
                           "--max-cosine-drop", "0.5")
    assert code == 0 and (tmp_path / "q" / "model.onnx").is_file() and (tmp_path / "q" / "tensor_ranges.json").is_file()
    manifest = json.loads((tmp_path / "q" / "manifest.json").read_text())
    assert manifest["stage"] == "quantize" and manifest["model"]["family"] == "sentence-encoder"
    assert (tmp_path / "q" / "tokenizer.json").is_file()  # carried on, for validate and bundle
    ranked = [line for line in out.splitlines() if line.startswith("sensitivity #")]
    assert len(ranked) == 3 and "with it in float" in ranked[0]
    assert "accuracy budget met on 16 calibration samples" in out and "calibration reused" not in out
    code, out, _ = run_cli(capsys, "quantize", tiny_onnx, *common, "--out", tmp_path / "q2",
                           "--max-cosine-drop", "0.2")
    assert code == 0 and "calibration reused from" in out and str(tmp_path / "cache") in out
    code, out, _ = run_cli(capsys, "quantize", tiny_onnx, *common, "--out", tmp_path / "q2",
                           "--max-cosine-drop", "0.2")
    assert code == 0 and "; reused)" in out  # the same command again: the finished folder is the answer


def test_quantize_out_is_a_folder_and_tokenizer_only_for_foreign_onnx(capsys, tmp_path, tiny_onnx, tiny_bert_dir,
                                                                     small_sentences):
    code, _, err = run_cli(capsys, "quantize", tiny_onnx, "--calibration", small_sentences, "--out", tmp_path / "q.onnx")
    assert code == 2 and "--out " in one_line_error(err) and "name a folder, not a file" in err
    code, _, err = run_cli(capsys, "quantize", tiny_onnx, "--calibration", small_sentences, "--tokenizer",
                           tiny_bert_dir, "--out", tmp_path / "q")
    assert code == 2 and "carries its preprocessing (family sentence-encoder); drop --tokenizer" in one_line_error(err)
    foreign = tmp_path / "foreign" / "model.onnx"  # the same graph without edgepack's folder around it
    foreign.parent.mkdir()
    foreign.write_bytes(tiny_onnx.read_bytes())
    code, _, err = run_cli(capsys, "quantize", foreign, "--calibration", small_sentences, "--samples", "8",
                           "--out", tmp_path / "q")
    assert code == 2 and "text data needs a tokenizer: pass --tokenizer DIR" in one_line_error(err)
    code, out, _ = run_cli(capsys, "quantize", foreign, "--calibration", small_sentences, "--samples", "8",
                           "--tokenizer", tiny_bert_dir, "--max-cosine-drop", "-1", "--out", tmp_path / "q")
    assert code == 0 and (tmp_path / "q" / "tokenizer.json").is_file()  # now the INT8 folder carries it


def test_calibration_file_missing(capsys, tmp_path, tiny_onnx):
    code, _, err = run_cli(capsys, "quantize", tiny_onnx, "--calibration", tmp_path / "none.txt",
                           "--out", tmp_path / "q")
    assert code == 2
    assert "none.txt" in one_line_error(err)
    assert list(tmp_path.iterdir()) == []


def test_calibration_file_empty(capsys, tmp_path, tiny_onnx):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    code, _, err = run_cli(capsys, "quantize", tiny_onnx, "--calibration", empty, "--out", tmp_path / "q")
    assert code == 2
    assert "empty.txt" in one_line_error(err)
    assert not (tmp_path / "q").exists()


def test_fewer_samples_than_asked_calibrates_on_all_and_says_so(capsys, tmp_path, tiny_onnx):
    data = tmp_path / "few.txt"
    data.write_text("one sentence\nanother sentence\n")
    code, _, err = run_cli(capsys, "quantize", tiny_onnx, "--calibration", data, "--samples", "50",
                           "--out", tmp_path / "q")
    assert code == 0 and "2 samples, fewer than --samples 50: calibrating on all 2" in err
    assert json.loads((tmp_path / "q" / "manifest.json").read_text())["metrics"]["calibrated_tensors"] > 0


def test_truncated_onnx(capsys, tmp_path, tiny_onnx, small_sentences):
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(tiny_onnx.read_bytes()[:5000])
    code, _, err = run_cli(capsys, "validate", broken, "--data", small_sentences)
    assert code == 2
    assert "broken.onnx is not a valid ONNX model" in one_line_error(err) and "truncated" in err


def test_not_onnx_at_all(capsys, tmp_path, small_sentences):
    fake = tmp_path / "fake.onnx"
    fake.write_text("this is a text file")
    code, _, err = run_cli(capsys, "quantize", fake, "--calibration", small_sentences, "--out", tmp_path / "q")
    assert code == 2
    assert "fake.onnx is not a valid ONNX model" in one_line_error(err)
    assert not (tmp_path / "q").exists()


def test_validate_unknown_ep(capsys, tiny_onnx, small_sentences):
    code, _, err = run_cli(capsys, "validate", tiny_onnx, "--data", small_sentences, "--ep", "cpu,gpu")
    assert code == 2
    assert "unknown execution provider 'gpu'" in one_line_error(err)


def test_debug_shows_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "edgepack.cli", "export", str(tmp_path / "nope"), "--out",
                           str(tmp_path / "o"), "--debug"], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode != 0 and "Traceback" in proc.stderr


@pytest.mark.parametrize("command", ["run", "demo", "families", "export", "quantize", "validate", "compare", "doctor", "bundle", "verify"])
def test_every_command_has_help_with_examples(command):
    proc = subprocess.run([sys.executable, "-m", "edgepack.cli", command, "--help"], capture_output=True, text=True,
                          cwd=REPO)
    assert proc.returncode == 0
    assert "examples:" in proc.stdout and f"edgepack {command}" in proc.stdout
