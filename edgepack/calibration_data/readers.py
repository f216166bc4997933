"""Read calibration / evaluation samples from text, JSONL, CSV and NPZ files and image folders, and split them.

The standard library (`json`, `csv`) and numpy (`np.load`) do the parsing; what we add is the checking: every bad
file raises one `BadInputError` line that names the file, the line / field / array, and the fix.

Files are streamed, never read whole: text, JSONL and CSV a line at a time (`iter_samples`), an uncompressed
.npz member memory-mapped (a compressed one is decompressed whole: numpy cannot map it). `read_split` draws the
calibration / evaluation split in two passes over the file, keeping a 16-byte digest per record rather than the
records (measured: 82 MB above the interpreter for a 1.0 GB file of 1M records, ~80 bytes a record while the
digests are sorted and the order drawn), and gives exactly what `split_samples(read_samples(...))` gives.

>>> samples = read_samples(sample_path(), field="text", pair_field="paraphrase")
>>> split = split_samples(samples, n_calibration=8, n_evaluation=4, seed=0, source="sentences.jsonl")
>>> len(split.calibration), len(split.evaluation)
(8, 4)
"""

from __future__ import annotations

import contextlib
import csv
import gzip
import hashlib
import io
import itertools
import json
import zipfile
import zlib
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from edgepack.calibration_data import Sample, TextSample
from edgepack.calibration_data.images import BadImageError, ImageFolderOptions, read_image_folder
from edgepack.errors import BadInputError, did_you_mean
from edgepack.registry import Registry

SAMPLES_DIR = Path(__file__).parent / "samples"

@dataclass(frozen=True)
class Fields:
    """Which record fields (JSONL keys, CSV columns) hold the text, its paraphrase and its label."""

    text: str = "text"
    pair: str | None = None
    #: for image folders: "folder" (sub-folder names) or a CSV file (columns file, label)
    label: str | None = None
    #: image folders only: views per image, what to do with a bad image, the pixel limit
    images: ImageFolderOptions | None = None


#: A reader takes the file and the field options and yields the samples in file order, reading as it goes.
Reader = Callable[[Path, Fields], Iterable[Sample]]
data_formats: Registry[Reader] = Registry("data format")
_SUFFIXES = {".txt": "text", ".jsonl": "jsonl", ".csv": "csv", ".npz": "npz"}


def sample_path(name: str = "sentences.jsonl") -> Path:
    """Path of a data file bundled with edgepack (in `edgepack/calibration_data/samples/`)."""
    path = SAMPLES_DIR / name
    if not path.is_file():
        known = sorted(p.name for p in SAMPLES_DIR.iterdir() if p.suffix in (*_SUFFIXES, ".gz"))
        raise BadInputError(
            f"no bundled sample file '{name}'{did_you_mean(name, known)}; bundled files: {', '.join(known)}"
        )
    return path


def read_samples(
    path: str | Path, *, format: str = "auto", field: str = "text", pair_field: str | None = None,
    label_field: str | None = None, images: ImageFolderOptions | None = None,
) -> list[Sample]:
    """Read every sample of `path`, in file order.

    Formats: `text` (.txt, one sample per non-blank line, stripped), `jsonl` (.jsonl, one JSON object per line,
    `field` holds the text and `pair_field` an optional paraphrase), `csv` (.csv with a header row, `field` and
    `pair_field` name columns), `npz` (.npz, every array has the sample dimension first; sample i is
    `{name: array[i]}`). `format="auto"` picks the format from the suffix. `field`, `pair_field` and `label_field`
    (a class index or name per record) apply to jsonl and csv only; a `pair_field` or `label_field` on a text or
    npz file is an error rather than silently ignored (an NPZ carries labels as its `labels` array). A folder is
    an `image-folder` (`calibration_data.images`): its images, `label_field` "folder" or a CSV file, `images` the
    views / error / size options.
    """
    samples = list(iter_samples(path, format=format, field=field, pair_field=pair_field, label_field=label_field,
                                images=images))
    if not samples:
        raise BadInputError(f"{path}: no samples (the file is empty, blank, or has no data rows); add at least one")
    return samples


def iter_samples(
    path: str | Path, *, format: str = "auto", field: str = "text", pair_field: str | None = None,
    label_field: str | None = None, limit: int | None = None, images: ImageFolderOptions | None = None,
) -> Iterator[Sample]:
    """The samples of `path` one at a time, in file order (`read_samples` without holding them); at most `limit`.

    The path and options are checked before the first sample; a bad record raises when it is reached. An empty
    file yields nothing (`read_samples` makes that an error)."""
    path = Path(path)
    if not path.exists():
        raise BadInputError(f"{path}: file not found; check the path (relative paths start at {Path.cwd()})")
    if path.is_dir() and format in ("auto", "image-folder"):
        return itertools.islice(iter(_read_image_folder(path, Fields(field, pair_field, label_field, images))), limit)
    if format == "image-folder":
        raise BadInputError(f"{path}: format image-folder needs a folder of images, not a file")
    if not path.is_file():
        raise BadInputError(f"{path}: is a directory, not a data file; point at a .txt, .jsonl, .csv or .npz file")
    format = _resolve_format(path, format)
    for option, value in (("pair_field", pair_field), ("label_field", label_field)):
        if value is not None and format in ("text", "npz"):
            raise BadInputError(f"{path}: {format} files carry no named fields; drop {option} or use a .jsonl / "
                                ".csv file")
    reader = data_formats.get(format)
    return itertools.islice(iter(reader(path, Fields(field, pair_field, label_field))), limit)


def _resolve_format(path: Path, format: str) -> str:
    if path.suffix.lower() == ".gz":  # data.jsonl.gz: the format of the name inside, read through gzip
        if format == "auto":
            format = _SUFFIXES.get(Path(path.stem).suffix.lower(), "")
        if format not in ("text", "jsonl", "csv") and format in (*data_formats.names(), ""):
            raise BadInputError(f"{path}: a gzip file must hold text, JSONL or CSV; name it .txt.gz, .jsonl.gz or "
                                ".csv.gz (an .npz is compressed already: give it uncompressed)")
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


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of each line, decoded one line at a time; a bad byte is named by its file offset.

    Lines end at "\n" ("\r\n" keeps its "\r", which callers strip); a leading UTF-8 byte order mark is dropped."""
    offset = 0
    with open_bytes(path) as handle, _gzip_errors(path):
        for lineno, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise BadInputError(f"{path}:{lineno}: not UTF-8 text (byte {offset + err.start}); save the file "
                                    "as UTF-8") from err
            if lineno == 1:
                line = line.removeprefix("\ufeff")
            offset += len(raw)
            yield lineno, line


def open_bytes(path: Path) -> BinaryIO:
    """The file's bytes; a .gz file decompressed as it is read (offsets in errors are then decompressed ones).
    The data readers and the distillation corpus (`corpus.stream_records`) open files through it."""
    return gzip.open(path, "rb") if path.suffix.lower() == ".gz" else path.open("rb")  # type: ignore[return-value]


@contextlib.contextmanager
def _gzip_errors(path: Path) -> Iterator[None]:
    """A corrupt or truncated .gz file becomes one line naming it (gzip raises while the stream is read)."""
    try:
        yield
    except (gzip.BadGzipFile, EOFError, zlib.error) as err:
        raise BadInputError(f"{path}: not a readable gzip file ({type(err).__name__}: {err}); re-compress it with "
                            "gzip or give the uncompressed file") from None


@data_formats.register("text")
def _read_text(path: Path, fields: Fields) -> Iterator[Sample]:
    for _, line in _lines(path):
        # str.splitlines also breaks at \r, \v, \f, \x1c-\x1e, \x85, \u2028/9: as whole-file splitlines did
        for piece in line.splitlines():
            if piece.strip():
                yield TextSample(piece.strip())


@data_formats.register("jsonl")
def _read_jsonl(path: Path, fields: Fields) -> Iterator[Sample]:
    """One JSON object per "\n"-ended line (JSON Lines): a U+2028 inside a string is text, not a line break."""
    for lineno, line in _lines(path):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise BadInputError(
                f"{path}:{lineno}: not valid JSON ({err.msg} at column {err.colno}); write one JSON object per line"
            ) from err
        except (RecursionError, ValueError) as err:  # nesting past the stack, an int of more than 4300 digits
            raise BadInputError(f"{path}:{lineno}: JSON this reader cannot hold ({type(err).__name__}: "
                                f"{str(err)[:80]}); write flat records like {{\"{fields.text}\": \"...\"}}") from None
        if not isinstance(record, dict):
            raise BadInputError(
                f'{path}:{lineno}: expected a JSON object like {{"{fields.text}": "..."}}, got {type(record).__name__}'
            )
        yield _text_sample(record, path, lineno, fields, kind="field")


@data_formats.register("csv")
def _read_csv(path: Path, fields: Fields) -> Iterator[Sample]:
    with open_bytes(path) as raw, _gzip_errors(path), io.TextIOWrapper(raw, encoding="utf-8-sig", newline="") as file:
        rows = csv.DictReader(file)
        try:
            for row in rows:
                yield _text_sample(row, path, rows.line_num, fields, kind="column")
        except UnicodeDecodeError as err:
            raise BadInputError(f"{path}:{rows.line_num + 1}: not UTF-8 text (byte {raw.tell() - len(err.object) + err.start} "
                                "or near it); save the file as UTF-8") from err
        except csv.Error as err:
            raise BadInputError(f"{path}:{rows.line_num}: not valid CSV ({err}); fix the quoting on that line") from err


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


@data_formats.register("image-folder")
def _read_image_folder(path: Path, fields: Fields) -> list[Sample]:
    if fields.pair is not None:
        raise BadInputError(f"{path}: an image folder has no pair_field; drop it")
    return list(read_image_folder(path, fields.images or ImageFolderOptions(), labels=fields.label))


@data_formats.register("npz")
def _read_npz(path: Path, fields: Fields) -> Iterator[Sample]:
    arrays = _load_npz(path)
    if not arrays:
        return
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
    for i in range(next(iter(lengths.values()))):
        yield {name: np.asarray(array[i]) for name, array in arrays.items()}


_NPZ_FIX = "save the arrays with numpy.savez(path, input_ids=..., attention_mask=...)"


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    """name -> array; an uncompressed member is memory-mapped where it lies in the zip (numpy.savez stores them
    so), a compressed one (savez_compressed) is read whole. Never unpickled (allow_pickle=False)."""
    with path.open("rb") as file:
        magic = file.read(6)
    if magic.startswith(b"\x93NUMPY"):
        raise BadInputError(f"{path}: holds a single .npy array, not an .npz archive; {_NPZ_FIX}")
    # np.load treats anything that is neither zip nor .npy as a pickle; we never unpickle user files.
    if not magic.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        raise BadInputError(f"{path}: not a valid .npz archive (no zip header); {_NPZ_FIX}")
    try:
        with zipfile.ZipFile(path) as archive:
            members = [info for info in archive.infolist() if info.filename.endswith(".npy")]
            return {info.filename.removesuffix(".npy"): _npz_member(path, archive, info) for info in members}
    except (zipfile.BadZipFile, OSError, EOFError, NotImplementedError, RuntimeError) as err:
        raise BadInputError(f"{path}: not a valid .npz archive ({err}); {_NPZ_FIX}") from err
    except ValueError as err:  # object arrays need pickle; a bad .npy header
        raise BadInputError(f"{path}: cannot read the arrays ({err}); store numeric arrays only, {_NPZ_FIX}") from err


def _npz_member(path: Path, archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> np.ndarray:
    with archive.open(info) as member:
        version = np.lib.format.read_magic(member)
        if version not in ((1, 0), (2, 0)):
            return _read_whole(archive, info)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
            np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(member)  # numpy's own .npy header parser (size-limited)
        header = member.tell()
    if dtype.hasobject:
        raise ValueError(f"array '{info.filename}' holds Python objects (dtype {dtype}), which need pickle")
    if info.compress_type != zipfile.ZIP_STORED or fortran or not shape or 0 in shape:
        return _read_whole(archive, info)
    with path.open("rb") as handle:  # the member's data starts after its local header (30 bytes + name + extra)
        handle.seek(info.header_offset + 26)
        name_length, extra_length = np.frombuffer(handle.read(4), "<u2")
    offset = info.header_offset + 30 + int(name_length) + int(extra_length) + header
    count = int(np.prod(shape, dtype=np.int64))
    if offset + count * dtype.itemsize > path.stat().st_size:
        raise OSError(f"array '{info.filename}' is cut short (the file is truncated)")
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=tuple(shape))


def _read_whole(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> np.ndarray:
    with archive.open(info) as member:
        return np.load(member, allow_pickle=False)


@dataclass(frozen=True)
class DataSplit:
    """Disjoint calibration and evaluation samples drawn from one source."""

    calibration: list[Sample]
    evaluation: list[Sample]


def _check_counts(n_calibration: int, n_evaluation: int, source: str) -> None:
    if n_calibration < 1:
        raise BadInputError(f"{source}: n_calibration is {n_calibration}; calibration needs at least 1 sample")
    if n_evaluation < 0:
        raise BadInputError(f"{source}: n_evaluation is {n_evaluation}; use 0 or more")


def _check_enough(unique: int, total: int, n_calibration: int, n_evaluation: int, source: str) -> None:
    """`unique` distinct samples of `total` read must cover both parts of the split."""
    if unique < n_calibration + n_evaluation:
        dropped = total - unique
        note = f" ({dropped} duplicates dropped)" if dropped else ""
        raise BadInputError(
            f"{source}: {unique} unique samples{note}, but the recipe asks for {n_calibration} calibration + "
            f"{n_evaluation} evaluation; lower data.n_calibration / data.n_evaluation or supply more samples"
        )


def split_samples(
    samples: Sequence[Sample], *, n_calibration: int, n_evaluation: int, seed: int, source: str,
    hold_out_labelled: bool = False,
) -> DataSplit:
    """Drop exact duplicates (first one kept), shuffle with `numpy.random.default_rng(seed)`, then take
    `n_calibration` samples for calibration and the next `n_evaluation` for evaluation (never the same content).
    `hold_out_labelled` (grouped samples: images): groups with a label go to evaluation first, in file order."""
    _check_counts(n_calibration, n_evaluation, source)
    unique = _drop_duplicates(samples)
    _check_enough(len(unique), len(samples), n_calibration, n_evaluation, source)
    rng = np.random.default_rng(seed)
    if any(hasattr(s, "group") for s in unique):
        return _split_by_group(unique, rng, n_calibration=n_calibration, n_evaluation=n_evaluation, source=source,
                               hold_out_labelled=hold_out_labelled)
    order = rng.permutation(len(unique))
    chosen = screen_samples([unique[i] for i in order], n_calibration + n_evaluation, source=source)
    return DataSplit(calibration=chosen[:n_calibration], evaluation=chosen[n_calibration:])


def _split_by_group(samples: Sequence[Sample], rng: np.random.Generator, *, n_calibration: int, n_evaluation: int,
                    source: str, hold_out_labelled: bool = False) -> DataSplit:
    """Whole groups (the views of one image) go to calibration until it is full, the rest to evaluation: no image
    contributes to both. Groups are shuffled, samples inside a group keep their order. With `hold_out_labelled`,
    the labelled groups come first, in file order, and go to evaluation only; the unlabelled ones are shuffled."""
    groups: dict[str, list[Sample]] = {}
    for sample in samples:
        groups.setdefault(str(getattr(sample, "group", id(sample))), []).append(sample)
    held = [k for k in groups if any(getattr(s, "label", None) is not None for s in groups[k])] \
        if hold_out_labelled else []
    keys = [k for k in groups if k not in held]
    order = [*held, *(keys[i] for i in rng.permutation(len(keys)))]
    calibration: list[Sample] = []
    evaluation: list[Sample] = []
    for key in order:
        if not screen_samples(groups[key][:1], 1, source=source, partial=True):
            continue  # a bad image (on_error: skip): its views go with it
        members = groups[key]
        if key in held:
            evaluation += members[: max(0, n_evaluation - len(evaluation))]
        elif len(calibration) < n_calibration:
            calibration += members[: n_calibration - len(calibration)]
        elif len(evaluation) < n_evaluation:
            evaluation += members[: n_evaluation - len(evaluation)]
        else:
            break
    if len(calibration) < n_calibration or len(evaluation) < n_evaluation:
        raise BadInputError(
            f"{source}: {len(groups)} images give {len(calibration)} calibration + {len(evaluation)} evaluation "
            f"samples with no image on both sides, but the recipe asks for {n_calibration} + {n_evaluation}; "
            "lower data.n_calibration / data.n_evaluation, raise data.images.views, or add images"
        )
    return DataSplit(calibration=calibration, evaluation=evaluation)


def screen_samples(samples: Sequence[Sample], needed: int, *, source: str, partial: bool = False) -> list[Sample]:
    """The first `needed` usable samples. A sample with a `check()` (an image) is decoded once: a bad one raises
    its one-line error, or is skipped with a warning when it was read with on_error: skip."""
    from edgepack.reporter import get_reporter

    chosen: list[Sample] = []
    for sample in samples:
        if len(chosen) >= needed:
            break
        check = getattr(sample, "check", None)
        if check is not None:
            try:
                check()
            except BadImageError as err:
                if not getattr(sample, "skip_bad", False):
                    raise
                get_reporter().warn(f"skipped: {err}")
                continue
        chosen.append(sample)
    if not partial and len(chosen) < needed and len(chosen) < len(samples):
        raise BadInputError(f"{source}: only {len(chosen)} usable samples of the {needed} needed (the others were "
                            "skipped as bad images); add images or lower the sample counts")
    return chosen


def _drop_duplicates(samples: Sequence[Sample]) -> list[Sample]:
    seen: set[Hashable] = set()
    unique: list[Sample] = []
    for sample in samples:
        key = _content_key(sample)
        if key not in seen:
            seen.add(key)
            unique.append(sample)
    return unique


def _content_key(sample: Sample) -> bytes:
    """A 16-byte digest of what makes samples equal: the text; or names, dtypes, shapes and bytes of the arrays.

    A digest rather than the content, so the set of seen samples stays small (BLAKE2b-128: a collision, which
    would drop a sample as a duplicate, is ~1e-20 likely for a billion samples)."""
    digest = hashlib.blake2b(digest_size=16)
    if isinstance(sample, TextSample):
        digest.update(b"text\0" + sample.text.encode("utf-8", "surrogatepass"))
        return digest.digest()
    if hasattr(sample, "content_key"):  # an image: its file and view (the pixels are not read here)
        digest.update(repr(sample.content_key()).encode("utf-8", "surrogatepass"))
        return digest.digest()
    for name, array in sorted(sample.items()):
        digest.update(f"{name}\0{array.dtype.str}\0{array.shape}\0".encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.digest()


def read_split(
    path: str | Path, *, n_calibration: int, n_evaluation: int, seed: int, source: str, format: str = "auto",
    field: str = "text", pair_field: str | None = None, label_field: str | None = None,
) -> DataSplit:
    """`split_samples(read_samples(path, ...), ...)` in two streaming passes: the first keeps a digest per record
    (to drop duplicates and count), the second keeps only the chosen records. Same result, same errors."""
    options = {"format": format, "field": field, "pair_field": pair_field, "label_field": label_field}
    _check_counts(n_calibration, n_evaluation, source)
    digests = _digests(iter_samples(path, **options))  # (records, 16) uint8: ~16 bytes a record
    if not len(digests):
        raise BadInputError(f"{path}: no samples (the file is empty, blank, or has no data rows); add at least one")
    _, first = np.unique(digests.view(np.dtype((np.void, 16))).ravel(), return_index=True)
    unique_positions = np.sort(first)  # file positions of the first copy of each sample, in file order
    _check_enough(len(unique_positions), len(digests), n_calibration, n_evaluation, source)
    needed = n_calibration + n_evaluation
    order = np.random.default_rng(seed).permutation(len(unique_positions))[:needed]
    wanted = {int(unique_positions[i]): rank for rank, i in enumerate(order)}
    chosen: list[Sample | None] = [None] * needed
    for position, sample in enumerate(iter_samples(path, **options)):
        if position in wanted:
            chosen[wanted[position]] = sample
    if any(sample is None for sample in chosen):
        raise BadInputError(f"{path}: the file changed while it was read; read it again when it is complete")
    return DataSplit(calibration=chosen[:n_calibration], evaluation=chosen[n_calibration:])  # type: ignore[arg-type]


def _digests(samples: Iterable[Sample], *, block: int = 1 << 16) -> np.ndarray:
    """(N, 16) uint8 digests, grown a block at a time."""
    blocks, current = [], bytearray()
    for sample in samples:
        current += _content_key(sample)
        if len(current) >= 16 * block:
            blocks.append(np.frombuffer(bytes(current), np.uint8))
            current = bytearray()
    blocks.append(np.frombuffer(bytes(current), np.uint8))
    return np.concatenate(blocks).reshape(-1, 16)


__all__ = ["DataSplit", "Fields", "data_formats", "iter_samples", "read_samples", "read_split", "sample_path",
           "screen_samples", "split_samples"]
