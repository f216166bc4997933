"""The family registry: every family has its tests, a model no family knows is one line naming what exists."""

from __future__ import annotations

import importlib
import inspect
import json
import warnings

import pytest

from edgepack.cli import main
from edgepack.errors import BadInputError
from edgepack.families import FAMILIES, inspect_source, open_model
from edgepack.recipe import parse_recipe

ASPECTS = ("test_export", "test_metric", "test_quantize")


@pytest.mark.parametrize("name", FAMILIES.names())
def test_every_registered_family_has_an_export_a_metric_and_a_quantize_test(name):
    """Adding a family means adding tests/families/test_<family>.py with FAMILY = name and the three kinds."""
    module_name = f"tests.families.test_{name.replace('-', '_')}"
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        pytest.fail(f"family {name} is registered but {module_name} does not exist")
    assert name == module.FAMILY
    tests = [n for n, f in inspect.getmembers(module, inspect.isfunction) if n.startswith("test_")]
    missing = [aspect for aspect in ASPECTS if not any(t.startswith(aspect) for t in tests)]
    assert not missing, f"{module_name} has no {', '.join(missing)}* test"


def gpt2_folder(tmp_path):
    """A GPT-2 checkpoint: no family handles GPT-2's architecture (causal-lm takes Llama-style *ForCausalLM)."""
    folder = tmp_path / "gpt2"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    (folder / "model.safetensors").write_bytes(b"")
    return folder


def test_a_model_no_family_recognises_is_one_line_naming_the_type_and_the_families(tmp_path, capsys):
    folder = gpt2_folder(tmp_path)
    assert not any(FAMILIES.get(n).recognize(inspect_source(str(folder))) for n in FAMILIES)
    assert main(["export", str(folder), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    line = [x for x in err.splitlines() if x.startswith("error:")]
    assert len(line) == 1 and "Traceback" not in err and "internal error" not in err
    assert "no model family recognises" in line[0] and "model_type 'gpt2' (architectures GPT2LMHeadModel)" in line[0]
    assert all(name in line[0] for name in FAMILIES.names())
    assert not (tmp_path / "out").exists()


def test_a_family_asked_for_a_task_it_does_not_support_names_both(tiny_bert_dir):
    with pytest.raises(BadInputError, match=r"family sentence-encoder supports task\(s\) feature-extraction, not "
                                            r"'text-generation'"):
        open_model(str(tiny_bert_dir), task="text-generation")


def test_a_family_that_does_not_handle_the_model_says_which_do(tiny_bert_dir):
    with pytest.raises(BadInputError, match="family sequence-classifier does not handle .* use family auto, or one "
                                            "of: sentence-encoder"):
        open_model(str(tiny_bert_dir), family="sequence-classifier")


def test_family_options_are_checked_with_a_close_match(tiny_bert_dir):
    with pytest.raises(BadInputError, match=r"model.poolng is not an option of family sentence-encoder \(did you "
                                            r"mean 'pooling'\?\) \(it takes: pooling, normalize\)"):
        open_model(str(tiny_bert_dir), options={"poolng": "cls"})


def test_recipe_checks_family_names_and_option_keys():
    with pytest.raises(BadInputError, match=r"unknown model family 'sentence-encodr' \(did you mean "
                                            r"'sentence-encoder'\?\)"):
        parse_recipe({"model": {"family": "sentence-encodr"}})
    with pytest.raises(BadInputError, match=r"unknown key 'model.pooing' \(did you mean 'pooling'\?\)"):
        parse_recipe({"model": {"pooing": "cls"}})
    with pytest.raises(BadInputError, match=r"model.outputs is not an option of family sentence-encoder"):
        parse_recipe({"model": {"family": "sentence-encoder", "outputs": ["x"]}})
    assert parse_recipe({"model": {"family": "torch-module", "inputs": [{"name": "x", "shape": [1, 3]}],
                                   "outputs": ["y"]}}).model.options["outputs"] == ["y"]


def test_the_0_1_adapter_key_still_reads_with_a_deprecation():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        recipe = parse_recipe({"model": {"adapter": "hf-encoder", "pooling": "mean"}})
    assert recipe.model.family == "sentence-encoder" and recipe.model.options == {"pooling": "mean"}
    assert any("deprecated since edgepack 0.2.0" in str(w.message) and "model.family" in str(w.message)
               for w in caught)


def test_families_command_lists_every_family(capsys):
    assert main(["families"]) == 0
    out = capsys.readouterr().out
    for name in FAMILIES.names():
        assert out.count(f"{name}: tasks") == 1
