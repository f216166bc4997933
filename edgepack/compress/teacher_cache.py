"""The teacher's outputs computed once per training text, so a training step runs only the student.

Without a cache every step runs the frozen teacher forward on its batch; over E epochs each text costs E teacher
forwards, and the teacher (all its layers, full width) is the larger half of a step's work for a small student.
`TeacherCache.build` runs the teacher once over every example in inference mode, in batches of similar length (little
padding), and keeps what the losses read (`Outputs` fields):

  pooled         (N, C) float32: the sentence embedding
  hidden_states  the teacher layers the student's layers map to: a ragged (tokens, C) tensor per layer
  qkv            the last layer's Q, K, V projections: three ragged (tokens, C) tensors

Token-level entries are stored without padding (`dtype`, float16 by default: half the memory; float32 reproduces
the recomputed losses exactly) and padded per micro-batch by `outputs(...)`. On real tokens a BERT's outputs do not
depend on the padding of the batch they ran in, so the cached outputs give the same losses as a teacher forward on
the training batch (tests check it); padded positions are masked by every loss.

>>> cache = TeacherCache.build(teacher, head, examples, needs=objective.needs,                 # doctest: +SKIP
...                            hidden_layers=(0, 1, 3, 6), pad_id=0)
>>> objective.use_cache(cache)                                                                # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from edgepack.errors import BadInputError

CACHE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass
class _Ragged:
    """Per-example (T_i, C) tensors stored back to back: `data` (sum T_i, C), example i at offsets[i]:offsets[i+1]."""

    data: torch.Tensor
    offsets: torch.Tensor  # (N + 1,) int64

    def padded(self, indices: Sequence[int], length: int) -> torch.Tensor:
        """(B, length, C) float32: each example's rows, zeros after its last real token."""
        out = torch.zeros(len(indices), length, self.data.shape[1])
        for row, i in enumerate(indices):
            start, end = int(self.offsets[i]), int(self.offsets[i + 1])
            count = min(end - start, length)
            out[row, :count] = self.data[start:start + count].float()
        return out


@dataclass
class TeacherCache:
    """Cached teacher outputs for examples 0..N-1 (see the module docstring)."""

    mask_lengths: torch.Tensor  # (N,) real tokens per example
    pooled: torch.Tensor | None = None  # (N, C)
    hidden: dict[int, _Ragged] = field(default_factory=dict)  # teacher hidden_states index -> ragged states
    qkv: tuple[_Ragged, _Ragged, _Ragged] | None = None
    num_hidden_states: int = 0
    stats: dict[str, Any] = field(default_factory=dict)

    @classmethod
    @torch.inference_mode()
    def build(cls, teacher: nn.Module, head: Any, examples: Sequence[dict[str, list[int]]], *, needs: frozenset[str],
              hidden_layers: Sequence[int] = (), pad_id: int = 0, batch_size: int = 64, dtype: str = "float16",
              max_mb: float | None = None, autocast: torch.dtype | None = None) -> TeacherCache:
        from edgepack.compress.distill import pad_collate

        if dtype not in CACHE_DTYPES:
            raise BadInputError(f"distill.teacher_cache_dtype '{dtype}' is not one of {', '.join(CACHE_DTYPES)}")
        start = time.perf_counter()
        lengths = torch.tensor([len(e["input_ids"]) for e in examples])
        width = int(teacher.config.hidden_size)
        token_tensors = len(hidden_layers) * ("hidden_states" in needs) + 3 * ("qkv" in needs)
        mb = int(lengths.sum()) * width * token_tensors * torch.finfo(CACHE_DTYPES[dtype]).bits / 8 / 2**20
        if max_mb is not None and mb > max_mb:
            raise BadInputError(f"distill.teacher_cache: the token-level teacher outputs of {len(examples)} texts need "
                                f"{mb:.0f} MB, over distill.teacher_cache_max_mb={max_mb:.0f}; drop the token-level "
                                "losses (hidden, attention-relation), lower the corpus' max_samples, or raise the cap")
        teacher.eval()
        order = sorted(range(len(examples)), key=lambda i: int(lengths[i]))  # little padding per batch
        parts: dict[str, list[tuple[int, torch.Tensor]]] = {}
        store = CACHE_DTYPES[dtype]
        for begin in range(0, len(order), batch_size):
            chunk = order[begin:begin + batch_size]
            batch = pad_collate([{k: v for k, v in examples[i].items() if k != "labels"} for i in chunk], pad_id=pad_id)
            with torch.autocast("cpu", dtype=autocast) if autocast is not None else contextlib.nullcontext():
                out = head.run(teacher, batch, needs)
            for row, i in enumerate(chunk):
                n = int(lengths[i])
                if out.pooled is not None:
                    parts.setdefault("pooled", []).append((i, out.pooled[row].float().clone()))
                for layer in hidden_layers if out.hidden_states is not None else ():
                    parts.setdefault(f"hidden.{layer}", []).append((i, out.hidden_states[layer][row, :n].to(store)))
                for name, tensor in zip(("q", "k", "v"), out.qkv or (), strict=False):
                    parts.setdefault(name, []).append((i, tensor[row, :n].to(store)))
            num_states = len(out.hidden_states) if out.hidden_states is not None else 0
        cache = cls(mask_lengths=lengths, num_hidden_states=num_states)
        if "pooled" in parts:
            cache.pooled = torch.stack([t for _, t in sorted(parts.pop("pooled"), key=lambda p: p[0])])
        ragged = {name: _ragged(values) for name, values in parts.items()}
        cache.hidden = {int(name.split(".")[1]): r for name, r in ragged.items() if name.startswith("hidden.")}
        if "q" in ragged:
            cache.qkv = (ragged["q"], ragged["k"], ragged["v"])
        cache.stats = {"texts": len(examples), "tokens": int(lengths.sum()), "token_level_mb": round(mb, 1),
                       "pooled_mb": round(0 if cache.pooled is None else cache.pooled.numel() * 4 / 2**20, 1),
                       "dtype": dtype, "autocast": str(autocast).removeprefix("torch.") if autocast else "fp32",
                       "build_s": round(time.perf_counter() - start, 2)}
        return cache

    def outputs(self, indices: Sequence[int], mask: torch.Tensor) -> Any:
        """`Outputs` of examples `indices` padded to the micro-batch's length (mask: its (B, T) attention mask)."""
        from edgepack.compress.distill import Outputs

        length = mask.shape[1]
        hidden = None
        if self.hidden:
            states: list[torch.Tensor | None] = [None] * self.num_hidden_states
            for layer, ragged in self.hidden.items():
                states[layer] = ragged.padded(indices, length)
            hidden = tuple(states)
        qkv = tuple(r.padded(indices, length) for r in self.qkv) if self.qkv is not None else None
        pooled = self.pooled[list(indices)] if self.pooled is not None else None
        return Outputs(mask=mask, pooled=pooled, hidden_states=hidden, qkv=qkv)  # type: ignore[arg-type]


def _ragged(values: list[tuple[int, torch.Tensor]]) -> _Ragged:
    values.sort(key=lambda p: p[0])
    lengths = torch.tensor([0] + [t.shape[0] for _, t in values])
    return _Ragged(data=torch.cat([t for _, t in values]), offsets=torch.cumsum(lengths, 0))


__all__ = ["CACHE_DTYPES", "TeacherCache"]
