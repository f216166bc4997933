"""Crash safety: SIGKILL at every step of the stage runner's swap, and in each stage of a real `edgepack run`.

No mocks of the failure: the processes are really killed (SIGKILL, nothing runs after it), then rerun.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.crash_tools import (
    check_nothing_partial,
    leftovers,
    run_and_kill,
    run_watched,
    stage_outputs,
)

# A stage run by the real runner in a child that SIGKILLs itself at its N-th file-system step (every rename,
# replace, rmtree, fsync and file write of the runner, and between the files the stage writes).
_CHILD = r"""
import os, shutil, signal, sys
from pathlib import Path

folder, version, kill_at = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
steps = 0

def step():
    global steps
    steps += 1
    if steps == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)

def counted(fn):
    def wrapper(*args, **kwargs):
        step()
        return fn(*args, **kwargs)
    return wrapper

for module, name in ((os, "rename"), (os, "replace"), (os, "fsync"), (shutil, "rmtree")):
    setattr(module, name, counted(getattr(module, name)))

from edgepack.runner import run_stage

def work(tmp):
    for i in range(3):
        step()
        (tmp / f"part{i}.bin").write_bytes(version.encode() * 4096)
    step()
    return {"version": version}

run_stage("demo", {"version": version}, {}, work, folder=folder)
print(steps)
"""


def _run_child(folder: Path, version: str, kill_at: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _CHILD, str(folder), version, str(kill_at)],
                          capture_output=True, text=True, timeout=60)


def _content(folder: Path) -> str | None:
    """The version a complete folder holds ('old' / 'new'), or None when it is missing."""
    from edgepack.artifacts import read_manifest, sha256_file

    if not folder.exists():
        return None
    manifest = read_manifest(folder)
    assert manifest is not None, f"{folder} exists but is not a complete stage folder"
    assert all(sha256_file(folder / n) == e["sha256"] for n, e in manifest["outputs"].items())
    return manifest["metrics"]["version"]


def test_a_kill_at_every_step_of_a_stage_and_its_swap_leaves_the_old_or_the_new_folder(tmp_path):
    """`edgepack bundle --out B` over an existing B: whatever step the kill hits, B is the old complete folder
    or the new one (or, between the two renames, absent, with the old one put back by the next run), and the
    rerun finishes with the new one and nothing left beside it."""
    pristine = tmp_path / "pristine" / "out"
    assert _run_child(pristine, "old", 0).returncode == 0
    outcomes = {}
    kill_at = 1
    while True:
        work = tmp_path / f"k{kill_at}"
        shutil.copytree(pristine.parent, work)
        folder = work / "out"
        killed = _run_child(folder, "new", kill_at)
        if killed.returncode == 0:  # the run had fewer steps than kill_at: every step has been hit
            break
        assert killed.returncode == -signal.SIGKILL, killed.stderr
        state = _content(folder)
        outcomes[kill_at] = state
        rerun = _run_child(folder, "new", 0)
        assert rerun.returncode == 0, rerun.stderr
        assert _content(folder) == "new"
        assert [p.name for p in work.iterdir()] == ["out"], f"left beside the folder: {list(work.iterdir())}"
        kill_at += 1
    assert kill_at > 8, "the child should pass through the stage's writes, fsyncs and the swap's renames"
    assert set(outcomes.values()) <= {"old", "new", None}
    assert "old" in outcomes.values() and "new" in outcomes.values()
    print(f"kills: {len(outcomes)}, states seen: {outcomes}")


def test_leftovers_of_dead_processes_are_cleared_and_live_ones_kept(tmp_path):
    from edgepack.artifacts import clear_interrupted

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    final = tmp_path / "export-abc"
    for name in (f".tmp-export-abc-{dead}", ".tmp-export-abc-1", f".tmp-export-abcd-{dead}"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.onnx").write_bytes(b"x" * 1000)
    assert clear_interrupted(final) == 1000
    # pid 1 is alive (another run could be writing); another stage's folder is not ours to touch
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tmp-export-abc-1", f".tmp-export-abcd-{dead}"]


# ------------------------------------------------------------------------------------------------ kill matrix


def crash_recipe(model: Path, data: Path) -> dict:
    """Every stage on the tiny BERT: export, distill, prune, export of the student, quantize, validate, bundle."""
    return {"name": "crash", "model": {"path": str(model)},
            "data": {"path": str(data), "n_calibration": 24, "n_evaluation": 8},
            "distill": {"enabled": True, "keep_layers": [1], "ffn_ratio": 0.5, "epochs": 1, "batch_size": 8},
            "prune": {"enabled": True, "heads_ratio": 0.5, "calibration_samples": 8, "calibration_batch_size": 8,
                      "measure_dense_effect": False},
            "quantize": {"budget_samples": 8},
            "validate": {"warmup": 1, "runs": 3, "sequence_length": 32},
            "bundle": {"samples": 2}, "gates": {"min_cosine": None}}


#: stage folders whose files record a measurement (latencies, temporary probe names), not an artifact
MEASUREMENTS = ("validate-",)


def _report_facts(out: Path) -> dict:
    """What report.json says that does not depend on timing: files, sizes, hashes, metrics, gates."""
    report = json.loads((out / "report.json").read_text())
    return {name: {"path": v["path"], "sha256": v["sha256"], "size": v["size_bytes"],
                   "metrics": {ep: e.get("metrics") for ep, e in v["providers"].items()}}
            for name, v in report["variants"].items()} | {"bundle": report.get("bundle"),
                                                          "gates": report["gates"]}


@pytest.mark.slow
def test_sigkill_in_each_stage_then_rerun_gives_the_uninterrupted_artifacts(tiny_bert_dir, small_sentences,
                                                                          tmp_path):
    """Kill `edgepack run` (the whole process group) in export, distill, prune, the student's export, quantize,
    validate, bundle and the report, in turn: after every kill nothing that looks finished is partial, each
    rerun reuses what was finished and goes on, and the last one ends with the bytes of an uninterrupted run."""
    recipe = tmp_path / "crash.yaml"
    recipe.write_text(yaml.safe_dump(crash_recipe(tiny_bert_dir, small_sentences)))
    watch = run_watched(recipe, tmp_path / "reference")
    stages = watch.order
    assert [s.split("-")[0] for s in stages] == ["export", "distill", "prune", "export", "quantize", "validate",
                                                 "bundle", "report"], stages

    out = tmp_path / "killed"
    kills, finished = [], {}
    for stage in stages:
        kill = run_and_kill(recipe, out, stage=stage, after_s=0.4 * watch.lifetime(stage))
        assert kill.inside, f"the kill came after stage {stage} had finished: make the test's delay shorter"
        kills.append(kill)
        assert check_nothing_partial(out) == []
        assert not (out / stage).exists() and not (stage == "report" and (out / "report.json").exists())
        for name, stamp in finished.items():  # what was finished before is reused, never redone
            assert (out / name / "manifest.json").stat().st_mtime_ns == stamp, f"{name} was rewritten"
        finished = {p.name: (p / "manifest.json").stat().st_mtime_ns for p in out.iterdir()
                    if (p / "manifest.json").is_file()}
    run_watched(recipe, out)

    reference, result = stage_outputs(tmp_path / "reference"), stage_outputs(out)
    assert reference.keys() == result.keys()
    compared = lost = 0
    for folder, files in reference.items():
        if folder.startswith(MEASUREMENTS):
            assert len(result[folder]) == len(files)
            continue
        for name, (sha, size) in files.items():
            compared += 1
            if result[folder].get(name, (None, 0))[0] != sha:
                lost += size
    assert lost == 0
    assert _report_facts(out) == _report_facts(tmp_path / "reference")
    assert leftovers(out) == {} and check_nothing_partial(out) == []
    print(f"kills survived: {len(kills)} ({', '.join(f'{k.stage} +{k.after_s:.2f}s' for k in kills)}); "
          f"artifacts compared: {compared} files + report facts; bytes lost: {lost}")
