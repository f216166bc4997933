"""Write edgepack/calibration_data/samples/ood_text.jsonl: text unlike the bundled calibration sentences.

The bundled set (sentences.jsonl) is short everyday English. An INT8 model calibrated on it must also hold on other
registers, longer inputs and padded batches, so this split takes its text from elsewhere, in five domains:

  docstring  first paragraph of a docstring in the Python standard library (technical prose, identifiers)
  code       a few lines of a stdlib function body (Python source: punctuation, indentation, names)
  long       whole multi-paragraph stdlib docstrings of 150+ words (longer than max_length 128 tokens: truncated)
  logs       synthetic service log lines (timestamps, levels, paths, hex ids, numbers), written by this script
  keywords   2-5 word search-style queries built from stdlib function and module names

Sources and licences: the docstrings and code are read with `ast` from the standard library of the Python that runs
this script (3.11.7 for the committed file), under the Python Software Foundation License Version 2, which permits
copying and redistribution with its copyright notice (edgepack/calibration_data/samples/README.md carries it);
the logs and keywords are generated here (Apache-2.0, as edgepack). Deterministic for one Python version.

    python scripts/make_ood_split.py            # rewrites the file
"""

from __future__ import annotations

import ast
import json
import random
import re
import sysconfig
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "edgepack" / "calibration_data" / "samples" / "ood_text.jsonl"
MODULES = ("argparse", "bisect", "calendar", "codecs", "collections/__init__", "configparser", "csv", "datetime",
           "decimal", "difflib", "doctest", "email/message", "fractions", "functools", "gzip", "heapq",
           "http/client", "inspect", "ipaddress", "json/__init__", "json/decoder", "logging/__init__", "pathlib",
           "pickle", "pprint", "queue", "random", "shutil", "smtplib", "socket", "statistics", "string", "tarfile",
           "tempfile", "textwrap", "threading", "timeit", "typing", "unittest/case", "urllib/parse", "uuid",
           "zipfile")
COUNTS = {"docstring": 60, "code": 40, "long": 30, "logs": 40, "keywords": 30}


def _definitions(module: str) -> list[tuple[str, ast.AST, str]]:
    path = Path(sysconfig.get_paths()["stdlib"]) / f"{module}.py"
    source = path.read_text(encoding="utf-8")
    tree = ast.parse(source)
    return [(module, node, source) for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))]


def _clean(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def docstrings(defs: list[tuple[str, ast.AST, str]], rng: random.Random) -> tuple[list[str], list[str]]:
    """(first paragraphs of 8-80 words, whole docstrings of 150+ words)."""
    first, long = [], []
    for _, node, _ in defs:
        doc = ast.get_docstring(node)
        if not doc:
            continue
        paragraph = _clean(doc.split("\n\n")[0])
        if 8 <= len(paragraph.split()) <= 80 and ">>>" not in paragraph:
            first.append(paragraph)
        whole = _clean(doc)
        if len(whole.split()) >= 150:
            long.append(" ".join(whole.split()[:400]))
    return list(dict.fromkeys(first)), list(dict.fromkeys(long))


def code_snippets(defs: list[tuple[str, ast.AST, str]]) -> list[str]:
    """3-12 source lines from the start of a function body (docstring skipped), indentation kept."""
    out = []
    for _, node, source in defs:
        if not isinstance(node, ast.FunctionDef) or not node.body:
            continue
        body = node.body[1:] if ast.get_docstring(node) else node.body
        if not body:
            continue
        lines = source.splitlines()[body[0].lineno - 1: body[-1].end_lineno][:12]
        lines = [line for line in lines if line.strip() and not line.strip().startswith("#")]
        if len(lines) >= 3:
            indent = min(len(line) - len(line.lstrip()) for line in lines)
            out.append("\n".join(line[indent:] for line in lines))
    return list(dict.fromkeys(out))


def log_lines(rng: random.Random, n: int) -> list[str]:
    services = ["auth", "billing", "search", "ingest", "thumbnailer", "scheduler", "gateway", "cache"]
    levels = ["INFO", "WARN", "ERROR", "DEBUG"]
    events = ["request completed status={s} in {ms}ms path=/api/v{v}/{res}/{id}",
              "retrying upstream {host}:{port} attempt {a}/5 after {ms}ms backoff",
              "cache miss key={hex} ttl={t}s size={kb}KiB",
              "worker-{w} picked job {hex} queue=default lag={ms}ms",
              "connection reset by peer {ip}:{port} (errno 104)",
              "GC pause {ms}ms heap={mb}MB/{mb2}MB",
              "user {id} login failed: invalid token (attempt {a})",
              "flushed {n} rows to segment {hex} in {ms}ms"]
    out = []
    for _ in range(n):
        fields = {"s": rng.choice([200, 201, 204, 301, 404, 500, 503]), "ms": rng.randint(1, 9000),
                  "v": rng.randint(1, 3), "res": rng.choice(["items", "users", "orders", "files"]),
                  "id": rng.randint(1000, 99999), "host": rng.choice(["10.0.3.17", "db-2.internal", "api.local"]),
                  "port": rng.choice([443, 5432, 6379, 8080]), "a": rng.randint(1, 5),
                  "hex": f"{rng.getrandbits(48):012x}", "t": rng.randint(10, 3600), "kb": rng.randint(1, 4096),
                  "w": rng.randint(0, 15), "ip": f"192.168.{rng.randint(0, 255)}.{rng.randint(1, 254)}",
                  "mb": rng.randint(100, 900), "mb2": 1024, "n": rng.randint(10, 50000)}
        stamp = f"2026-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}T{rng.randint(0, 23):02d}:" \
                f"{rng.randint(0, 59):02d}:{rng.randint(0, 59):02d}.{rng.randint(0, 999):03d}Z"
        out.append(f"{stamp} {rng.choice(levels)} [{rng.choice(services)}] {rng.choice(events).format(**fields)}")
    return out


def keywords(defs: list[tuple[str, ast.AST, str]], rng: random.Random, n: int) -> list[str]:
    names = sorted({(m.split("/")[0], node.name) for m, node, _ in defs
                    if isinstance(node, ast.FunctionDef) and not node.name.startswith("_") and "_" in node.name})
    picked = rng.sample(names, min(n, len(names)))
    extras = ["python", "example", "how to", "error", "docs", "default", "vs"]
    return [" ".join([module, *name.split("_"), rng.choice(extras)][:5]) for module, name in picked]


def main() -> None:
    rng = random.Random(0)
    defs = [d for module in MODULES for d in _definitions(module)]
    first, long = docstrings(defs, rng)
    pools = {"docstring": first, "code": code_snippets(defs), "long": long,
             "logs": log_lines(rng, COUNTS["logs"]), "keywords": keywords(defs, rng, COUNTS["keywords"])}
    rows = []
    for domain, pool in pools.items():
        chosen = rng.sample(pool, min(COUNTS[domain], len(pool)))
        rows += [{"text": text, "domain": domain} for text in chosen]
    OUT.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    print(f"wrote {OUT} ({len(rows)} samples: " + ", ".join(f"{d} {sum(r['domain'] == d for r in rows)}"
                                                               for d in pools) + ")")


if __name__ == "__main__":
    main()
