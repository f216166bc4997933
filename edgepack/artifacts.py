"""Artifact folders: content-hashed names, atomic creation, manifest.json with sha256 of every output.

A stage writes into `.tmp-<name>-<pid>` beside its final folder and renames it when complete, so a crash
never leaves a folder that looks finished. A folder counts as complete only when its manifest lists files
whose sha256 still match. Before the rename every output and the manifest are fsynced, and the parent folder
after it, so the rename is durable too. What a killed process leaves (`.tmp-*` of a dead pid, an `.old-*`
folder moved aside mid-swap) is cleared by the next run of that stage (`clear_interrupted`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import platform
import shutil
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from edgepack import __version__
from edgepack.errors import BadInputError

MANIFEST = "manifest.json"


def sha256_file(path: Path, *, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def content_hash(payload: Any, *, length: int = 12) -> str:
    """Stable short hash of a JSON-able payload (stage config + input hashes + version)."""
    text = json.dumps(payload, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def tool_versions() -> dict[str, str]:
    """Versions of the tools that made an artifact; a module not imported yet is looked up in its package's
    metadata rather than imported (importing torch for its version costs seconds)."""
    import importlib.metadata
    import sys

    versions = {"edgepack": __version__, "python": platform.python_version()}
    for module in ("onnx", "onnxruntime", "torch", "transformers", "numpy"):
        if module in sys.modules:
            versions[module] = sys.modules[module].__version__
            continue
        try:
            versions[module] = importlib.metadata.version(module)
        except importlib.metadata.PackageNotFoundError:  # e.g. onnxruntime from the onnxruntime-gpu package
            with contextlib.suppress(ImportError):
                versions[module] = __import__(module).__version__
    return versions


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to `.<name>.tmp-<pid>`, fsync, rename over `path`: readers see the old file or the new, never part."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path: Path, payload: Any) -> None:
    """Strict JSON: non-finite floats (e.g. the SQNR of identical outputs) become null."""
    text = json.dumps(_finite(payload), indent=2, allow_nan=False, default=_json_default)
    atomic_write_text(path, text + "\n")


def read_json_object(path: Path, *, written_by: str) -> dict[str, Any]:
    """A JSON object file (a config a tool wrote); anything else is one line naming the file and `written_by`."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BadInputError(f"{path}: not readable JSON ({type(err).__name__}); restore the file {written_by} "
                            "wrote") from None
    if not isinstance(data, dict):
        raise BadInputError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


@dataclass
class StageRecord:
    """What a stage writes into its manifest besides the output files."""

    stage: str
    config: Mapping[str, Any]
    inputs: Mapping[str, str]  # name -> sha256
    metrics: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    #: the content hash of stage + config + inputs + version (the runner's cache key)
    key: str = ""
    #: the model the folder holds, as its family records it (`ModelFamily.artifact_record`), so the folder reopens
    model: Mapping[str, Any] | None = None


def read_manifest(folder: Path) -> dict[str, Any] | None:
    """The manifest of a complete artifact folder, or None if missing, unreadable or its files changed."""
    path = folder / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("outputs"), dict):
        return None
    for name, entry in manifest["outputs"].items():
        file = folder / name
        if not isinstance(entry, dict) or not file.is_file() or file.stat().st_size != entry.get("size_bytes"):
            return None
    return manifest


def is_artifact_folder(folder: Path) -> bool:
    """A folder edgepack wrote (its manifest names a stage), complete or not."""
    try:
        return "stage" in json.loads((folder / MANIFEST).read_text())
    except (OSError, UnicodeDecodeError, ValueError, TypeError):
        return False


@contextlib.contextmanager
def stage_folder(final: Path, record: StageRecord) -> Iterator[Path]:
    """Yield a temporary folder to write into; on success hash outputs, write manifest, swap it in as `final`.

    An existing `final` is moved aside first and removed last, so a crash at any point leaves either the old
    complete folder or the new one under `final`, never a partial one (temporary names start with a dot)."""
    final = Path(os.path.abspath(final))  # "." or "out/" have no usable name to put a sibling beside
    final.parent.mkdir(parents=True, exist_ok=True)
    clear_interrupted(final)
    tmp = final.with_name(f".tmp-{final.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    start = time.perf_counter()
    try:
        yield tmp
        outputs = {
            p.relative_to(tmp).as_posix(): {"sha256": sha256_file(p), "size_bytes": p.stat().st_size}
            for p in sorted(tmp.rglob("*"))
            if p.is_file()
        }
        manifest = {
            "stage": record.stage,
            "key": record.key,
            "config": dict(record.config),
            "inputs": dict(record.inputs),
            **({"model": dict(record.model)} if record.model else {}),
            "outputs": outputs,
            "metrics": record.metrics,
            "history": record.history,
            "tool_versions": tool_versions(),
            "wall_time_s": round(time.perf_counter() - start, 3),
            "peak_rss_mb": round(peak_rss_mb(), 1),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        write_json(tmp / MANIFEST, manifest)
        _fsync_files(tmp)
        swap_in(tmp, final)
        _fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def swap_in(tmp: Path, final: Path) -> None:
    """Rename the finished folder into place; an old folder is moved aside first and removed last."""
    if not final.exists():
        os.rename(tmp, final)
        return
    old = final.with_name(f".old-{final.name}-{os.getpid()}")
    shutil.rmtree(old, ignore_errors=True)
    os.rename(final, old)
    try:
        os.rename(tmp, final)
    except OSError:
        os.rename(old, final)  # put the previous folder back before reporting
        raise
    if old.is_dir():
        shutil.rmtree(old)
    else:
        old.unlink()


def _fsync_files(folder: Path) -> None:
    """Outputs on disk before the rename that publishes them (a power cut then leaves old or new, not holes)."""
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # some filesystems cannot open or sync a directory
        descriptor = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def interrupted_leftovers(final: Path) -> list[tuple[str, Path]]:
    """("tmp" | "old", path) of what killed processes left beside `final`: their pid is in the name and is dead.

    A live pid's folders are another run in progress (or a reused pid): left alone."""
    found = []
    for kind in ("tmp", "old"):
        for path in final.parent.glob(f".{kind}-{final.name}-*"):
            pid = path.name.rsplit("-", 1)[-1]
            if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
                found.append((kind, path))
    return sorted(found)


def clear_interrupted(final: Path) -> int:
    """Clear what an interrupted run left beside `final`; return the bytes removed.

    `.tmp-*` folders are partial: removed. An `.old-*` folder is the previous complete folder that a swap moved
    aside just before it was killed: it goes back to `final` when `final` is missing, else it is removed.
    """
    final = Path(os.path.abspath(final))
    removed = 0
    for kind, path in interrupted_leftovers(final):
        if kind == "old" and not final.exists() and read_manifest(path) is not None:
            os.rename(path, final)
            continue
        removed += sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return removed


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (VmHWM on Linux, ru_maxrss elsewhere)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return psutil.Process().memory_info().rss / 2**20
