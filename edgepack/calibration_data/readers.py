"""Read calibration / evaluation samples from text, JSONL, CSV and NPZ files, and split them.

The standard library (`json`, `csv`) and numpy (`np.load`) do the parsing; what we add is the checking: every bad
file raises one `BadInputError` line that names the file, the line / field / array, and the fix.

>>> samples = read_samples(sample_path(), field="text", pair_field="paraphrase")
>>> split = split_samples(samples, n_calibration=8, n_evaluation=4, seed=0, source="sentences.jsonl")
>>> len(split.calibration), len(split.evaluation)
(8, 4)
"""

from __future__ import annotations

import csv
import json
import zipfile
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgepack.calibration_data import Sample, TextSample
from edgepack.errors import BadInputError, did_you_mean
from edgepack.registry import Registry

SAMPLES_DIR = Path(__file__).parent / "samples"

@dataclass(frozen=True)
class Fields:
    """Which record fields (JSONL keys, CSV columns) hold the text, its paraphrase and its label."""

    text: str = "text"
    pair: str | None = None
    label: str | None = None


#: A reader takes the file and the field options and returns the samples in file order.
Reader = Callable[[Path, Fields], list[Sample]]
data_formats: Registry[Reader] = Registry("data format")
_SUFFIXES = {".txt": "text", ".jsonl": "jsonl", ".csv": "csv", ".npz": "npz"}


def sample_path(name: str = "sentences.jsonl") -> Path:
    """Path of a data file bundled with edgepack (in `edgepack/calibration_data/samples/`)."""
    path = SAMPLES_DIR / name
    if not path.is_file():
        known = sorted(p.name for p in SAMPLES_DIR.iterdir() if p.suffix in _SUFFIXES)
        raise BadInputError(
            f"no bundled sample file '{name}'{did_you_mean(name, known)}; bundled files: {', '.join(known)}"
        )
    return path


def read_samples(
    path: str | Path, *, format: str = "auto", field: str = "text", pair_field: str | None = None,
    label_field: str | None = None,
) -> list[Sample]:
    """Read every sample of `path`, in file order.

    Formats: `text` (.txt, one sample per non-blank line, stripped), `jsonl` (.jsonl, one JSON object per line,
    `field` holds the text and `pair_field` an optional paraphrase), `csv` (.csv with a header row, `field` and
    `pair_field` name columns), `npz` (.npz, every array has the sample dimension first; sample i is
    `{name: array[i]}`). `format="auto"` picks the format from the suffix. `field`, `pair_field` and `label_field`
    (a class index or name per record) apply to jsonl and csv only; a `pair_field` or `label_field` on a text or
    npz file is an error rather than silently ignored (an NPZ carries labels as its `labels` array).
    """
    path = Path(path)
    if not path.exists():
        raise BadInputError(f"{path}: file not found; check the path (relative paths start at {Path.cwd()})")
    if not path.is_file():
        raise BadInputError(f"{path}: is a directory, not a data file; point at a .txt, .jsonl, .csv or .npz file")
    format = _resolve_format(path, format)
    for option, value in (("pair_field", pair_field), ("label_field", label_field)):
        if value is not None and format in ("text", "npz"):
            raise BadInputError(f"{path}: {format} files carry no named fields; drop {option} or use a .jsonl / "
                                ".csv file")
    reader = data_formats.get(format)
    samples = reader(path, Fields(field, pair_field, label_field))
    if not samples:
        raise BadInputError(f"{path}: no samples (the file is empty, blank, or has no data rows); add at least one")
    return samples


def _resolve_format(path: Path, format: str) -> str:
    if format == "auto":
        suffix = path.suffix.lower()
        if suffix not in _SUFFIXES:
            accepted = ", ".join(_SUFFIXES)
            raise BadInputError(
                f"{path}: cannot tell the data format from the suffix '{suffix}'; rename it to one of {accepted} "
                f"or set format= to one of {', '.join(data_formats.names())}"
            )
        return _SUFFIXES[suffix]
    if format not in data_formats:
        raise BadInputError(
            f"{path}: unknown data format '{format}'{did_you_mean(format, data_formats.names())}; "
            f"known: auto, {', '.join(data_formats.names())}"
        )
    return format


def _read_text_file(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise BadInputError(f"{path}: not UTF-8 text (byte {err.start}); save the file as UTF-8") from err


@data_formats.register("text")
def _read_text(path: Path, fields: Fields) -> list[Sample]:
    return [TextSample(line.strip()) for line in _read_text_file(path).splitlines() if line.strip()]


@data_formats.register("jsonl")
def _read_jsonl(path: Path, fields: Fields) -> list[Sample]:
    samples: list[Sample] = []
    for lineno, line in enumerate(_read_text_file(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise BadInputError(
                f"{path}:{lineno}: not valid JSON ({err.msg} at column {err.colno}); write one JSON object per line"
            ) from err
        if not isinstance(record, dict):
            raise BadInputError(
                f'{path}:{lineno}: expected a JSON object like {{"{fields.text}": "..."}}, got {type(record).__name__}'
            )
        samples.append(_text_sample(record, path, lineno, fields, kind="field"))
    return samples


@data_formats.register("csv")
def _read_csv(path: Path, fields: Fields) -> list[Sample]:
    with path.open(newline="", encoding="utf-8") as file:
        rows = csv.DictReader(file)
        try:
            samples: list[Sample] = [
                _text_sample(row, path, rows.line_num, fields, kind="column") for row in rows
            ]
        except UnicodeDecodeError as err:
            raise BadInputError(f"{path}: not UTF-8 text (byte {err.start}); save the file as UTF-8") from err
        except csv.Error as err:
            raise BadInputError(f"{path}:{rows.line_num}: not valid CSV ({err}); fix the quoting on that line") from err
    return samples


def _text_sample(record: dict[str, Any], path: Path, lineno: int, fields: Fields, *, kind: str) -> TextSample:
    """One TextSample from a JSONL object or a CSV row; `kind` ("field" / "column") only words the errors."""
    text = _text_value(record, path, lineno, fields.text, kind, option="field")
    pair = None if fields.pair is None else _text_value(record, path, lineno, fields.pair, kind, option="pair_field")
    label = None if fields.label is None else _label_value(record, path, lineno, fields.label, kind)
    return TextSample(text, pair=pair, label=label)


def _label_value(record: dict[str, Any], path: Path, lineno: int, name: str, kind: str) -> str | int:
    """A class label: a JSON integer, or a non-empty string (a class name, or a CSV cell holding an index)."""
    value = record.get(name)
    if isinstance(value, bool) or not isinstance(value, (int, str)) or (isinstance(value, str) and not value.strip()):
        known = [key for key in record if isinstance(key, str)]
        raise BadInputError(
            f"{path}:{lineno}: {kind} '{name}'{did_you_mean(name, known)} is {json.dumps(value)}, not a class "
            "label (an integer index or a class name); set label_field= to the field that holds the label"
        )
    return value.strip() if isinstance(value, str) else value


def _text_value(record: dict[str, Any], path: Path, lineno: int, name: str, kind: str, *, option: str) -> str:
    known = [key for key in record if isinstance(key, str)]  # csv.DictReader keys extra cells under None
    if name not in known:
        raise BadInputError(
            f"{path}:{lineno}: no {kind} '{name}'{did_you_mean(name, known)}; "
            f"this record has {', '.join(known) or 'none'}; set {option}= to the {kind} that holds the text"
        )
    value = record[name]
    if value is None and kind == "column":  # csv.DictReader fills a short row's missing cells with None
        raise BadInputError(
            f"{path}:{lineno}: the row has fewer cells than the header, so column '{name}' is missing; add the cells"
        )
    if not isinstance(value, str) or not value.strip():
        raise BadInputError(
            f"{path}:{lineno}: {kind} '{name}' is {json.dumps(value)}, not non-empty text; fix or remove the record"
        )
    return value.strip()


@data_formats.register("npz")
def _read_npz(path: Path, fields: Fields) -> list[Sample]:
    arrays = _load_npz(path)
    if not arrays:
        return []
    for name, array in arrays.items():
        if array.ndim == 0:
            raise BadInputError(
                f"{path}: array '{name}' is a scalar; every array needs the sample dimension first, shape (N, ...)"
            )
    lengths = {name: array.shape[0] for name, array in arrays.items()}
    if len(set(lengths.values())) > 1:
        listed = ", ".join(f"'{name}' has {n}" for name, n in lengths.items())
        raise BadInputError(
            f"{path}: arrays disagree on the sample count (first dimension): {listed}; "
            "save every array with the same number of samples first"
        )
    n = next(iter(lengths.values()))
    return [{name: array[i] for name, array in arrays.items()} for i in range(n)]


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    fix = "save the arrays with numpy.savez(path, input_ids=..., attention_mask=...)"
    with path.open("rb") as file:
        magic = file.read(6)
    if magic.startswith(b"\x93NUMPY"):
        raise BadInputError(f"{path}: holds a single .npy array, not an .npz archive; {fix}")
    # np.load treats anything that is neither zip nor .npy as a pickle; we never unpickle user files.
    if not magic.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        raise BadInputError(f"{path}: not a valid .npz archive (no zip header); {fix}")
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {name: npz[name] for name in npz.files}
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        raise BadInputError(f"{path}: not a valid .npz archive ({err}); {fix}") from err
    except ValueError as err:  # object arrays need pickle
        raise BadInputError(f"{path}: cannot read the arrays ({err}); store numeric arrays only, {fix}") from err


@dataclass(frozen=True)
class DataSplit:
    """Disjoint calibration and evaluation samples drawn from one source."""

    calibration: list[Sample]
    evaluation: list[Sample]


def split_samples(
    samples: Sequence[Sample], *, n_calibration: int, n_evaluation: int, seed: int, source: str
) -> DataSplit:
    """Drop exact duplicates (first one kept), shuffle with `numpy.random.default_rng(seed)`, then take
    `n_calibration` samples for calibration and the next `n_evaluation` for evaluation (never the same content)."""
    if n_calibration < 1:
        raise BadInputError(f"{source}: n_calibration is {n_calibration}; calibration needs at least 1 sample")
    if n_evaluation < 0:
        raise BadInputError(f"{source}: n_evaluation is {n_evaluation}; use 0 or more")
    unique = _drop_duplicates(samples)
    needed = n_calibration + n_evaluation
    if len(unique) < needed:
        dropped = len(samples) - len(unique)
        note = f" ({dropped} duplicates dropped)" if dropped else ""
        raise BadInputError(
            f"{source}: {len(unique)} unique samples{note}, but the recipe asks for {n_calibration} calibration + "
            f"{n_evaluation} evaluation; lower data.n_calibration / data.n_evaluation or supply more samples"
        )
    order = np.random.default_rng(seed).permutation(len(unique))
    chosen = [unique[i] for i in order[:needed]]
    return DataSplit(calibration=chosen[:n_calibration], evaluation=chosen[n_calibration:])


def _drop_duplicates(samples: Sequence[Sample]) -> list[Sample]:
    seen: set[Hashable] = set()
    unique: list[Sample] = []
    for sample in samples:
        key = _content_key(sample)
        if key not in seen:
            seen.add(key)
            unique.append(sample)
    return unique


def _content_key(sample: Sample) -> Hashable:
    """Text samples are equal by text; array samples by names, dtypes, shapes and bytes."""
    if isinstance(sample, TextSample):
        return ("text", sample.text)
    return tuple(
        (name, array.dtype.str, array.shape, np.ascontiguousarray(array).tobytes())
        for name, array in sorted(sample.items())
    )


__all__ = ["DataSplit", "Fields", "data_formats", "read_samples", "sample_path", "split_samples"]
