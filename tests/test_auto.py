"""`edgepack auto`: budgets, the search space, the search on a tiny BERT with a known answer, its report, resume,
exit 3 when nothing meets the budgets, and the Ray backend on a local 2-worker cluster.

The known answer: a grid over {float, INT8} x {1, 2 layers kept} of a 2-layer BERT under `size_mb <= 2` (the FP32
models are 4 MB, so the exact-size proxy prunes them before any run) and a loose accuracy budget: the answer is the
INT8 model with one layer, the smallest file. About a minute in all on 2 shared cores.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from edgepack.auto.budgets import Budget, Measurement, merge_budgets, parse_budget
from edgepack.auto.pareto import choose, pareto_front
from edgepack.auto.search import rung_sizes
from edgepack.auto.space import SearchSpace
from edgepack.errors import BadInputError
from edgepack.recipe import parse_recipe
from tests.test_cli import one_line_error, run_cli


def tiny_recipe(tmp_path: Path, model: Path, space: dict, **auto) -> Path:
    recipe = {"name": "tiny-auto", "model": {"path": str(model)}, "data": {"n_calibration": 16, "n_evaluation": 24},
              "quantize": {"smoothquant": "off", "max_cosine_drop": None}, "validate": {"runs": 5, "warmup": 1},
              "bundle": {"enabled": False}, "auto": {"space": space, "rung_runs": 3, **auto}}
    path = tmp_path / "tiny-auto.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


GRID = {"quantize": [False, True], "layers_kept": [1, 2]}


# ------------------------------------------------------------------------------------------------- budgets


@pytest.mark.parametrize(("text", "message"), [
    ("accuracy_drop", "write NAME=VALUE, e.g. accuracy_drop=0.5"),
    ("acuracy_drop=0.5", "unknown budget 'acuracy_drop' (did you mean 'accuracy_drop'?)"),
    ("p50_ms=fast", "'fast' is not a number"),
    ("size_mb=-1", "must be a finite number >= 0"),
    ("size_mb=nan", "must be a finite number >= 0"),
])
def test_budget_errors_are_one_line_exit_2(capsys, tmp_path, text, message):
    recipe = tiny_recipe(tmp_path, tmp_path / "unused", {})
    code, _, err = run_cli(capsys, "auto", recipe, "--budget", text, "--out", tmp_path / "out")
    assert code == 2 and message in one_line_error(err)
    assert not (tmp_path / "out").exists()  # nothing written before the budgets are read


def test_budgets_merge_cli_over_recipe():
    budgets = merge_budgets({"accuracy_drop": 1.0, "size_mb": 20}, ["accuracy_drop=0.5", "p50_ms=5"])
    assert budgets == [Budget("accuracy_drop", 0.5), Budget("size_mb", 20.0), Budget("p50_ms", 5.0)]
    assert parse_budget("peak_rss_mb=40").violation(Measurement(peak_rss_mb=50)) == pytest.approx(0.25)
    assert parse_budget("peak_rss_mb=40").met(Measurement()) is None  # not measured yet


def test_auto_needs_a_budget(capsys, tmp_path, tiny_bert_dir):
    code, _, err = run_cli(capsys, "auto", tiny_recipe(tmp_path, tiny_bert_dir, GRID), "--out", tmp_path / "o")
    assert code == 2 and "needs at least one budget: --budget accuracy_drop=0.5" in one_line_error(err)


# --------------------------------------------------------------------------------------------------- space


def test_space_applies_knobs_and_dotted_keys(tiny_bert_dir):
    recipe = parse_recipe({"model": {"path": str(tiny_bert_dir)}, "auto": {"space": {
        "layers_kept": [1, 2], "ffn_prune": [0.0, 0.5], "quantize.calibrator": ["minmax", "percentile"],
        "prune.recovery_steps": {"low": 0, "high": 100, "step": 50}}}})
    space = SearchSpace.build(recipe)
    candidate = space.recipe({"layers_kept": 1, "ffn_prune": 0.5, "quantize.calibrator": "percentile"})
    assert candidate.prune.enabled and candidate.prune.layers == [1] and candidate.prune.ffn_ratio == 0.5
    assert candidate.quantize.calibrator == "percentile"
    assert not space.recipe({"layers_kept": 2, "ffn_prune": 0.0}).prune.enabled  # nothing to prune: stage off
    # the recipe itself is a point of the space (it becomes the first trial)
    assert space.base_point() is None  # prune.recovery_steps is a range: no enqueued point
    grid = SearchSpace.build(parse_recipe({"model": {"path": str(tiny_bert_dir)}, "auto": {"space": GRID}}))
    assert grid.base_point() == {"quantize": True, "layers_kept": 2}


def test_space_reaches_a_weight_only_variant_by_index(tiny_bert_dir):
    """Per-part precision knobs write the last weight-only variant (`quantize.weight_only.variants.-1`)."""
    recipe = parse_recipe({"model": {"path": str(tiny_bert_dir)}, "quantize": {"mode": "weight-only", "weight_only": {
        "variants": [{"name": "int4", "bits": 4}]}}, "auto": {"space": {
            "embedding_bits": [4, 8], "int8_layers_cosine": [None, 0.004], "weight_block": [32, 64],
            "quantize.weight_only.variants.0.method": ["rtn", "gptq"]}}})
    space = SearchSpace.build(recipe)
    variant = space.recipe({"embedding_bits": 8, "int8_layers_cosine": 0.004, "weight_block": 64,
                            "quantize.weight_only.variants.0.method": "rtn"}).quantize.weight_only.variants[-1]
    assert (variant.bits, variant.embedding_bits, variant.block_size, variant.method) == (4, 8, 64, "rtn")
    assert variant.mixed is not None and variant.mixed.max_cosine_drop == 0.004
    assert space.recipe({"int8_layers_cosine": None}).quantize.weight_only.variants[-1].mixed is None
    with pytest.raises(BadInputError) as error:
        SearchSpace.build(parse_recipe({"model": {"path": str(tiny_bert_dir)}, "auto": {"space": {
            "quantize.weight_only.variants.3.bits": [4]}}}))
    assert "'3' is not an index of a list of 2 (0..1, or -1 for the last)" in str(error.value)


@pytest.mark.parametrize(("space", "message"), [
    ({"layer_kept": [1]}, "auto.space.layer_kept: unknown knob (did you mean 'layers_kept'?)"),
    ({"smoothquant": ["sometimes"]}, "auto.space.smoothquant='sometimes'"),
    ({"quantize.calibratr": ["minmax"]}, "'quantize.calibratr' is not a recipe key (did you mean 'calibrator'?)"),
    ({"layers_kept": [3]}, "keep 1..2 of the model's 2 layers"),
    ({"ffn_prune": []}, "auto.space.ffn_prune is an empty list"),
])
def test_space_errors_name_the_knob(tiny_bert_dir, space, message):
    with pytest.raises(BadInputError, match=None) as error:
        SearchSpace.build(parse_recipe({"model": {"path": str(tiny_bert_dir)}, "auto": {"space": space}}))
    assert message in str(error.value) and "\n" not in str(error.value)


# ---------------------------------------------------------------------------------------- pure functions


def test_rungs_end_with_the_whole_split():
    assert rung_sizes(226, rungs=3, eta=3) == [26, 76, 226]
    assert rung_sizes(24, rungs=3, eta=3) == [8, 24]  # at least 8 samples a rung
    assert rung_sizes(5, rungs=3, eta=3) == [5]


def test_choice_is_the_smallest_meeting_every_budget():
    budgets = [Budget("accuracy_drop", 0.5), Budget("peak_rss_mb", 40)]
    measured = {"big": Measurement(size_mb=23, accuracy_drop=0.0, peak_rss_mb=50, metric=1.0, p50_ms=20),
                "small": Measurement(size_mb=10, accuracy_drop=0.4, peak_rss_mb=15, metric=0.996, p50_ms=10),
                "tiny": Measurement(size_mb=5, accuracy_drop=2.0, peak_rss_mb=10, metric=0.98, p50_ms=8)}
    assert choose(measured, budgets, objective="size_mb").chosen == "small"
    assert pareto_front(measured) == ["big", "small", "tiny"]
    strict = choose(measured, [Budget("accuracy_drop", 0.3), Budget("peak_rss_mb", 12)], objective="size_mb")
    # misses by fractions of each limit: big 3.17 (memory), small 0.33 + 0.25, tiny 5.67 (accuracy)
    assert strict.chosen is None and strict.closest == "small"
    assert strict.missed == ("accuracy_drop <= 0.3 points", "peak_rss_mb <= 12 MiB")


def test_an_emulated_budget_ep_is_named_in_the_notes():
    from edgepack.auto.driver import _ep_notes

    assert _ep_notes("cpu") == []
    note = _ep_notes("qnn-htp")  # the QNN HTP simulator on this x86 host
    assert len(note) == 1 and "qnn-htp, which is emulated here" in note[0] and "not a device timing" in note[0]


# -------------------------------------------------------------------------------------------- the search


@pytest.fixture(scope="module")
def searched(tmp_path_factory, tiny_bert_dir):
    """The grid searched once with a local pool of 2 workers; the folder the resume and exit-3 tests reuse."""
    from edgepack.auto.driver import run_auto
    from edgepack.recipe import load_recipe

    tmp = tmp_path_factory.mktemp("auto")
    recipe = load_recipe(tiny_recipe(tmp, tiny_bert_dir, GRID, sampler="grid"))
    report = run_auto(recipe, tmp / "run", budgets=["size_mb=2", "accuracy_drop=100"], backend="local", workers=2)
    return tmp, report


@pytest.mark.slow
def test_search_finds_the_known_answer(searched):
    tmp, report = searched
    auto = report.auto
    by_trial = {c.trial: c for c in auto.candidates}
    chosen = by_trial[auto.chosen]
    assert chosen.params == {"quantize": True, "layers_kept": 1} and report.passed
    float_trials = [c for c in auto.candidates if c.params["quantize"] is False]
    assert len(float_trials) == 2 and all(c.state == "pruned" and c.reason.startswith("proxy: size_mb 4.0")
                                          for c in float_trials)  # exact size: pruned before any run
    assert auto.counts["pruned_by_proxy"] == 2 and auto.rung_samples == [8, 24]
    assert chosen.finalist and chosen.figures.how == "harness" and chosen.figures.samples == 24
    assert chosen.figures.size_mb < 1.1 and chosen.figures.peak_rss_mb > 0 and chosen.figures.p50_ms > 0
    assert auto.chosen in auto.pareto
    assert len({w for c in auto.candidates for w in c.workers}) == 2  # both pool workers took jobs
    assert [g.name for g in report.gates] == ["budget size_mb", "budget accuracy_drop"]
    md = (tmp / "run" / "report.md").read_text()
    assert "## Auto search" in md and f"| {auto.chosen} **(chosen)** | quantize=True, layers_kept=1 |" in md
    saved = json.loads((tmp / "run" / "report.json").read_text())
    assert saved["auto"]["chosen"] == auto.chosen and saved["variants"][chosen.variant]["providers"]["cpu"]
    html = (tmp / "run" / "report.html").read_text()
    assert 'id="fig-pareto"' in html and "Auto search" in html
    assert (tmp / "run" / "figures" / "pareto.png").stat().st_size > 1000


@pytest.mark.slow
def test_rerun_resumes_every_candidate(searched, capsys):
    tmp, first = searched
    folders = sorted(p.name for p in (tmp / "run").iterdir())
    code, out, _ = run_cli(capsys, "auto", tmp / "tiny-auto.yaml", "--budget", "size_mb=2", "--budget",
                           "accuracy_drop=100", "--backend", "inline", "--out", tmp / "run")
    assert code == 0 and f"chosen: trial {first.auto.chosen} " in out
    assert sorted(p.name for p in (tmp / "run").iterdir()) == folders  # every stage folder reused, none added


@pytest.mark.slow
def test_no_candidate_meets_the_budgets_exit_3(searched, capsys):
    tmp, _ = searched
    code, _, err = run_cli(capsys, "auto", tmp / "tiny-auto.yaml", "--budget", "size_mb=0.5", "--budget",
                           "accuracy_drop=100", "--backend", "inline", "--out", tmp / "run")
    line = one_line_error(err)
    assert code == 3 and "no candidate meets size_mb <= 0.5 MB; closest is trial 2 (quantize=True, layers_kept=1)" \
        in line
    report = json.loads((tmp / "run" / "report.json").read_text())  # still written
    assert report["passed"] is False and report["auto"]["chosen"] is None


@pytest.mark.slow
def test_tpe_repeats_are_not_built_again(searched):
    """TPE on the 4-point grid asked for 8 trials: the repeats are told the earlier result, never built or measured
    again; the search ends when every proposal repeats (its candidates come from the grid run's stage folders)."""
    from edgepack.auto.driver import run_auto
    from edgepack.recipe import load_recipe

    tmp, _ = searched
    tpe = tmp / "tpe"
    tpe.mkdir(exist_ok=True)
    recipe = load_recipe(tiny_recipe(tpe, tmp / "unused", GRID, sampler="tpe", trials=8, startup_trials=2))
    recipe = recipe.model_copy(update={"model": load_recipe(tmp / "tiny-auto.yaml").model})
    report = run_auto(recipe, tmp / "run", budgets=["size_mb=2", "accuracy_drop=100"], backend="inline")
    points = [tuple(sorted(c.params.items())) for c in report.auto.candidates]
    assert len(points) == len(set(points)) == 4  # each point of the space built once
    assert report.auto.counts["repeats_skipped"] >= 1
    assert report.auto.chosen is not None and report.passed


@pytest.mark.slow
def test_ray_backend_on_a_local_two_worker_cluster(capsys, tmp_path, tiny_bert_dir, monkeypatch):
    """Two Ray nodes of one CPU each on this machine, loopback only; the CLI connects to it by address."""
    pytest.importorskip("ray", reason="pip install 'edgepack[ray]'")
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # node addresses on 127.0.0.1, never the LAN
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=1)
        recipe = tiny_recipe(tmp_path, tiny_bert_dir, {"layers_kept": [1, 2]}, sampler="grid")
        code, out, err = run_cli(capsys, "auto", recipe, "--budget", "accuracy_drop=100", "--backend", "ray",
                                 "--address", cluster.address, "--workers", "2", "--out", tmp_path / "run")
    finally:
        cluster.shutdown()
    assert code == 0, err
    report = json.loads((tmp_path / "run" / "report.json").read_text())["auto"]
    assert report["backend"] == "ray (2 workers)"
    assert {c["params"]["layers_kept"] for c in report["candidates"]} == {1, 2}
    assert report["candidates"][report["chosen"]]["params"] == {"layers_kept": 1}  # the smaller INT8 model
    workers = {w for c in report["candidates"] for w in c["workers"]}
    assert len(workers) == 2 and "chosen: trial" in out  # jobs ran in both nodes' worker processes


# ------------------------------------------------------------------------------------------------ fidelity


def test_min_cosine_budget_parses_as_a_lower_limit(capsys, tmp_path):
    budget = parse_budget("min_cosine=0.99")
    assert budget.describe() == "min_cosine >= 0.99" and budget.met(Measurement(cosine_mean=0.995))
    assert budget.violation(Measurement(cosine_mean=0.495)) == pytest.approx(0.5)
    assert budget.met(Measurement(accuracy_drop=0.0)) is None  # not measured: never counted as met
    recipe = tiny_recipe(tmp_path, tmp_path / "unused", {})
    code, _, err = run_cli(capsys, "auto", recipe, "--budget", "min_cosine=99", "--out", tmp_path / "out")
    assert code == 2 and "a cosine lies in (0, 1]; write e.g. min_cosine=0.99" in one_line_error(err)


def test_early_rungs_judge_cosine_with_one_samples_slack():
    from edgepack.auto.search import with_slack

    judged = with_slack(Measurement(accuracy_drop=3.0, cosine_mean=0.97, cosine_min=0.6), 20)
    assert judged.accuracy_drop == pytest.approx(-2.0) and judged.cosine_mean == pytest.approx(0.99)
    assert Budget("min_cosine", 0.99).met(judged) and not Budget("min_cosine", 0.99).met(
        with_slack(Measurement(cosine_mean=0.41, cosine_min=0.2), 26))  # the MiniLM run's chosen model: refused


@pytest.fixture(scope="module")
def strong_bert_dir(tmp_path_factory, minilm_path):
    """The tiny BERT of conftest with weights 25x larger (initializer_range 0.5): its layers change the embedding
    (the 0.02 default leaves a layer's output ~ its input: one layer or two give cosine 0.9999)."""
    from tests.conftest import save_tiny_bert

    return save_tiny_bert(tmp_path_factory.mktemp("strong-bert"), minilm_path, initializer_range=0.5)


@pytest.mark.slow
def test_min_cosine_refuses_a_candidate_that_keeps_the_task_metric(tmp_path, strong_bert_dir):
    """One layer of the tiny BERT keeps the task budget but not the FP32 outputs: without min_cosine it is the
    smallest and chosen (the Ray test's answer); with it, it is refused and the two-layer INT8 model is chosen."""
    from edgepack.auto.driver import run_auto
    from edgepack.recipe import load_recipe

    recipe = load_recipe(tiny_recipe(tmp_path, strong_bert_dir, {"layers_kept": [1, 2]}, sampler="grid",
                                     finalists=2, rungs=1))
    without = run_auto(recipe, tmp_path / "run", budgets=["accuracy_drop=5"], backend="inline")
    by_layers = {c.params["layers_kept"]: c for c in without.auto.candidates}
    assert without.auto.chosen == by_layers[1].trial  # the task budget alone lets the one-layer model through
    report = run_auto(recipe, tmp_path / "run", budgets=["accuracy_drop=5", "min_cosine=0.95"], backend="inline")
    by_layers = {c.params["layers_kept"]: c for c in report.auto.candidates}
    one, two = by_layers[1], by_layers[2]
    # measured: one layer R@1 4.17 pt below FP32 (1 of 24 pairs) but cosine 0.04; two layers (INT8) cosine 0.9995
    assert one.figures.accuracy_drop <= 5 and one.figures.size_mb < two.figures.size_mb  # keeps the task budget
    assert one.figures.cosine_mean < 0.5 and one.meets_budgets is False  # but not the outputs: refused
    assert two.figures.cosine_mean >= 0.95 and report.auto.chosen == two.trial and report.passed
    assert two.figures.how == "harness"  # judged on the harness's figures (whole split, fresh processes)
    gates = {g.name: g for g in report.gates}
    assert gates["budget min_cosine"].passed and gates["budget min_cosine"].value >= 0.95
    assert "min_cosine >= 0.95" in report.auto.verdict
    md = (tmp_path / "run" / "report.md").read_text()
    assert "min_cosine >= 0.95" in md and "cosine to FP32 (mean)" in md


# ---------------------------------------------------------------------------------------- the cnn search space

#: the tiny MobileNet's stem conv output (its ReLU6), named as in the exported graph
TINY_STEM = "/stem/stem.2/Clip_output_0"


@pytest.fixture(scope="module")
def labelled_photos(tmp_path_factory):
    """10 smooth RGB images in two class folders (labels 0 and 1)."""
    from tests.vision_graphs import write_class_photos

    return write_class_photos(tmp_path_factory.mktemp("photos"), 10)


def tiny_cnn_auto_recipe(name: str, photos, *, quantize: dict, auto: dict, path: str = "make_mobilenet"):
    """An auto recipe over the tiny MobileNet (32 x 32 input) on `photos`: 8 calibration and 12 evaluation views."""
    return parse_recipe({
        "name": name,
        "model": {"family": "image-classifier", "path": f"tests.tiny_models:{path}",
                  "preprocessing": {"resize": 36, "crop": 32}, "outputs": ["logits"]},
        "data": {"path": str(photos), "label_field": "folder", "images": {"views": 2},
                 "n_calibration": 8, "n_evaluation": 12},
        "quantize": quantize, "validate": {"runs": 5, "warmup": 1}, "bundle": {"enabled": False}, "auto": auto})


def test_hold_out_labelled_keeps_labelled_images_out_of_calibration(tmp_path):
    """data.images.hold_out_labelled: the images with a label are evaluation only, and first (file order); the
    unlabelled ones fill calibration, then the rest of evaluation; no image on both sides."""
    import numpy as np
    from PIL import Image

    from edgepack.pipeline import load_split

    for i in range(8):
        Image.fromarray(np.full((8, 8, 3), 30 * i, dtype=np.uint8)).save(tmp_path / f"img{i}.png")
    (tmp_path / "labels.csv").write_text("file,label\nimg2.png,3\nimg6.png,5\n")
    data = {"path": str(tmp_path), "label_field": str(tmp_path / "labels.csv"), "images": {"views": 2},
            "n_calibration": 8, "n_evaluation": 8, "seed": 0}
    recipe = {"model": {"family": "image-classifier", "path": "tests.tiny_models:make_mobilenet"}}
    held = load_split(parse_recipe({**recipe, "data": {**data, "images": {"views": 2, "hold_out_labelled": True}}}))
    assert [(s.path.name, s.label) for s in held.evaluation[:4]] == [("img2.png", 3)] * 2 + [("img6.png", 5)] * 2
    assert all(s.label is None for s in held.calibration) and len(held.calibration) == 8
    assert not {s.path for s in held.calibration} & {s.path for s in held.evaluation}
    plain = [load_split(parse_recipe({**recipe, "data": {**data, "seed": seed}})) for seed in range(8)]
    assert any(s.label is not None for split in plain for s in split.calibration)  # without it, labels calibrate


@pytest.mark.slow
def test_cnn_space_reaches_the_model_and_skips_a_knob_that_changed_nothing(tmp_path, labelled_photos):
    """A grid over the cnn recipe's float_activations x equalize on the tiny MobileNet (ReLU6 kept: no pair to
    equalize, so CLE leaves the model as it was): the float activation reaches the built graph (no QuantizeLinear
    on it, its two convs' weights float), the CLE candidates are the same model files as the others and are not
    measured again, and the chosen model is the smallest file measured, meeting every budget (~20 s)."""
    import onnx

    from edgepack.auto.driver import run_auto

    recipe = tiny_cnn_auto_recipe(
        "tiny-cnn-auto", labelled_photos,
        quantize={"calibrator": "minmax", "max_cosine_drop": None, "cnn": {"equalize": False}},
        auto={"sampler": "grid", "rung_runs": 3, "rungs": 2, "finalists": 2,
              "space": {"cnn_float_activations": [[], [TINY_STEM]], "equalize": [False, True]}})
    report = run_auto(recipe, tmp_path / "run", budgets=["accuracy_drop=100", "min_cosine=0.9"], backend="inline")
    auto = report.auto
    by_trial = {c.trial: c for c in auto.candidates}
    same = [c for c in auto.candidates if (c.reason or "").startswith("the same model as trial")]
    assert len(auto.candidates) == 4 and auto.counts["same_model"] == 2 and all(c.params["equalize"] for c in same)
    for candidate in same:
        earlier = by_trial[int(candidate.reason.split("trial ")[1].split(" ")[0])]
        assert earlier.params == {**candidate.params, "equalize": False}
    measured = [c for c in auto.candidates if c not in same]
    for candidate in measured:
        model = onnx.load(str(tmp_path / "run" / candidate.model))
        quantized = {n.input[0] for n in model.graph.node if n.op_type == "QuantizeLinear"}
        float_weights = {t.name for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT}
        float_convs = sum(n.op_type == "Conv" and n.input[1] in float_weights for n in model.graph.node)
        kept = bool(candidate.params["cnn_float_activations"])
        assert (TINY_STEM in quantized) != kept and float_convs == 2 * kept, candidate.params
    small = min(measured, key=lambda c: c.figures.size_mb)  # at 20 KB the stem's Q/DQ weigh more than its weights
    chosen = by_trial[auto.chosen]
    assert chosen is small and chosen.meets_budgets and chosen.figures.how == "harness" and report.passed
    assert chosen.figures.cosine_mean >= 0.9


@pytest.mark.slow
def test_resolution_knob_exports_another_input_and_its_finalist_is_measured(tmp_path, labelled_photos):
    """`resolution` writes model.preprocessing.crop and scales resize (36 / 32 -> 27 / 24): the candidate exports a
    24 x 24 input; as a finalist the harness runs it with its own preprocessing, and its cosine to the 32 x 32 FP32
    reference is the one its last rung measured on the same samples (~15 s)."""
    import onnx

    from edgepack.auto.driver import run_auto

    recipe = tiny_cnn_auto_recipe(
        "tiny-resolution-auto", labelled_photos, quantize={"enabled": False},
        auto={"sampler": "grid", "rung_runs": 3, "rungs": 1, "finalists": 2, "objective": "p50_ms",
              "space": {"resolution": [32, 24]}})
    preprocessing = SearchSpace.build(recipe).tree({"resolution": 24})["model"]["preprocessing"]
    assert (preprocessing["resize"], preprocessing["crop"]) == (27, 24)
    report = run_auto(recipe, tmp_path / "run", budgets=["accuracy_drop=100", "min_cosine=0.01"], backend="inline")
    by_res = {c.params["resolution"]: c for c in report.auto.candidates}
    small = by_res[24]
    dims = onnx.load(str(tmp_path / "run" / small.model)).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims][2:] == [24, 24]
    assert small.finalist and small.figures.how == "harness" and small.figures.samples == 12
    assert small.figures.cosine_mean is not None and small.figures.p50_ms > 0 and small.meets_budgets
    assert by_res[32].figures.cosine_mean > 0.9999  # the reference's own export


@pytest.mark.slow
def test_int4_knob_gives_the_smallest_cnn_and_a_tight_cosine_budget_refuses_it(tmp_path, labelled_photos):
    """`cnn_int4_largest` over the tiny MobileNet with a 512-class head: with INT4 weights for its two largest
    layers (the head, the 32x32 pointwise conv) the file is smaller and the logits further from FP32 than all-INT8; a loose cosine budget chooses the INT4 model (the smallest), a
    budget between the two candidates' cosines chooses the INT8 one (~20 s)."""
    from edgepack.auto.driver import run_auto

    recipe = tiny_cnn_auto_recipe(
        "tiny-int4-auto", labelled_photos,
        quantize={"calibrator": "minmax", "max_cosine_drop": None, "cnn": {"int4_block_size": 16}},
        auto={"sampler": "grid", "rung_runs": 3, "rungs": 1, "finalists": 2, "space": {"cnn_int4_largest": [0, 2]}},
        path="make_mobilenet_wide_head")
    loose = run_auto(recipe, tmp_path / "run", budgets=["accuracy_drop=100", "min_cosine=0.9"], backend="inline")
    by_n = {c.params["cnn_int4_largest"]: c for c in loose.auto.candidates}
    int8, int4 = by_n[0].figures, by_n[2].figures
    assert int4.size_mb < int8.size_mb and int4.cosine_mean < int8.cosine_mean, (int4, int8)
    assert loose.auto.chosen == by_n[2].trial
    between = (int4.cosine_mean + int8.cosine_mean) / 2
    tight = run_auto(recipe, tmp_path / "run", budgets=["accuracy_drop=100", f"min_cosine={between}"],
                     backend="inline")
    assert tight.auto.chosen == by_n[0].trial
