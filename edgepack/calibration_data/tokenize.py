"""Turn texts into token ids: the one tokenization path of edgepack (calibration, evaluation, distillation).

A Hugging Face tokenizer (transformers, fast Rust tokenizer underneath) does the tokenizing and truncation
(`encode_texts`, unpadded). Padding is ours (`pad_examples`, on the tokenizer's padding side with its pad id),
because we choose the padded length per batch: "bucket" padding needs a length transformers' `pad_to_multiple_of`
refuses (a cap at `max_length` that is not a multiple), and distillation pads each micro-batch to its longest text.
`tokenize_batches` (numpy feeds for ONNX Runtime) and `edgepack.compress.distill.pad_collate` (torch batches) are
both these two steps.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from edgepack.calibration_data import ArraySample, Feed
from edgepack.errors import BadInputError, did_you_mean

PADDINGS = ("longest", "max_length", "bucket")


def tokenize_batches(
    tokenizer: Any,
    texts: Sequence[str],
    *,
    batch_size: int,
    max_length: int,
    padding: str,
    input_names: Sequence[str],
    bucket: int = 16,
) -> Iterator[Feed]:
    """Tokenize `texts` `batch_size` at a time; yield `{name: int64 array (B, T)}` for each of `input_names`.

    Every text is truncated to `max_length` tokens (special tokens included). The sequence length T is:
    - "longest": the longest text of the batch (fewest pad tokens; T changes from batch to batch);
    - "max_length": always `max_length` (one fixed shape, what NPUs with static shapes need);
    - "bucket": the longest text rounded up to a multiple of `bucket`, but at most `max_length`
      (few distinct shapes, little padding; e.g. bucket=16, max_length=128 gives T in {16, 32, ..., 128}).
    The last batch may hold fewer than `batch_size` texts. Options are checked when called, not when iterated.
    """
    if padding not in PADDINGS:
        raise BadInputError(
            f"unknown padding '{padding}'{did_you_mean(padding, PADDINGS)}; choose one of {', '.join(PADDINGS)}"
        )
    for name, value in (("batch_size", batch_size), ("max_length", max_length), ("bucket", bucket)):
        _check_positive(name, value)
    return _tokenize(tokenizer, texts, batch_size, max_length, padding, tuple(input_names), bucket)


def _tokenize(
    tokenizer: Any,
    texts: Sequence[str],
    batch_size: int,
    max_length: int,
    padding: str,
    input_names: tuple[str, ...],
    bucket: int,
) -> Iterator[Feed]:
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    left = getattr(tokenizer, "padding_side", "right") == "left"
    for start in range(0, len(texts), batch_size):
        examples = encode_texts(tokenizer, texts[start : start + batch_size], max_length=max_length)
        longest = max(len(e["input_ids"]) for e in examples)
        length = {"longest": longest, "max_length": max_length,
                  "bucket": min(-(-longest // bucket) * bucket, max_length)}[padding]
        yield _select_inputs(pad_examples(examples, length=length, pad_id=pad_id, left=left), input_names)


def encode_texts(tokenizer: Any, texts: Sequence[str], *, max_length: int) -> list[dict[str, list[int]]]:
    """Token ids per text, truncated to `max_length` (special tokens included), unpadded."""
    encoded = tokenizer(list(texts), truncation=True, max_length=max_length)
    return [{name: list(encoded[name][i]) for name in encoded} for i in range(len(texts))]


def pad_examples(examples: Sequence[dict[str, list[int]]], *, length: int, pad_id: int,
                 left: bool = False) -> dict[str, np.ndarray]:
    """Pad every example to `length` tokens: ids with `pad_id`, masks and type ids with 0. (B, T) int64 each."""
    out: dict[str, np.ndarray] = {}
    for name in examples[0]:
        if name == "labels":
            continue
        fill = pad_id if name == "input_ids" else 0
        rows = np.full((len(examples), length), fill, dtype=np.int64)  # (B, T)
        for row, example in enumerate(examples):
            values = example[name][:length]
            if left:
                rows[row, length - len(values):] = values
            else:
                rows[row, : len(values)] = values
        out[name] = rows
    return out


def _select_inputs(encoded: Any, input_names: tuple[str, ...]) -> Feed:
    feed: Feed = {}
    for name in input_names:
        if name not in encoded:
            produced = ", ".join(encoded.keys())
            raise BadInputError(
                f"the tokenizer gives no '{name}'{did_you_mean(name, encoded.keys())} (it gives {produced}); "
                "use the tokenizer saved with the model, or check the model's input names"
            )
        feed[name] = np.asarray(encoded[name], dtype=np.int64)  # (B, T); ONNX text inputs are int64
    return feed


def array_batches(samples: Sequence[ArraySample], *, batch_size: int) -> Iterator[Feed]:
    """Stack array samples along a new batch axis, `batch_size` at a time: each array (...) becomes (B, ...).

    The last batch may be smaller. Every sample must have the same names and, per name, the same shape.
    """
    _check_positive("batch_size", batch_size)
    if samples:
        names = sorted(samples[0])
        for index, sample in enumerate(samples):
            if sorted(sample) != names:
                raise BadInputError(
                    f"array sample {index} has inputs {', '.join(sorted(sample))} but sample 0 has {', '.join(names)}; "
                    "give every sample the same arrays"
                )
    return _stack(samples, batch_size)


def _stack(samples: Sequence[ArraySample], batch_size: int) -> Iterator[Feed]:
    for start in range(0, len(samples), batch_size):
        batch = samples[start : start + batch_size]
        feed: Feed = {}
        for name in batch[0]:
            shapes = {sample[name].shape for sample in batch}
            if len(shapes) > 1:
                raise BadInputError(
                    f"array '{name}' has different shapes within samples {start}..{start + len(batch) - 1}: "
                    f"{', '.join(map(str, sorted(shapes)))}; pad every sample to one shape or use batch_size=1"
                )
            feed[name] = np.stack([sample[name] for sample in batch])  # (B, ...)
        yield feed


def _check_positive(name: str, value: int) -> None:
    if value < 1:
        raise BadInputError(f"{name} is {value}; it must be 1 or more")


__all__ = ["PADDINGS", "array_batches", "encode_texts", "pad_examples", "tokenize_batches"]
