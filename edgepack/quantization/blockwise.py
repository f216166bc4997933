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
    #: "minmax": the block's range (optionally shrunk, `clip_search`); "mse": a search over scales and integer zero
    #: points, each scale refitted by least squares for its codes, minimising the block's squared error weighted by
    #: each input's second moment (the Hessian diagonal: GPTQ's output error of that block alone)
    grid: str = "minmax"

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise BadInputError(f"weight-only bits {self.bits}: MatMulNBits here takes 4 or 8")
        if self.grid not in ("minmax", "mse"):
            raise BadInputError(f"weight-only grid {self.grid!r}: choose minmax or mse")
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


def quantize_rtn(weight: np.ndarray, spec: BlockSpec, importance: np.ndarray | None = None) -> BlockQuantized:
    """Round to nearest; weight (K, N); `importance` (K,): the inputs' second moments (grid "mse" weights)."""
    k, n = weight.shape
    blocks = weight.T.reshape(n, k // spec.block_size, spec.block_size).astype(np.float32)  # (N, K/b, b)
    if spec.grid == "mse":
        weights = np.ones(k, np.float32) if importance is None else importance.astype(np.float32)
        scale, zero = mse_grid(blocks, weights.reshape(1, k // spec.block_size, spec.block_size), spec)
        codes = _codes(blocks, scale, zero, spec)
        return BlockQuantized(codes.reshape(n, k).astype(np.uint8), scale, zero.astype(np.uint8), spec)
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
                  columns: int | None = None, act_order: bool = False) -> BlockQuantized:
    """GPTQ rounding of weight (K, N) for inputs whose second moment is `hessian` (K, K) = X^T X / n."""
    return quantize_gptq_batch(weight[None], hessian[None], spec, damp=damp, columns=columns, act_order=act_order)[0]


def quantize_gptq_batch(weights: np.ndarray, hessians: np.ndarray, spec: BlockSpec, *, damp: float = 0.01,
                        columns: int | None = None, act_order: bool = False) -> list[BlockQuantized]:
    """GPTQ of B weights of one shape (B, K, N) with their Hessians (B, K, K) at once: the column loop is
    sequential, so batching the layers that share a shape (every layer's qkv, ...) runs it once for all of them.

    `act_order`: columns in order of decreasing Hessian diagonal (the inputs with the most energy first, so their
    errors are spread over the most others), with static groups: each block's scale and zero point from the original
    weights before any update (MatMulNBits' plain layout has no g_idx on its fast path: the codes stay in input
    order). Without it, a group's grid is set when its first column comes, from the weights as updated so far.
    `columns`: the lazy-update width (default: the block size, at least 32; the result is the same up to float
    rounding: a narrower one moves work from numpy's per-column updates into one matrix product per chunk)."""
    batch, k, n = weights.shape
    columns = columns or max(spec.block_size, 32)
    wt = np.ascontiguousarray(weights.transpose(0, 2, 1), dtype=np.float32)  # (B, N, K): rows quantized along K
    diag = np.stack([np.diag(h) for h in hessians]).astype(np.float32)  # (B, K)
    groups = k // spec.block_size
    order = np.stack([np.argsort(-d, kind="stable") for d in diag]) if act_order else \
        np.broadcast_to(np.arange(k), (batch, k))
    scales = np.zeros((batch, n, groups), np.float32)
    zeros = np.zeros((batch, n, groups), np.float32)
    if act_order:  # static groups from the original weights
        for group in range(groups):
            cols = slice(group * spec.block_size, (group + 1) * spec.block_size)
            scale, zero = quantize_rtn_group(wt[:, :, cols].reshape(batch * n, -1), spec,
                                             np.repeat(diag[:, cols], n, axis=0))
            scales[:, :, group], zeros[:, :, group] = scale.reshape(batch, n), zero.reshape(batch, n)
        wt = np.take_along_axis(wt, order[:, None, :], axis=2)
        hessians = np.stack([h[o][:, o] for h, o in zip(hessians, order, strict=True)])
    hinv = np.stack([_inverse_factor(h, wt[b], damp) for b, h in enumerate(hessians)])  # (B, K, K) upper
    codes = np.zeros((batch, n, k), np.float32)
    rows = np.arange(batch)
    for start in range(0, k, columns):
        stop = min(start + columns, k)
        block = wt[:, :, start:stop].copy()  # (B, N, c)
        errors = np.zeros_like(block)
        inverse = hinv[:, start:stop, start:stop]  # (B, c, c)
        for i in range(stop - start):
            col = start + i
            if not act_order and col % spec.block_size == 0:
                _dynamic_group(block, wt, diag, scales, zeros, i=i, col=col, stop=stop, spec=spec)
            group = order[:, col] // spec.block_size  # (B,)
            scale, zero = scales[rows, :, group], zeros[rows, :, group]  # (B, N)
            q = np.clip(np.round(block[:, :, i] / scale) + zero, 0, spec.levels)
            codes[rows, :, order[:, col]] = q
            error = (block[:, :, i] - (q - zero) * scale) / inverse[:, i, i][:, None]
            block[:, :, i:] -= error[:, :, None] * inverse[:, None, i, i:]
            errors[:, :, i] = error
        wt[:, :, stop:] -= errors @ hinv[:, start:stop, stop:]
    return [BlockQuantized(codes[b].astype(np.uint8), scales[b], zeros[b].astype(np.uint8), spec)
            for b in range(batch)]


def _dynamic_group(block: np.ndarray, wt: np.ndarray, diag: np.ndarray, scales: np.ndarray, zeros: np.ndarray, *,
                   i: int, col: int, stop: int, spec: BlockSpec) -> None:
    """The grid of the group starting at column `col`, from its columns as updated so far (in place)."""
    batch, n = block.shape[:2]
    inside = block[:, :, i: i + spec.block_size]
    span = inside if inside.shape[2] == spec.block_size else np.concatenate(
        [inside, wt[:, :, stop: stop + spec.block_size - inside.shape[2]]], axis=2)
    importance = np.repeat(diag[:, col: col + spec.block_size], n, axis=0)
    scale, zero = quantize_rtn_group(span.reshape(batch * n, -1), spec, importance)
    group = col // spec.block_size
    scales[:, :, group], zeros[:, :, group] = scale.reshape(batch, n), zero.reshape(batch, n)


def _inverse_factor(hessian: np.ndarray, wt: np.ndarray, damp: float) -> np.ndarray:
    """Upper Cholesky factor of the damped inverse Hessian; inputs never seen (zero diagonal) get weight 0."""
    h = hessian.astype(np.float64).copy()
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    wt[:, dead] = 0.0
    h[np.diag_indices(len(h))] += damp * np.mean(np.diag(h))
    return np.linalg.cholesky(np.linalg.inv(h)).T.astype(np.float32)


def quantize_rtn_group(span: np.ndarray, spec: BlockSpec, importance: np.ndarray | None = None
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point of one group (N, block) with the spec's grid (and shrink search); `importance`
    (N, block): the weights of grid "mse"'s squared error."""
    blocks = span[:, None, :].astype(np.float32)
    if spec.grid == "mse":
        weights = np.ones_like(blocks) if importance is None else importance[:, None, :].astype(np.float32)
        scale, zero = mse_grid(blocks, weights, spec)
        return scale[:, 0], zero[:, 0]
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


MSE_FACTORS = np.linspace(0.75, 1.05, 13, dtype=np.float32)  # candidate scales, x the min/max grid's


def mse_grid(blocks: np.ndarray, weights: np.ndarray, spec: BlockSpec) -> tuple[np.ndarray, np.ndarray]:
    """(scale, zero point) per block of `blocks` (..., block) minimising sum(weights * (w - w')^2) with an integer
    zero point (MatMulNBits' fast path takes uint8 zero points only): candidate scales around the min/max grid's,
    each zero point rounded and its neighbours tried, the scale then refitted by least squares for those codes
    (llama.cpp's make_qkx search, with the zero point on the integer grid)."""
    base, base_zero = grid(blocks, spec)
    best_scale, best_zero = base, base_zero
    best_error = _weighted_error(blocks, weights, base, base_zero, spec)
    low = blocks.min(-1)
    for factor in MSE_FACTORS:
        scale = base * factor
        if spec.symmetric:
            candidates = [base_zero]
        else:
            centre = np.round(-low / scale)
            candidates = [np.clip(centre + dz, 0, spec.levels) for dz in (-1.0, 0.0, 1.0)]
        for zero in candidates:
            shifted = _codes(blocks, scale, zero, spec) - zero[..., None]
            fitted = (weights * blocks * shifted).sum(-1) / np.maximum((weights * shifted * shifted).sum(-1), 1e-30)
            fitted = np.where(np.abs(fitted) < 1e-12, scale, fitted).astype(np.float32)
            error = _weighted_error(blocks, weights, fitted, zero, spec)
            better = error < best_error
            best_scale = np.where(better, fitted, best_scale)
            best_zero = np.where(better, zero, best_zero)
            best_error = np.minimum(error, best_error)
    return best_scale.astype(np.float32), best_zero.astype(np.float32)


def _weighted_error(blocks: np.ndarray, weights: np.ndarray, scale: np.ndarray, zero: np.ndarray,
                    spec: BlockSpec) -> np.ndarray:
    codes = _codes(blocks, scale, zero, spec)
    return (weights * ((codes - zero[..., None]) * scale[..., None] - blocks) ** 2).sum(-1)


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
