"""The out-of-domain text split: the bundled file's domains and sizes, and the reader's errors."""

from __future__ import annotations

import json

import pytest

from edgepack.calibration_data import TextSample, read_samples, sample_path
from edgepack.calibration_data.ood import OOD_DOMAINS, OOD_FILE, read_ood_split
from edgepack.errors import BadInputError


def test_bundled_split_has_every_domain_and_no_calibration_text():
    split = read_ood_split()
    assert {d: len(s) for d, s in split.items()} == {"docstring": 60, "code": 40, "long": 30, "logs": 40,
                                                     "keywords": 30}
    assert tuple(split) == OOD_DOMAINS
    bundled = {s.text for s in read_samples(sample_path(), pair_field="paraphrase")}
    texts = [s.text for samples in split.values() for s in samples]
    assert len(set(texts)) == len(texts) and not bundled & set(texts)
    assert all(len(s.text.split()) >= 150 for s in split["long"])  # past the 128-token truncation
    assert all("\n" in s.text for s in split["code"])


def test_domains_filter_and_unknown_domain(tmp_path):
    assert list(read_ood_split(domains=["logs"])) == ["logs"]
    with pytest.raises(BadInputError, match="no domain 'keyword' \\(did you mean 'keywords'\\?\\)"):
        read_ood_split(domains=["keyword"])


def test_a_bad_line_names_file_and_line(tmp_path):
    path = tmp_path / "ood.jsonl"
    path.write_text(json.dumps({"text": "fine", "domain": "a"}) + "\n" + json.dumps({"text": "no domain"}) + "\n")
    with pytest.raises(BadInputError, match=r"ood.jsonl:2: not a \{\"text\""):
        read_ood_split(path)
    path.write_text(json.dumps({"text": " ", "domain": "a"}) + "\n")
    with pytest.raises(BadInputError, match="ood.jsonl:1: 'text' and 'domain' must be non-empty strings"):
        read_ood_split(path)


def test_custom_split_reads_in_file_order(tmp_path):
    path = tmp_path / "ood.jsonl"
    rows = [{"text": "b1", "domain": "b"}, {"text": "a1", "domain": "a"}, {"text": "b2", "domain": "b"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert read_ood_split(path) == {"b": [TextSample("b1"), TextSample("b2")], "a": [TextSample("a1")]}
    assert sample_path(OOD_FILE).is_file()
