"""Build the out-of-domain retrieval sets shipped in edgepack/calibration_data/samples/ (run once, offline).

Two domains of technical English that edgepack never trains on (the distillation corpus has no man page and no
Debian package text; see docs/distillation-data.md):

  retrieval-manpages.jsonl  Unix manual pages installed on the build machine (sections 1 and 8, commands; the
                            16k generated gcloud pages left out): query = the NAME line's summary ("list directory
                            contents"), document = the first DESCRIPTION paragraph of 12+ words
  retrieval-debian.jsonl    Debian package descriptions (/var/lib/dpkg/status): query = the synopsis, document =
                            the extended description

Each record: {"query", "document", "source", "license"}; `license` is read from the package's
/usr/share/doc/<package>/copyright (DEP-5 `License:` fields) or "see copyright". Documents that are near duplicates
of another (MinHash Jaccard >= 0.6: generic library boilerplate) and repeated queries are dropped, then 600 records
are drawn with a fixed seed. Rendering uses `man -l -P cat` (man-db, groff).

    python scripts/build_retrieval_sets.py            # writes both files (~3 minutes on 2 cores)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from edgepack.calibration_data.corpus import DuplicateFilter, normalize  # noqa: E402

SAMPLES = Path(__file__).resolve().parents[1] / "edgepack" / "calibration_data" / "samples"
MAN = Path("/usr/share/man")
DPKG_STATUS = Path("/var/lib/dpkg/status")
PAIRS = 600
MIN_WORDS = 12
MAX_WORDS = 150


def file_owners() -> dict[str, str]:
    """Installed file -> Debian package, from dpkg's file lists."""
    owners: dict[str, str] = {}
    for listing in Path("/var/lib/dpkg/info").glob("*.list"):
        package = listing.stem.split(":")[0]
        for line in listing.read_text(errors="replace").splitlines():
            owners[line] = package
    return owners


def package_license(package: str) -> str:
    """The DEP-5 licence names of a package's copyright file, or 'see copyright'."""
    path = Path("/usr/share/doc") / package / "copyright"
    if not path.is_file():
        return "see copyright"
    names = re.findall(r"^License:\s*(\S[^\n]*)$", path.read_text(errors="replace"), flags=re.M)
    unique = list(dict.fromkeys(n.strip() for n in names))
    return ", ".join(unique[:3]) if unique else "see copyright"


def truncate(text: str, words: int = MAX_WORDS) -> str:
    parts = text.split()
    return " ".join(parts[:words])


# ------------------------------------------------------------------------------------------------- man pages


def render(page: Path) -> str:
    env = {**os.environ, "MANWIDTH": "2000", "MAN_KEEP_FORMATTING": "", "LC_ALL": "C.UTF-8"}
    done = subprocess.run(["man", "-l", "-P", "cat", str(page)], capture_output=True, text=True, env=env,
                          timeout=60, check=False)
    return re.sub(r".\x08", "", done.stdout)


def sections(text: str) -> dict[str, list[str]]:
    """Section name -> paragraphs (indented lines joined; blank lines split paragraphs)."""
    found: dict[str, list[str]] = {}
    current: list[str] | None = None
    paragraph: list[str] = []
    for line in [*text.splitlines(), ""]:
        if line and not line[0].isspace():
            if current is not None and paragraph:
                current.append(" ".join(paragraph))
            current, paragraph = found.setdefault(line.strip().upper(), []), []
        elif not line.strip():
            if current is not None and paragraph:
                current.append(" ".join(paragraph))
            paragraph = []
        else:
            paragraph.append(line.strip())
    return found


def man_record(page: Path, owners: dict[str, str]) -> dict[str, str] | None:
    parts = sections(render(page))
    name = " ".join(parts.get("NAME", []))
    if " - " not in name:
        return None
    summary = name.split(" - ", 1)[1].strip()
    paragraphs = [p for p in parts.get("DESCRIPTION", []) if len(p.split()) >= MIN_WORDS and not p.startswith("-")]
    if len(summary.split()) < 3 or not paragraphs:
        return None
    package = owners.get(str(page), "?")
    return {"query": summary, "document": truncate(paragraphs[0]), "source": f"{page.parent.name}/{page.name} "
            f"({package})", "license": package_license(package)}


def man_pages() -> list[Path]:
    pages = []
    for section in ("man1", "man8"):
        pages += sorted(p for p in (MAN / section).iterdir() if not p.name.startswith("gcloud"))
    return pages


def man_records(owners: dict[str, str]) -> list[dict[str, str]]:
    with ThreadPoolExecutor(max_workers=2) as pool:
        return [r for r in pool.map(lambda p: man_record(p, owners), man_pages()) if r is not None]


# ----------------------------------------------------------------------------------------------------- debian


def dpkg_descriptions() -> Iterator[tuple[str, str, str]]:
    """(package, synopsis, extended description) of every installed package."""
    for block in DPKG_STATUS.read_text(errors="replace").split("\n\n"):
        package = re.search(r"^Package: (\S+)$", block, flags=re.M)
        match = re.search(r"^Description: (.*)\n((?: .*\n?)*)", block, flags=re.M)
        if package and match:
            body = [line[1:] for line in match.group(2).splitlines()]
            text = " ".join("" if line.strip() == "." else line.strip() for line in body)
            yield package.group(1), match.group(1).strip(), " ".join(text.split())


def debian_records() -> list[dict[str, str]]:
    records = []
    for package, synopsis, body in dpkg_descriptions():
        if len(synopsis.split()) >= 3 and len(body.split()) >= MIN_WORDS:
            records.append({"query": synopsis, "document": truncate(body), "source": f"dpkg {package}",
                            "license": package_license(package)})
    return records


# ------------------------------------------------------------------------------------------------------ select


def select(records: list[dict[str, str]], *, count: int, seed: int = 0) -> list[dict[str, str]]:
    """Distinct queries and non-near-duplicate documents, then `count` drawn with a fixed seed (in source order)."""
    docs, queries, kept = DuplicateFilter(near=0.6), set(), []
    for record in sorted(records, key=lambda r: r["source"]):
        query = normalize(record["query"])
        if query in queries or not docs.add(record["document"]):
            continue
        queries.add(query)
        kept.append(record)
    if len(kept) < count:
        print(f"only {len(kept)} distinct records (asked {count}); keeping all", file=sys.stderr)
        return kept
    chosen = sorted(np.random.default_rng(seed).choice(len(kept), size=count, replace=False))
    return [kept[i] for i in chosen]


def write(name: str, records: list[dict[str, str]], folder: Path = SAMPLES) -> None:
    path = folder / name
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    print(f"{path}: {len(records)} pairs", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=PAIRS)
    parser.add_argument("--out-dir", type=Path, default=SAMPLES, help="where the two files go (default: the bundle)")
    args = parser.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    write("retrieval-debian.jsonl", select(debian_records(), count=args.pairs), args.out_dir)
    write("retrieval-manpages.jsonl", select(man_records(file_owners()), count=args.pairs), args.out_dir)


if __name__ == "__main__":
    main()
