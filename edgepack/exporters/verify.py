"""`edgepack verify`: a bundle checked from its own files (sha256 of every file, then every golden vector).

Reads `bundle.json` (what `exporters.bundle` wrote): the files with their sha256, and per variant the .ort model,
its session options, the golden vectors and their tolerances (the rule is in `exporters.bundle`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from edgepack.artifacts import sha256_file
from edgepack.errors import BadInputError
from edgepack.exporters.ort_format import REPLAY_OPTION, ort_session

DESCRIPTION = "bundle.json"
KIND = "edgepack-bundle"


@dataclass
class VerifyResult:
    passed: bool
    vectors: int
    mismatches: list[str]
    provider: str



def read_bundle_description(bundle_dir: Path) -> dict:
    """The bundle.json of a bundle folder; anything else is a BadInputError naming the fix."""
    path = Path(bundle_dir) / DESCRIPTION
    if not path.is_file():
        raise BadInputError(f"{bundle_dir}: no {DESCRIPTION}; this is not an edgepack bundle — build one with "
                            "`edgepack bundle MODEL.onnx --out DIR`")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise BadInputError(f"{path}: not readable JSON ({err}); rebuild the bundle with edgepack bundle") from None
    if not isinstance(manifest, dict) or manifest.get("kind") != KIND:
        raise BadInputError(f"{path}: not an edgepack bundle description (no \"kind\": \"{KIND}\"); "
                            "build one with `edgepack bundle`")
    for key in ("files", "variants"):
        if not isinstance(manifest.get(key), dict):
            raise BadInputError(f"{path}: '{key}' is missing or malformed; rebuild the bundle with edgepack bundle")
    return manifest


def verify_bundle(bundle_dir: Path, *, provider: str = "cpu") -> VerifyResult:
    """Check every file's sha256, then run every golden vector of every variant through the bundle's .ort on
    `provider` (CPU fallback disabled for other EPs, so the EP really runs the whole graph). Collects all mismatches.
    """
    from edgepack.runtime.providers import get_provider

    bundle_dir = Path(bundle_dir)
    manifest = read_bundle_description(bundle_dir)
    ep = get_provider(provider)
    reason = ep.availability()
    if reason is not None:
        raise BadInputError(f"--ep {provider}: {reason}")
    mismatches = check_files(bundle_dir, manifest["files"])
    if mismatches:  # a modified model or vector is not worth running
        return VerifyResult(False, 0, mismatches, provider)
    vectors = 0
    for variant in manifest["variants"].values():
        try:
            session = ort_session(bundle_dir / variant["model"], provider=ep,
                                  replay_runtime_optimizations=REPLAY_OPTION in variant.get("session_options", {}),
                                  disable_cpu_fallback=provider != "cpu")
        except Exception as err:  # ORT's pybind errors share no useful base class
            first = str(err).replace("\n", " ")[:200]
            mismatches.append(f"{variant['model']}: ONNX Runtime could not create a session on {provider} "
                              f"with CPU fallback disabled ({first})")
            continue
        for vector in variant["golden"]["vectors"]:
            vectors += 1
            mismatches += check_vector(session, bundle_dir, vector, variant["golden"]["tolerances"])
    return VerifyResult(not mismatches, vectors, mismatches, provider)


def check_files(bundle_dir: Path, files: Mapping[str, dict]) -> list[str]:
    mismatches = []
    root = bundle_dir.resolve()
    for name, entry in files.items():
        path = bundle_dir / name
        if not path.resolve().is_relative_to(root):
            mismatches.append(f"{name}: lies outside the bundle folder; the manifest was modified — rebuild it "
                              "with edgepack bundle")
        elif not path.is_file():
            mismatches.append(f"{name}: missing; the bundle was modified — rebuild it with edgepack bundle")
        elif (actual := sha256_file(path)) != entry.get("sha256"):
            mismatches.append(f"{name}: sha256 mismatch (manifest {str(entry.get('sha256'))[:12]}…, file "
                              f"{actual[:12]}…); the bundle was modified — rebuild it with edgepack bundle")
    return mismatches


def read_tensors(vector: Path, kind: str) -> tuple[dict[str, np.ndarray], list[str]]:
    """{name: array} of `vector/<kind>_K.pb` in K order, and the names in that order."""
    paths = sorted(vector.glob(f"{kind}_*.pb"), key=lambda p: int(p.stem.rsplit("_", 1)[1]))
    tensors = [onnx.load_tensor(str(path)) for path in paths]
    return {t.name: numpy_helper.to_array(t) for t in tensors}, [t.name for t in tensors]


def check_vector(session: Any, bundle_dir: Path, vector: str, tolerances: Mapping[str, dict]) -> list[str]:
    """Mismatches of one golden vector: output, vector, max |error| vs atol (or shape / dtype / missing output)."""
    feed, _ = read_tensors(bundle_dir / vector, "input")
    golden, names = read_tensors(bundle_dir / vector, "output")
    try:
        results = dict(zip(names, session.run(names, feed), strict=True))
    except Exception as err:  # ORT's pybind errors share no useful base class
        return [f"{vector}: ONNX Runtime failed to run it ({str(err).splitlines()[0][:200]})"]
    mismatches = []
    for name in names:
        got, ref = np.asarray(results[name]), golden[name]
        atol = float(tolerances.get(name, {}).get("atol", 0.0))
        if got.shape != ref.shape or got.dtype != ref.dtype:
            mismatches.append(f"{vector}: output '{name}' is {got.dtype}{list(got.shape)}, golden is "
                              f"{ref.dtype}{list(ref.shape)}")
            continue
        error = max_error(got, ref)
        if error > atol:
            mismatches.append(f"{vector}: output '{name}' max |error| {error:.3g} > atol {atol:.3g}")
    return mismatches


def max_error(got: np.ndarray, ref: np.ndarray) -> float:
    """Max |got - ref| in float64; NaN where both are NaN counts as equal, NaN on one side as infinite error."""
    if got.shape != ref.shape:
        return float("inf")
    if got.dtype.kind not in "iufb":
        return 0.0 if np.array_equal(got, ref) else float("inf")
    a, b = got.astype(np.float64), ref.astype(np.float64)
    diff = np.abs(a - b)
    both_nan = np.isnan(a) & np.isnan(b)
    diff = np.where(both_nan, 0.0, np.where(np.isnan(diff), np.inf, diff))
    return float(diff.max()) if diff.size else 0.0
