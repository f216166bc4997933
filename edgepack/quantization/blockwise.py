"""Block-wise integer weights in ONNX Runtime's MatMulNBits / GatherBlockQuantized layout, and GPTQ rounding.

A MatMul weight W (K, N) is quantized per output column n in blocks of `block_size` consecutive input rows k:
    w = (q - zero_point) * scale,  q in 0 .. 2^bits - 1
stored as MatMulNBits wants it: `B` uint8 (N, K / block, block * bits / 8) (two 4-bit codes per byte, low nibble
first), `scales` float (N, K / block), `zero_points` uint8 (N, ceil(K / block * bits / 8)) packed the same way, or
none for symmetric weights (ONNX Runtime then takes 2^(bits-1): 8 for INT4, 128 for INT8).

The same bytes serve a tied embedding table E (V, H) = lm_head^T: GatherBlockQuantized reads `B` reshaped to
(V, H * bits / 8), with the scales (V, H / block) and zero points, quantize_axis 1.

Rounding:
- `rtn`: round to nearest on a min/max grid (asymmetric: [min, max] of the block, without forcing 0 into it;
  symmetric: the block's largest magnitude maps to -2^(bits-1), as ONNX Runtime's own symmetric quantizer does),
  with an optional search over range shrink factors that minimises the block's squared error (`clip_search`);
- `gptq`: GPTQ (Frantar et al. 2022), our numpy implementation: columns quantized one at a time in input order,
  each one's rounding error spread over the not-yet-quantized inputs through the inverse Hessian H = X^T X of the
  layer's calibration inputs; group scales are set when a group starts, from the weights as updated so far.
ONNX Runtime's own quantizers (`MatMulNBitsQuantizer`: DEFAULT, HQQ, and GPTQ through its bundled Neural Compressor
code) cover 4-bit only for HQQ/GPTQ, force 0 into the asymmetric range and leave a tied lm_head unquantized; ours
write the same operator for 4 and 8 bits.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgepack.errors import BadInputError

SHRINKS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)


@dataclass(frozen=True)
class BlockSpec:
    bits: int = 4
    block_size: int = 32
    symmetric: bool = True
    #: search range shrink factors per block (min squared error) instead of the plain min/max
    clip_search: bool = False

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise BadInputError(f"weight-only bits {self.bits}: MatMulNBits here takes 4 or 8")
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise BadInputError(f"weight-only block_size {self.block_size}: MatMulNBits needs a power of two >= 16 "
                                "(16, 32, 64, 128, 256)")

    @property
    def levels(self) -> int:
        return 2**self.bits - 1

    @property
    def default_zero(self) -> int:
        return 2 ** (self.bits - 1)


@dataclass
class BlockQuantized:
    """Integer codes (N, K) uint8, scales (N, K / block) float32, zero points (N, K / block) uint8."""

    codes: np.ndarray
    scales: np.ndarray
    zeros: np.ndarray
    spec: BlockSpec

    def dequantize(self) -> np.ndarray:
        """W' (K, N) float32."""
        block = self.spec.block_size
        n, k = self.codes.shape
        codes = self.codes.reshape(n, k // block, block).astype(np.float32)
        values = (codes - self.zeros[..., None]) * self.scales[..., None]
        return values.reshape(n, k).T.copy()


def check_divides(spec: BlockSpec, width: int, *, where: str) -> None:
    if width % spec.block_size:
        raise BadInputError(f"weight-only block_size {spec.block_size} does not divide the input width {width} of "
                            f"{where}; choose a block size that divides {width} (e.g. "
                            f"{_divisors(width)})")


def _divisors(width: int) -> str:
    found = [b for b in (16, 32, 64, 128, 256) if width % b == 0]
    return ", ".join(map(str, found)) if found else "none of 16..256: exclude this node"


def grid(blocks: np.ndarray, spec: BlockSpec, shrink: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """(scale, zero point) per block of `blocks` (..., block): min/max (or largest magnitude) times `shrink`."""
    if spec.symmetric:
        extreme = np.take_along_axis(blocks, np.abs(blocks).argmax(-1)[..., None], -1)[..., 0] * shrink
        scale = extreme / -spec.default_zero  # the extreme maps to code 0 (-2^(bits-1) after the zero point)
        zero = np.full(scale.shape, spec.default_zero, np.float32)
    else:
        low, high = blocks.min(-1) * shrink, blocks.max(-1) * shrink
        scale = (high - low) / spec.levels
        zero = np.clip(np.round(-low / np.where(scale == 0, 1, scale)), 0, spec.levels)
    scale = np.where(scale == 0, 1e-8, scale).astype(np.float32)
    return scale, zero.astype(np.float32)


def _codes(blocks: np.ndarray, scale: np.ndarray, zero: np.ndarray, spec: BlockSpec) -> np.ndarray:
    return np.clip(np.round(blocks / scale[..., None]) + zero[..., None], 0, spec.levels)


def quantize_rtn(weight: np.ndarray, spec: BlockSpec) -> BlockQuantized:
    """Round to nearest; weight (K, N)."""
    k, n = weight.shape
    blocks = weight.T.reshape(n, k // spec.block_size, spec.block_size).astype(np.float32)  # (N, K/b, b)
    best = None
    for shrink in SHRINKS if spec.clip_search else (1.0,):
        scale, zero = grid(blocks, spec, shrink)
        codes = _codes(blocks, scale, zero, spec)
        error = ((codes - zero[..., None]) * scale[..., None] - blocks) ** 2
        error = error.sum(-1)
        if best is None:
            best = [scale, zero, codes, error]
            continue
        better = error < best[3]
        best[0] = np.where(better, scale, best[0])
        best[1] = np.where(better, zero, best[1])
        best[2] = np.where(better[..., None], codes, best[2])
        best[3] = np.minimum(error, best[3])
    assert best is not None
    scale, zero, codes, _ = best
    return BlockQuantized(codes.reshape(n, k).astype(np.uint8), scale, zero.astype(np.uint8), spec)


def quantize_gptq(weight: np.ndarray, hessian: np.ndarray, spec: BlockSpec, *, damp: float = 0.01,
                  columns: int = 128) -> BlockQuantized:
    """GPTQ rounding of weight (K, N) for inputs whose second moment is `hessian` (K, K) = X^T X / n."""
    return quantize_gptq_batch(weight[None], hessian[None], spec, damp=damp, columns=columns)[0]


def quantize_gptq_batch(weights: np.ndarray, hessians: np.ndarray, spec: BlockSpec, *, damp: float = 0.01,
                        columns: int = 128) -> list[BlockQuantized]:
    """GPTQ of B weights of one shape (B, K, N) with their Hessians (B, K, K) at once: the column loop is
    sequential, so batching the layers that share a shape (every layer's qkv, ...) runs it once for all of them."""
    batch, k, n = weights.shape
    wt = np.ascontiguousarray(weights.transpose(0, 2, 1), dtype=np.float32)  # (B, N, K): rows quantized along K
    hinv = np.stack([_inverse_factor(h, wt[b], damp) for b, h in enumerate(hessians)])  # (B, K, K) upper
    groups = k // spec.block_size
    scales = np.zeros((batch, n, groups), np.float32)
    zeros = np.zeros((batch, n, groups), np.float32)
    codes = np.zeros((batch, n, k), np.float32)
    for start in range(0, k, columns):
        stop = min(start + columns, k)
        block = wt[:, :, start:stop].copy()  # (B, N, c)
        errors = np.zeros_like(block)
        inverse = hinv[:, start:stop, start:stop]  # (B, c, c)
        for i in range(stop - start):
            col = start + i
            group = col // spec.block_size
            if col % spec.block_size == 0:
                inside = block[:, :, i: i + spec.block_size]  # the group's columns, as updated so far
                span = inside if inside.shape[2] == spec.block_size else np.concatenate(
                    [inside, wt[:, :, stop: stop + spec.block_size - inside.shape[2]]], axis=2)
                scale, zero = quantize_rtn_group(span.reshape(batch * n, -1), spec)
                scales[:, :, group], zeros[:, :, group] = scale.reshape(batch, n), zero.reshape(batch, n)
            q = np.clip(np.round(block[:, :, i] / scales[:, :, group]) + zeros[:, :, group], 0, spec.levels)
            codes[:, :, col] = q
            error = (block[:, :, i] - (q - zeros[:, :, group]) * scales[:, :, group]) / inverse[:, i, i][:, None]
            block[:, :, i:] -= error[:, :, None] * inverse[:, None, i, i:]
            errors[:, :, i] = error
        wt[:, :, stop:] -= errors @ hinv[:, start:stop, stop:]
    return [BlockQuantized(codes[b].astype(np.uint8), scales[b], zeros[b].astype(np.uint8), spec)
            for b in range(batch)]


def _inverse_factor(hessian: np.ndarray, wt: np.ndarray, damp: float) -> np.ndarray:
    """Upper Cholesky factor of the damped inverse Hessian; inputs never seen (zero diagonal) get weight 0."""
    h = hessian.astype(np.float64).copy()
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    wt[:, dead] = 0.0
    h[np.diag_indices(len(h))] += damp * np.mean(np.diag(h))
    return np.linalg.cholesky(np.linalg.inv(h)).T.astype(np.float32)


def quantize_rtn_group(span: np.ndarray, spec: BlockSpec) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point of one group (N, block) with the spec's grid (and shrink search)."""
    blocks = span[:, None, :].astype(np.float32)
    best_scale, best_zero, best_error = None, None, None
    for shrink in SHRINKS if spec.clip_search else (1.0,):
        scale, zero = grid(blocks, spec, shrink)
        codes = _codes(blocks, scale, zero, spec)
        error = (((codes - zero[..., None]) * scale[..., None] - blocks) ** 2).sum(-1)[:, 0]
        if best_error is None:
            best_scale, best_zero, best_error = scale[:, 0], zero[:, 0], error
            continue
        better = error < best_error
        best_scale = np.where(better, scale[:, 0], best_scale)
        best_zero = np.where(better, zero[:, 0], best_zero)
        best_error = np.minimum(error, best_error)
    return best_scale, best_zero


# ----------------------------------------------------------------------------------------------- ORT layout


def pack(values: np.ndarray, bits: int) -> np.ndarray:
    """uint8 codes (..., M) -> bytes (..., ceil(M * bits / 8)): two 4-bit codes per byte, the first in the low nibble."""
    if bits == 8:
        return values.astype(np.uint8)
    if values.shape[-1] % 2:
        values = np.concatenate([values, np.zeros((*values.shape[:-1], 1), values.dtype)], axis=-1)
    low, high = values[..., 0::2].astype(np.uint8), values[..., 1::2].astype(np.uint8)
    return (low | (high << 4)).astype(np.uint8)


def matmul_nbits_arrays(q: BlockQuantized) -> dict[str, np.ndarray]:
    """B (N, K / block, block * bits / 8), scales (N * K / block,), zero_points (packed) when asymmetric."""
    n, k = q.codes.shape
    spec = q.spec
    blocks = k // spec.block_size
    arrays = {"B": pack(q.codes, spec.bits).reshape(n, blocks, spec.block_size * spec.bits // 8),
              "scales": q.scales.reshape(-1).astype(np.float32)}
    if not spec.symmetric:
        arrays["zero_points"] = pack(q.zeros, spec.bits).reshape(-1)
    return arrays
