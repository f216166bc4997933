"""Helpers of the crash tests: kill a real `edgepack run` inside a given stage, and check a run folder deeply.

A stage writes into `.tmp-<folder>-<pid>` (the report into `.tmp-report-<pid>`) for as long as it works, so a
poll of the run folder tells which stage is running: `run_and_kill` SIGKILLs the process group a set time after
the target's temporary folder appears, and checks it was still there (the kill landed inside the stage).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from edgepack.artifacts import read_manifest, sha256_file

POLL_S = 0.01


def stage_of(tmp_name: str) -> str:
    """'.tmp-export-0c62bb559e66-1234' -> 'export-0c62bb559e66'; '.tmp-report-1234' -> 'report'."""
    return tmp_name.removeprefix(".tmp-").rsplit("-", 1)[0]


@dataclass
class Watch:
    """When each stage's temporary folder was first and last seen (seconds since start)."""

    seen: dict[str, list[float]] = field(default_factory=dict)
    order: list[str] = field(default_factory=list)

    def poll(self, out: Path, now: float) -> None:
        try:
            names = [e.name for e in os.scandir(out) if e.name.startswith(".tmp-")]
        except FileNotFoundError:
            return
        for name in names:
            stage = stage_of(name)
            if stage not in self.seen:
                self.seen[stage] = [now, now]
                self.order.append(stage)
            self.seen[stage][1] = now

    def lifetime(self, stage: str) -> float:
        first, last = self.seen[stage]
        return last - first


def command(recipe: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "edgepack.cli", "run", str(recipe), "--out", str(out)]


def run_watched(recipe: Path, out: Path, *, timeout: float = 900) -> Watch:
    """Run to completion, recording every stage's temporary folder."""
    watch = Watch()
    start = time.monotonic()
    with subprocess.Popen(command(recipe, out), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) as proc:
        while proc.poll() is None:
            watch.poll(out, time.monotonic() - start)
            if time.monotonic() - start > timeout:
                proc.kill()
                raise TimeoutError(f"edgepack run did not finish in {timeout} s")
            time.sleep(POLL_S)
        err = proc.stderr.read().decode() if proc.stderr else ""
    if proc.returncode != 0:
        raise AssertionError(f"edgepack run failed ({proc.returncode}): {err[-2000:]}")
    return watch


@dataclass(frozen=True)
class Kill:
    stage: str
    after_s: float  # how long after the stage's temporary folder appeared
    inside: bool  # the folder was still there when the signal went


def run_and_kill(recipe: Path, out: Path, *, stage: str, after_s: float, timeout: float = 900) -> Kill:
    """Start `edgepack run` in its own process group and SIGKILL the group `after_s` into `stage`."""
    start = time.monotonic()
    proc = subprocess.Popen(command(recipe, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    appeared = None
    try:
        while proc.poll() is None and time.monotonic() - start < timeout:
            tmps = _tmp_folders(out, stage)
            now = time.monotonic()
            if tmps and appeared is None:
                appeared = now
            if appeared is not None and now - appeared >= after_s:
                inside = bool(_tmp_folders(out, stage))
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                return Kill(stage, round(now - appeared, 3), inside)
            time.sleep(POLL_S)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    raise AssertionError(f"edgepack run ended (rc {proc.returncode}) before {after_s:.2f} s into stage {stage} "
                         f"(its folder {'appeared' if appeared else 'never appeared'})")


def _tmp_folders(out: Path, stage: str) -> list[str]:
    try:
        return [e.name for e in os.scandir(out) if e.name.startswith(".tmp-") and stage_of(e.name) == stage]
    except FileNotFoundError:
        return []


# ------------------------------------------------------------------------------------------------------ checks


def check_nothing_partial(out: Path) -> list[str]:
    """Every entry of `out` whose name does not start with '.' is whole: stage folders have a manifest whose
    every file has its sha256, JSON parses, PNGs end in IEND, report.json validates. Returns the problems."""
    from edgepack.report.model import Report

    problems = []
    for entry in sorted(out.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_dir() and (entry / "manifest.json").exists():
            problems += _check_stage_folder(entry)
        elif entry.is_dir():
            problems += [f"{p}: truncated" for p in entry.rglob("*") if p.is_file() and not _whole_file(p)]
        elif entry.name == "report.json":
            try:
                Report.model_validate_json(entry.read_text())
            except Exception as err:  # any failure to read it back is a partial report
                problems.append(f"{entry}: {type(err).__name__}")
        elif not _whole_file(entry):
            problems.append(f"{entry}: truncated")
    return problems


def _check_stage_folder(folder: Path) -> list[str]:
    manifest = read_manifest(folder)
    if manifest is None:
        return [f"{folder}: has a manifest.json but is not complete"]
    bad = [f"{folder / name}: sha256 differs" for name, entry in manifest["outputs"].items()
           if sha256_file(folder / name) != entry["sha256"]]
    listed = set(manifest["outputs"]) | {"manifest.json"}
    extra = [p for p in folder.rglob("*") if p.is_file() and p.relative_to(folder).as_posix() not in listed]
    return bad + [f"{p}: not in the manifest" for p in extra]


def _whole_file(path: Path) -> bool:
    data = path.read_bytes()
    if path.suffix == ".png":
        return data.startswith(b"\x89PNG") and data.endswith(b"IEND\xaeB`\x82")
    if path.suffix == ".json":
        try:
            json.loads(data)
        except ValueError:
            return False
    if path.suffix == ".html":
        return data.rstrip().endswith(b"</html>")
    return bool(data)


def leftovers(out: Path) -> dict[str, int]:
    """Dot-named entries of `out` and their bytes (what an interrupted run left behind)."""
    found = {}
    for entry in out.iterdir():
        if entry.name.startswith("."):
            files = [entry] if entry.is_file() else [p for p in entry.rglob("*") if p.is_file()]
            found[entry.name] = sum(p.stat().st_size for p in files)
    return found


def stage_outputs(out: Path) -> dict[str, dict[str, tuple[str, int]]]:
    """folder -> {file: (sha256, size)} of every finished stage folder (from its manifest)."""
    result = {}
    for folder in sorted(out.iterdir()):
        manifest = read_manifest(folder) if folder.is_dir() else None
        if manifest is not None:
            result[folder.name] = {name: (entry["sha256"], entry["size_bytes"])
                                   for name, entry in manifest["outputs"].items()}
    return result
