"""The one stage runner: every stage (export, distill, prune, quantize, validate, bundle), from a recipe or the CLI.

`run_stage(name, config, inputs, fn)` hashes the stage name, its resolved config and its input hashes (and the
edgepack version) into a key, reuses a finished folder with that key, else lets `fn` write into a temporary folder
and swaps it in with its manifest. The stage itself never hashes, caches or writes a manifest.

>>> import tempfile
>>> root = Path(tempfile.mkdtemp())
>>> first = run_stage("demo", {"x": 1}, {}, lambda tmp: (tmp / "out.txt").write_text("hi") and {"n": 1}, root=root)
>>> again = run_stage("demo", {"x": 1}, {}, lambda tmp: {"n": 2}, root=root)
>>> (again.folder == first.folder, again.reused, again.metrics)
(True, True, {'n': 1})
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgepack import __version__
from edgepack.artifacts import (
    StageRecord,
    clear_interrupted,
    content_hash,
    is_artifact_folder,
    read_manifest,
    stage_folder,
)
from edgepack.errors import BadInputError
from edgepack.reporter import get_reporter

#: fn(tmp) writes the stage's files into `tmp` and returns its metrics (None for none)
StageFn = Callable[[Path], "dict[str, Any] | None"]


@dataclass(frozen=True)
class StageResult:
    folder: Path
    manifest: dict[str, Any]
    reused: bool

    @property
    def metrics(self) -> dict[str, Any]:
        return self.manifest.get("metrics", {})


def stage_key(name: str, config: Mapping[str, Any], inputs: Mapping[str, Any]) -> str:
    """The content hash a stage's folder is named by (and its manifest records)."""
    return content_hash({"stage": name, "cfg": dict(config), "in": dict(inputs), "v": __version__})


def run_stage(name: str, config: Mapping[str, Any], inputs: Mapping[str, Any], fn: StageFn, *,
              root: Path | None = None, folder: Path | None = None, model: Mapping[str, Any] | None = None,
              replace_foreign: bool = False) -> StageResult:
    """Run stage `name` into `root/<name>-<key>` (a pipeline run) or into `folder` (a CLI `--out`).

    A folder whose manifest has the same key is reused as it is. Another edgepack artifact folder at `folder` is
    replaced; a folder edgepack did not write is refused (unless `replace_foreign`), so `--out .` cannot wipe a
    user's files. `model` is the family's record of the model the folder holds (written into the manifest).
    """
    if (root is None) == (folder is None):
        raise ValueError("run_stage needs exactly one of root= or folder=")
    key = stage_key(name, config, inputs)
    target = Path(folder) if folder is not None else Path(root) / f"{name}-{key}"  # type: ignore[arg-type]
    with _building(root, target.name):
        return _run_or_reuse(target, StageRecord(name, config, inputs, key=key, model=model), fn,
                             replace_foreign=replace_foreign)


LOCKS = ".locks"


def share_stage_folders(root: Path) -> None:
    """Mark run folder `root` as shared by parallel builders (`edgepack auto` candidates): from now on one process at
    a time builds a given stage folder there. The lock files stay in `<root>/.locks` (removing one would let two
    processes hold it); a plain `edgepack run` folder has none."""
    (Path(root) / LOCKS).mkdir(parents=True, exist_ok=True)


@contextlib.contextmanager
def _building(root: Path | None, name: str) -> Iterator[None]:
    """In a shared run folder (`share_stage_folders`), one process at a time builds a given stage folder: the others
    wait, then reuse it."""
    locks = Path(root) / LOCKS if root is not None else None
    if locks is None or not locks.is_dir():
        yield
        return
    from filelock import FileLock

    with FileLock(str(locks / f"{name}.lock")):
        yield


def _run_or_reuse(target: Path, record: StageRecord, fn: StageFn, *, replace_foreign: bool) -> StageResult:
    key = record.key
    freed = clear_interrupted(target)  # a folder a killed swap moved aside comes back before the reuse check
    if freed:
        get_reporter().info(f"[dim]removed {freed / 1e6:.1f} MB left by an interrupted {record.stage} stage[/dim]")
    manifest = read_manifest(target)
    if manifest is not None and manifest.get("key") == key:
        get_reporter().info(f"[dim]reusing {target.name} (same config and inputs)[/dim]")
        return StageResult(target, manifest, True)
    _check_replaceable(target, replace_foreign=replace_foreign)
    with stage_folder(target, record) as tmp:
        record.metrics = fn(tmp) or {}
    return StageResult(target, read_manifest(target) or {}, False)


def _check_replaceable(target: Path, *, replace_foreign: bool) -> None:
    if not target.exists():
        return
    if not target.is_dir():
        raise BadInputError(f"{target} is a file; the output of this stage is a folder: choose a new folder name")
    if any(target.iterdir()) and not is_artifact_folder(target) and not replace_foreign:
        raise BadInputError(f"{target} exists and is not an edgepack artifact folder (no manifest.json naming a "
                            "stage); choose a new or empty folder, or pass --force to replace it")
