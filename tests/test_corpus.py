"""The distillation corpus reader (streaming, exact and near-duplicate removal, held-out text, mixing), the bundled
corpus and retrieval sets, and the recipe's data wiring. Pure Python and numpy: about a second."""

from __future__ import annotations

import gzip
import json
from collections import Counter
from pathlib import Path

import pytest

from edgepack.calibration_data import sample_path
from edgepack.calibration_data.corpus import DuplicateFilter, mix, read_corpus, stream_records, unique_records
from edgepack.errors import BadInputError


def _write_gz(path: Path, records: list[dict]) -> Path:
    with gzip.open(path, "wt", encoding="utf-8") as out:
        for record in records:
            out.write(json.dumps(record) + "\n")
    return path


def test_stream_records_reads_gzip_jsonl_lazily_and_names_the_bad_line(tmp_path):
    path = _write_gz(tmp_path / "c.jsonl.gz", [{"text": "Return the sum of two numbers.", "pair": "It adds them."},
                                               {"text": "Close the stream."}, {"body": "no text field"}])
    stream = stream_records(path, pair_field="pair")
    first = next(stream)  # a generator: nothing past the first line is parsed yet
    assert (first.text, first.pair) == ("Return the sum of two numbers.", "It adds them.")
    assert next(stream).pair is None  # a record without the pair field has no pair
    with pytest.raises(BadInputError, match=r"c.jsonl.gz:3: no non-empty text in field 'text'"):
        next(stream)
    (tmp_path / "lines.txt").write_text("one line\n\nanother line\n")
    assert [s.text for s in stream_records(tmp_path / "lines.txt")] == ["one line", "another line"]
    (tmp_path / "corpus.parquet").write_bytes(b"PAR1")
    with pytest.raises(BadInputError, match="a corpus is .jsonl, .jsonl.gz, .txt or .txt.gz"):
        next(stream_records(tmp_path / "corpus.parquet"))


def test_duplicate_filter_drops_exact_and_near_duplicates_but_keeps_distinct_texts():
    base = ("Return a new array of the given shape and type, filled with zeros, using the memory layout that the "
            "caller asked for")
    keep = DuplicateFilter(near=0.7)
    assert keep.add(base)
    assert not keep.add(base.upper() + "  ")  # exact after case and whitespace folding
    assert not keep.add(base + " by default")  # near: 2 of 23 shingles differ (Jaccard ~0.9)
    assert keep.add("Return a new array of the given shape and type, filled with ones")  # shares a prefix only
    assert keep.add("Open a socket connection to the given host and port and return it")
    exact_only = DuplicateFilter(near=None)
    assert exact_only.add(base) and exact_only.add(base + " by default") and not exact_only.add(base.lower())
    # the MinHash estimate tracks the true Jaccard similarity of the shingle sets
    a, b = DuplicateFilter().signature(base), DuplicateFilter().signature(base + " by default")
    assert 0.75 <= float((a == b).mean()) <= 1.0


def test_unique_records_holds_out_evaluation_text_and_counts(tmp_path):
    held = "Copy files and directories from one place to another, keeping their modes and times"
    records = [{"text": "Return the length of the list.", "pair": "Counts its items."},
               {"text": "return the length of the list."},  # exact duplicate of record 1
               {"text": held + " when asked"},  # near an evaluation text
               {"text": "Parse a date string into a datetime object."}]
    path = _write_gz(tmp_path / "c.jsonl.gz", records)
    stats: dict[str, int] = {}
    kept = list(unique_records(stream_records(path, pair_field="pair"), near=0.7, held_out=[held], stats=stats))
    assert [s.text for s in kept] == ["Return the length of the list.", "Parse a date string into a datetime object."]
    assert stats == {"read": 4, "kept": 2, "duplicate": 1, "held_out": 1}


def test_read_corpus_stops_at_max_samples_and_sets_aside_validation_pairs(tmp_path):
    records = [{"text": f"Summary number {i} of the function {i * 7}", "pair": f"Paragraph {i} tells more, {i * 3}"}
               for i in range(400)]
    path = _write_gz(tmp_path / "c.jsonl.gz", records)
    texts, pairs, stats = read_corpus(path, pair_field="pair", max_samples=100, near=None, validation_pairs=5)
    assert len(texts) == 200 and stats["kept"] == 100 + len(pairs) and len(pairs) == 5  # text + pair per record
    assert not {t for p in pairs for t in p} & set(texts)  # validation pairs are never trained on


def test_mix_puts_the_task_share_of_texts_in_training_order():
    corpus = [f"corpus {i}" for i in range(850)]
    mixed = mix(corpus, ["task a", "task b"], task_share=0.15, seed=0)
    counts = Counter(t.startswith("task") for t in mixed)
    assert counts[True] == 150 and counts[False] == 850  # 15% task texts, repeated as needed
    assert any(t.startswith("task") for t in mixed[:100])  # interleaved, not appended
    assert mix(corpus, ["x"], task_share=0.0) == corpus
    with pytest.raises(BadInputError, match="task_share is 1.0"):
        mix(corpus, ["x"], task_share=1.0)


def test_bundled_corpus_and_retrieval_sets_share_no_text():
    """The evaluation domains stay out of training: no corpus text equals or nearly equals an evaluation text."""
    sets = {name: [json.loads(line) for line in sample_path(name).read_text().splitlines()]
            for name in ("retrieval-manpages.jsonl", "retrieval-debian.jsonl")}
    for name, records in sets.items():
        assert len(records) == 600, name
        assert all(set(r) == {"query", "document", "source", "license"} for r in records)
        assert len({r["query"] for r in records}) == 600  # distinct queries
    held = DuplicateFilter(near=0.7)
    for records in sets.values():
        for r in records:
            held.add(r["query"]) and held.add(r["document"])
    corpus = list(stream_records(sample_path("distill-corpus-python.jsonl.gz"), pair_field="pair"))
    assert len(corpus) > 30000
    assert not [s.text for s in corpus if s.text in held or (s.pair and s.pair in held)]
