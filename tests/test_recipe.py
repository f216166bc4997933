from pathlib import Path

import pytest
import yaml

from edgepack.errors import BadInputError
from edgepack.recipe import DEMO_RECIPE, load_recipe, parse_recipe

REPO = Path(__file__).resolve().parents[1]


def test_minilm_yaml_is_the_demo_recipe():
    assert load_recipe(REPO / "recipes" / "minilm.yaml") == DEMO_RECIPE


def test_unknown_key_is_named_with_a_close_match():
    with pytest.raises(BadInputError) as err:
        parse_recipe({"quantize": {"calibrater": "minmax"}}, source="r.yaml")
    assert "unknown key 'quantize.calibrater' (did you mean 'calibrator'?)" in str(err.value)
    assert str(err.value).startswith("r.yaml:")
    assert err.value.exit_code == 2


def test_unknown_top_level_section():
    with pytest.raises(BadInputError, match=r"unknown key 'gate' \(did you mean 'gates'\?\)"):
        parse_recipe({"gate": {}})


def test_wrong_type_names_the_field_and_value():
    with pytest.raises(BadInputError, match=r"data.n_calibration: .*integer.*'lots'"):
        parse_recipe({"data": {"n_calibration": "lots"}})


def test_out_of_range_value():
    with pytest.raises(BadInputError, match=r"data.n_calibration: .*greater than or equal to 1"):
        parse_recipe({"data": {"n_calibration": 0}})


def test_invalid_yaml_names_the_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  path: [unclosed\n")
    with pytest.raises(BadInputError, match=r"bad.yaml: line \d+ is not valid YAML"):
        load_recipe(path)


def test_missing_recipe_file(tmp_path):
    with pytest.raises(BadInputError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")


def test_recipe_round_trips_through_yaml(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(DEMO_RECIPE.dump()))
    assert load_recipe(path) == DEMO_RECIPE


def test_every_bundled_recipe_parses():
    for path in sorted((REPO / "recipes").glob("*.yaml")):
        load_recipe(path)
