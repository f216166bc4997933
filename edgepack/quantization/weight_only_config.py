"""Recipe keys of weight-only quantization (`quantize.mode: weight-only`, `quantize.weight_only:`), torch-free.

Each entry of `variants` makes one quantized model, compared to the FP32 it came from:

    quantize:
      mode: weight-only            # auto: the model family's (causal-lm chooses weight-only)
      weight_only:
        calibration_samples: 32
        variants:
          - {name: int8, bits: 8, method: rtn}
          - {name: int4, bits: 4, block_size: 128, method: gptq}
          - {name: int4-mixed, bits: 4, block_size: 128, method: gptq, mixed: {max_perplexity_ratio: 1.05}}
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from edgepack.errors import BadInputError

METHODS = ("rtn", "gptq", "ort-default", "ort-hqq")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class MixedPrecision(_Section):
    """Per-layer INT4/INT8 choice: layers (and lm_head) ranked by what each one costs alone at `bits`, the most
    sensitive kept at `promote_bits` until the calibration fidelity is within the budget. The family says which
    fidelity (`ModelFamily.weight_only_fidelity`): a decoder's calibration perplexity (`max_perplexity_ratio`), an
    encoder's primary output cosine to FP32 (`max_cosine_drop`)."""

    max_perplexity_ratio: float = Field(1.05, gt=1.0)
    #: encoders, classifiers: 1 - mean cosine of the primary output vs FP32 on the calibration texts, at most this
    max_cosine_drop: float = Field(0.005, gt=0.0, lt=1.0)
    promote_bits: Literal[8] = 8
    #: calibration texts the per-unit ranking reads (the budget itself is checked on all of them)
    sensitivity_samples: int = Field(8, ge=1)


class WeightOnlyVariant(_Section):
    name: str = "int4"
    bits: Literal[4, 8] = 4
    #: input rows per scale (a power of two >= 16 that divides every quantized input width)
    block_size: int = 32
    symmetric: bool = True
    #: MatMulNBits accuracy_level: 4 computes with int8 activations (the CPU fast path), 0 in float32
    accuracy_level: Literal[0, 1, 2, 3, 4] = 4
    #: rtn: round to nearest (ours: min/max grid); gptq: ours, calibration-aware; ort-default / ort-hqq: ONNX
    #: Runtime's MatMulNBitsQuantizer (DEFAULT, HQQ: 4-bit only), which leaves a tied lm_head in float
    method: Literal["rtn", "gptq", "ort-default", "ort-hqq"] = "gptq"
    #: search a range shrink factor per block that minimises the squared rounding error (rtn, gptq; grid minmax)
    clip_search: bool = True
    #: each block's scale and zero point: minmax (the block's range, shrunk by `clip_search`) or mse (candidate
    #: scales and integer zero points, the scale refitted by least squares, minimising the squared error weighted by
    #: the inputs' second moments under gptq: llama.cpp's search on MatMulNBits' integer zero-point grid)
    grid: Literal["minmax", "mse"] = "minmax"
    #: gptq: quantize the inputs in order of decreasing second moment, with static groups (each block's grid from
    #: the original weights)
    act_order: bool = False
    #: gptq: damping added to the Hessian's diagonal, as a fraction of its mean
    damp: float = Field(0.01, gt=0.0, le=1.0)
    #: bits of lm_head (and the tied embedding that reads its codes); null: `bits`. llama.cpp's Q4_K_M keeps the
    #: output matrix at 6 bits for the same reason: its error reaches every logit
    head_bits: Literal[4, 8] | None = None
    #: quantize the embedding table too: a tied one shares lm_head's codes (GatherBlockQuantized), an untied one
    #: is rounded on its own at `bits`
    embeddings: bool = True
    #: bits of an untied embedding table (null: `head_bits`, else `bits`): a per-part choice, e.g. INT8 MatMuls with an INT4 table
    #: (an encoder's word embeddings are half its weights); a tied table shares lm_head's codes and bits
    embedding_bits: Literal[4, 8] | None = None
    #: tokens' values per scale in an untied embedding table (null: `block_size`)
    embedding_block_size: int | None = None
    exclude_nodes: list[str] = Field(default_factory=list)
    mixed: MixedPrecision | None = None
    #: the KV cache's element type: int8 stores keys and values with calibrated per-channel scales
    #: (GroupQueryAttention's quantized cache: a quarter of float32's bytes per token)
    kv_cache: Literal["float32", "int8"] = "float32"

    @field_validator("name")
    @classmethod
    def _simple_name(cls, value: str) -> str:
        if not value or "/" in value or value == "fp32":
            raise ValueError("must be a non-empty name without '/', other than 'fp32'")
        return value

    @field_validator("block_size", "embedding_block_size")
    @classmethod
    def _block(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is None:
            return value
        if value < 16 or value & (value - 1):
            kernel = "GatherBlockQuantized" if info.field_name == "embedding_block_size" else "MatMulNBits"
            raise BadInputError(f"quantize.weight_only {info.field_name} {value}: {kernel} needs a power of two "
                                ">= 16 (16, 32, 64, 128, 256)")
        return value

    @model_validator(mode="after")
    def _method_bits(self) -> WeightOnlyVariant:
        if self.method == "ort-hqq" and self.bits != 4:
            raise BadInputError(f"quantize.weight_only variant {self.name}: ONNX Runtime's HQQ is 4-bit only; use "
                                "method rtn or gptq for 8 bits")
        if self.mixed is not None and self.bits != 4:
            raise BadInputError(f"quantize.weight_only variant {self.name}: mixed precision promotes INT4 layers to "
                                "INT8; set bits 4")
        return self


class WeightOnlySection(_Section):
    #: calibration texts (from the data split's calibration part) for gptq and the mixed-precision search
    calibration_samples: int = Field(32, ge=1)
    #: tokens per calibration text (its first ones)
    calibration_tokens: int = Field(256, ge=8)
    #: more calibration text from another file (`bundled:<name>` or a path; .txt / .jsonl / .csv, its `text` field,
    #: or a gzip corpus such as `bundled:distill-corpus-python.jsonl.gz`): GPTQ's input statistics need tens of
    #: thousands of tokens. Texts of the evaluation split are never among them.
    calibration_data: str | None = None
    #: at most this many texts of `calibration_data` (in file order), joined in runs of `calibration_tokens` tokens
    calibration_data_samples: int = Field(256, ge=1)
    variants: list[WeightOnlyVariant] = Field(
        # accuracy_level 4 for INT8 too: at 0-1 ONNX Runtime's CPU kernel dequantizes 8-bit weights on every run
        default_factory=lambda: [WeightOnlyVariant(name="int8", bits=8, method="rtn", accuracy_level=4),
                                 WeightOnlyVariant(name="int4", bits=4, block_size=32, method="gptq")])

    @field_validator("variants")
    @classmethod
    def _unique(cls, value: list[WeightOnlyVariant]) -> list[WeightOnlyVariant]:
        names = [v.name for v in value]
        if len(set(names)) != len(names):
            raise ValueError(f"variant names must be distinct, got {names}")
        return value
