"""Broad text corpora for distillation: streamed records, exact and near-duplicate removal, held-out text, mixing.

A corpus file is JSONL (optionally gzip-compressed: `.jsonl.gz`) with one record per line, or plain text (`.txt`,
`.txt.gz`, one text per line). `stream_records` reads it one line at a time, so a corpus never has to fit in memory
twice; `DuplicateFilter` drops a text that repeats one already kept, exactly (after case and whitespace folding) or
nearly (MinHash over word 3-shingles, banded LSH: estimated Jaccard similarity >= `near`); the same filter, seeded
with the evaluation texts, keeps every text that resembles evaluation data out of training.

MinHash is ours: datasketch (the usual library) hashes each shingle with SHA-1 in Python, one shingle at a time;
the vectorised numpy version below is one array expression per text and needs no new dependency.

>>> keep = DuplicateFilter(near=0.7)
>>> [keep.add(t) for t in ["Open the file for reading.", "open the file  for READING.", "Close the socket."]]
[True, False, True]
"""

from __future__ import annotations

import io
import json
import re
import zlib
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

from edgepack.calibration_data import TextSample
from edgepack.calibration_data.readers import open_bytes
from edgepack.errors import BadInputError

_PRIME = (1 << 61) - 1
_WORD = re.compile(r"\w+", re.UNICODE)


def normalize(text: str) -> str:
    """Case and whitespace folded: the key of exact duplicates."""
    return " ".join(text.lower().split())


def _open_text(path: Path) -> io.TextIOBase:
    return io.TextIOWrapper(open_bytes(path), encoding="utf-8")


def stream_records(path: str | Path, *, field: str = "text", pair_field: str | None = None) -> Iterator[TextSample]:
    """The records of a corpus file, one at a time (JSONL or text lines, optionally gzip); blank lines skipped.

    A JSONL record without `field` (or with empty text) is an error naming the line; a record without `pair_field`
    is read without a pair (a corpus mixes records with and without one).
    """
    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"{path}: corpus file not found; build it (scripts/build_distill_corpus.py) or fix the path")
    stem = path.name.removesuffix(".gz")
    jsonl = stem.endswith(".jsonl")
    if not jsonl and not stem.endswith(".txt"):
        raise BadInputError(f"{path}: a corpus is .jsonl, .jsonl.gz, .txt or .txt.gz; rename or convert it")
    if not jsonl and pair_field:
        raise BadInputError(f"{path}: text corpora carry no pair_field; drop it or use JSONL")
    with _open_text(path) as lines:
        for lineno, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            if not jsonl:
                yield TextSample(line.strip())
                continue
            yield _record(line, path, lineno, field, pair_field)


def _record(line: str, path: Path, lineno: int, field: str, pair_field: str | None) -> TextSample:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise BadInputError(f"{path}:{lineno}: not valid JSON ({err.msg}); write one JSON object per line") from None
    text = record.get(field) if isinstance(record, dict) else None
    if not isinstance(text, str) or not text.strip():
        raise BadInputError(f"{path}:{lineno}: no non-empty text in field '{field}'; set corpus.field to the field "
                            "that holds the text")
    pair = record.get(pair_field) if pair_field else None
    return TextSample(text.strip(), pair=pair.strip() if isinstance(pair, str) and pair.strip() else None)


# ------------------------------------------------------------------------------------------------ duplicates


def shingles(text: str, size: int = 3) -> np.ndarray:
    """crc32 of each word `size`-gram of the folded text (the whole text when it is shorter), unique, uint64."""
    words = _WORD.findall(text.lower())
    grams = [" ".join(words[i:i + size]) for i in range(max(1, len(words) - size + 1))]
    return np.unique(np.fromiter((zlib.crc32(g.encode()) for g in grams), dtype=np.uint64, count=len(grams)))


class DuplicateFilter:
    """Remembers kept texts; `add(text)` is False for an exact or near duplicate of one of them.

    Near duplicates: a MinHash signature of `permutations` hashes (a*x + b mod 2^61-1) over the text's word
    3-shingles, split into `bands` bands; texts sharing a band are candidates, and a candidate is a duplicate when
    the share of equal signature entries (the estimate of the shingle sets' Jaccard similarity) is >= `near`.
    `near=None` removes exact duplicates only.
    """

    def __init__(self, *, near: float | None = 0.7, permutations: int = 64, bands: int = 16, seed: int = 0) -> None:
        if near is not None and not 0 < near <= 1:
            raise BadInputError(f"near-duplicate threshold {near}: use a Jaccard similarity in (0, 1], or null")
        if permutations % bands:
            raise BadInputError(f"MinHash: {permutations} permutations do not split into {bands} bands")
        rng = np.random.default_rng(seed)
        self.near, self.bands, self.rows = near, bands, permutations // bands
        self._a = rng.integers(1, _PRIME, size=permutations, dtype=np.uint64)
        self._b = rng.integers(0, _PRIME, size=permutations, dtype=np.uint64)
        self._exact: set[str] = set()
        self._buckets: dict[tuple[int, bytes], list[int]] = {}
        self._signatures: list[np.ndarray] = []

    def signature(self, text: str) -> np.ndarray:
        """(permutations,) minimum hash values of the text's shingles."""
        x = shingles(text)[:, None]  # (S, 1): crc32 < 2^32, so a * x stays below 2^64 after the mod on a
        hashed = (x * (self._a >> np.uint64(29)) + self._b) % np.uint64(_PRIME)  # (S, P)
        return hashed.min(axis=0)

    def add(self, text: str) -> bool:
        """Keep `text` (True) unless it duplicates a kept text (False)."""
        key = normalize(text)
        if key in self._exact:
            return False
        if self.near is not None:
            sig = self.signature(text)
            keys = [(band, sig[band * self.rows:(band + 1) * self.rows].tobytes()) for band in range(self.bands)]
            if self._is_near(sig, keys):
                return False
            index = len(self._signatures)
            self._signatures.append(sig)
            for k in keys:
                self._buckets.setdefault(k, []).append(index)
        self._exact.add(key)
        return True

    def _is_near(self, sig: np.ndarray, keys: list[tuple[int, bytes]]) -> bool:
        candidates = {i for k in keys for i in self._buckets.get(k, ())}
        return any(float(np.mean(self._signatures[i] == sig)) >= (self.near or 1.0) for i in candidates)

    def __contains__(self, text: str) -> bool:
        """True for a text that `add` would refuse (without adding it)."""
        if normalize(text) in self._exact:
            return True
        if self.near is None:
            return False
        sig = self.signature(text)
        return self._is_near(sig, [(b, sig[b * self.rows:(b + 1) * self.rows].tobytes()) for b in range(self.bands)])


def unique_records(records: Iterable[TextSample], *, near: float | None, held_out: Iterable[str] = (),
                   stats: dict[str, int] | None = None) -> Iterator[TextSample]:
    """Records whose text and pair duplicate neither an earlier record nor a held-out text, streamed.

    Held-out texts (evaluation data) are compared in both directions: a record near one is dropped. `stats`
    counts what was read, kept, and dropped as a duplicate or as held out.
    """
    counts = stats if stats is not None else {}
    for name in ("read", "kept", "duplicate", "held_out"):
        counts.setdefault(name, 0)
    held = DuplicateFilter(near=near)
    for text in held_out:
        held.add(text)
    seen = DuplicateFilter(near=near)
    for record in records:
        counts["read"] += 1
        texts = [record.text] + ([record.pair] if record.pair else [])
        if any(t in held for t in texts):
            counts["held_out"] += 1
            continue
        if not all([seen.add(t) for t in texts]):  # list: every text is remembered, even after a duplicate
            counts["duplicate"] += 1
            continue
        counts["kept"] += 1
        yield record


def read_corpus(path: str | Path, *, field: str = "text", pair_field: str | None = None,
                max_samples: int | None = None, near: float | None = 0.7, held_out: Iterable[str] = (),
                validation_pairs: int = 0) -> tuple[list[str], list[tuple[str, str]], dict[str, int]]:
    """(training texts, held-out validation pairs, counts) of a corpus file, streamed and de-duplicated.

    Reading stops after `max_samples` kept records. Pair records are set aside for validation by a hash of their
    text (about one in 20, spread over the file) until `validation_pairs` are held; their texts are not trained on.
    """
    stats: dict[str, int] = {}
    texts: list[str] = []
    pairs: list[tuple[str, str]] = []
    records = unique_records(stream_records(path, field=field, pair_field=pair_field), near=near, held_out=held_out,
                             stats=stats)
    for record in records:
        if record.pair and len(pairs) < validation_pairs and zlib.crc32(record.text.encode()) % 20 == 0:
            pairs.append((record.text, record.pair))
            continue
        texts += [record.text] + ([record.pair] if record.pair else [])
        if max_samples is not None and stats["kept"] - len(pairs) >= max_samples:
            break
    stats.update(texts=len(texts), validation_pairs=len(pairs))
    return texts, pairs, stats


def mix(corpus: Sequence[str], task: Sequence[str], *, task_share: float, seed: int = 0) -> list[str]:
    """Corpus texts with the task's texts making up `task_share` of the result (repeated when too few, a seeded
    sample when too many); interleaved in a seeded order, so a time-capped training run sees the stated ratio."""
    if not 0 <= task_share < 1:
        raise BadInputError(f"distill.data.corpus.task_share is {task_share}; use a fraction in [0, 1)")
    if not task or task_share == 0:
        return list(corpus)
    rng = np.random.default_rng(seed)
    wanted = round(task_share * len(corpus) / (1 - task_share)) if corpus else len(task)
    picks = np.concatenate([rng.permutation(len(task)) for _ in range(-(-wanted // len(task)))])[:wanted]
    texts = list(corpus) + [task[i] for i in picks]
    return [texts[i] for i in rng.permutation(len(texts))]


__all__ = ["DuplicateFilter", "mix", "normalize", "read_corpus", "shingles", "stream_records", "unique_records"]
