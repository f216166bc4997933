"""Fidelity of a variant's outputs against the reference's (cosine, max abs diff, SQNR), in plain numpy.

>>> a = np.array([[1.0, 0.0], [0.0, 2.0]])
>>> cosine_rows(a, -a).tolist()
[-1.0, -1.0]
>>> fidelity([{"y": a}], [{"y": a}], output="y")["cosine_min"]
1.0
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from edgepack.errors import EdgepackError


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity per batch row, after flattening all but the batch dim: (B, ...) x (B, ...) -> (B,).

    Computed in float64. A row that is zero in both is identical (1.0); zero in only one has no direction in
    common with the other (0.0).
    """
    if a.shape != b.shape:
        raise EdgepackError(f"cosine_rows: shapes differ, {a.shape} vs {b.shape}")
    rows = a.shape[0] if a.ndim else 1
    a2 = np.asarray(a, dtype=np.float64).reshape(rows, -1)  # (B, N)
    b2 = np.asarray(b, dtype=np.float64).reshape(rows, -1)  # (B, N)
    norms = np.linalg.norm(a2, axis=1) * np.linalg.norm(b2, axis=1)  # (B,)
    dots = np.einsum("bn,bn->b", a2, b2)  # (B,)
    cosine = np.divide(dots, norms, out=np.zeros(rows), where=norms > 0)
    both_zero = ~a2.any(axis=1) & ~b2.any(axis=1)
    cosine[both_zero] = 1.0
    # Rounding can push |cos| a hair above 1.
    return np.clip(cosine, -1.0, 1.0)


def _pairs(reference: Sequence[Mapping[str, np.ndarray]], variant: Sequence[Mapping[str, np.ndarray]],
           output: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """(reference, variant) arrays of `output` per evaluation feed, after checking both sides match up."""
    if len(reference) != len(variant):
        raise EdgepackError(f"output '{output}': reference has {len(reference)} feeds' outputs, variant {len(variant)}")
    if not reference:
        raise EdgepackError(f"output '{output}': no outputs to compare")
    pairs = []
    for index, (ref, var) in enumerate(zip(reference, variant, strict=True)):
        for side, outputs in (("reference", ref), ("variant", var)):
            if output not in outputs:
                raise EdgepackError(f"output '{output}' is missing from the {side}'s feed {index}; "
                                    f"it has {sorted(outputs)}")
        if ref[output].shape != var[output].shape:
            raise EdgepackError(f"output '{output}', feed {index}: shape {ref[output].shape} in the reference, "
                                f"{var[output].shape} in the variant")
        pairs.append((ref[output], var[output]))
    return pairs


def _sqnr_db(signal_power: float, noise_power: float) -> float:
    """10·log10(signal / noise); +inf when the variant is exact (and -inf when only the noise is nonzero)."""
    if noise_power == 0.0:
        return math.inf
    if signal_power == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal_power / noise_power)


def fidelity(reference: Sequence[Mapping[str, np.ndarray]], variant: Sequence[Mapping[str, np.ndarray]],
             *, output: str) -> dict[str, float]:
    """Compare one named output over all evaluation feeds (same order on both sides).

    cosine_mean / cosine_min are over every batch row of every feed; max_abs_diff and sqnr_db over every
    element (SQNR = 10·log10(Σ ref² / Σ (ref − variant)²), +inf when identical).
    """
    pairs = _pairs(reference, variant, output)
    cosines = np.concatenate([cosine_rows(ref, var) for ref, var in pairs])
    if not cosines.size:
        raise EdgepackError(f"output '{output}': every feed has an empty batch; nothing to compare")
    max_abs_diff, signal_power, noise_power = 0.0, 0.0, 0.0
    for ref, var in pairs:
        ref64, diff = ref.astype(np.float64), ref.astype(np.float64) - var.astype(np.float64)
        if diff.size:
            max_abs_diff = max(max_abs_diff, float(np.abs(diff).max()))
        signal_power += float(np.square(ref64).sum())
        noise_power += float(np.square(diff).sum())
    return {
        "cosine_mean": float(cosines.mean()),
        "cosine_min": float(cosines.min()),
        "max_abs_diff": max_abs_diff,
        "sqnr_db": _sqnr_db(signal_power, noise_power),
    }
