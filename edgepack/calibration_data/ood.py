"""The out-of-domain text split: fidelity of an INT8 model on text unlike its calibration data.

`samples/ood_text.jsonl` (written by `scripts/make_ood_split.py`; sources and licences in `samples/README.md`) holds
200 texts in five domains unlike the bundled everyday sentences: Python standard-library docstrings, stdlib source
code, long multi-paragraph docstrings (past the 128-token truncation), synthetic service logs and short keyword
queries. Each JSON line is `{"text": ..., "domain": ...}`; this is a plain text set for output fidelity (cosine vs
FP32), not a retrieval benchmark.

>>> split = read_ood_split()
>>> sorted(split) == sorted(OOD_DOMAINS) and sum(len(v) for v in split.values())
200
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from edgepack.calibration_data import TextSample
from edgepack.calibration_data.readers import sample_path
from edgepack.errors import BadInputError, did_you_mean

OOD_FILE = "ood_text.jsonl"
OOD_DOMAINS = ("docstring", "code", "long", "logs", "keywords")


def read_ood_split(path: str | Path | None = None, *, domains: Sequence[str] | None = None
                   ) -> dict[str, list[TextSample]]:
    """Samples by domain, in file order (`path`: a JSONL of {"text", "domain"}; default the bundled split).

    `domains` keeps only those (an unknown one is an error listing those in the file).
    """
    path = Path(path) if path is not None else sample_path(OOD_FILE)
    split: dict[str, list[TextSample]] = {}
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            text, domain = record["text"], record["domain"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise BadInputError(f"{path}:{lineno}: not a {{\"text\": ..., \"domain\": ...}} JSON object "
                                f"({type(err).__name__}: {err}); fix the line") from None
        if not isinstance(text, str) or not text.strip() or not isinstance(domain, str) or not domain:
            raise BadInputError(f"{path}:{lineno}: 'text' and 'domain' must be non-empty strings")
        split.setdefault(domain, []).append(TextSample(text))
    if not split:
        raise BadInputError(f"{path}: no samples; write one {{\"text\": ..., \"domain\": ...}} object per line")
    for domain in domains or ():
        if domain not in split:
            raise BadInputError(f"{path}: no domain '{domain}'{did_you_mean(domain, split)}; it has "
                                f"{', '.join(split)}")
    return {d: s for d, s in split.items() if domains is None or d in domains}
