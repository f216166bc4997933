"""Image folders as calibration / evaluation data: samples hold paths, pixels are decoded one image at a time.

A folder is read recursively (png, jpg / jpeg, bmp, webp); listing it reads no pixels, so a folder of 100k images
costs a list of paths, and only the images a split picks are ever decoded, when their feed is built. Labels come
from the sub-folder names (`label_field: folder`, ImageNet style `train/<class>/<image>.jpg`) or from a CSV file
(`label_field: labels.csv`, columns `file` and `label`, paths relative to the folder); a label is a class index or
a class name.

`views` > 1 makes each image several samples: view 0 is the whole image, view k a random crop (a quarter to all of
the area, aspect 3/4 to 4/3) flipped left-right half of the time, drawn from a generator seeded by the file name,
k and the data seed; the model's preprocessing then resizes and crops it as usual. The split keeps every view of
an image on one side (calibration or evaluation), so held-out crops come from held-out images.

Every image problem is one line naming the file: an unreadable or truncated file, one over `max_pixels` (a
decompression bomb: its header is read before any pixel), an empty folder. `on_error: skip` drops such images from
the split instead (each is named in a warning).

>>> samples = read_image_folder(Path("photos"), ImageFolderOptions(views=4))      # doctest: +SKIP
>>> samples[0].load().size                                                         # doctest: +SKIP
(451, 300)
"""

from __future__ import annotations

import csv
import hashlib
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from edgepack.errors import BadInputError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
#: PIL's own decompression-bomb limit (about 89 megapixels, a 9459 x 9459 image)
DEFAULT_MAX_PIXELS = 89_478_485
_FILE_COLUMNS = ("file", "path", "image", "filename")


class BadImageError(BadInputError):
    """An image file that cannot be used (unreadable, truncated, too large)."""


@dataclass(frozen=True)
class ImageFolderOptions:
    """How an image folder becomes samples (recipe `data.images`)."""

    views: int = 1
    on_error: Literal["error", "skip"] = "error"
    max_pixels: int = DEFAULT_MAX_PIXELS
    seed: int = 0

    def __post_init__(self) -> None:
        if self.views < 1:
            raise BadInputError(f"data.images.views must be >= 1, got {self.views}")
        if self.max_pixels < 1:
            raise BadInputError(f"data.images.max_pixels must be >= 1, got {self.max_pixels}")


@dataclass(frozen=True)
class ImageSample:
    """One image file (or one view of it) and its label; pixels are read by `load()`, never kept."""

    path: Path
    label: str | int | None = None
    view: int = 0
    seed: int = 0
    max_pixels: int = DEFAULT_MAX_PIXELS
    skip_bad: bool = field(default=False, compare=False)

    @property
    def group(self) -> str:
        """Samples of one group (the views of one image) stay together in a split."""
        return str(self.path)

    @property
    def mode_seed(self) -> int:
        """A per-sample seed (file name, view, data seed) for random crops in the preprocessing."""
        digest = hashlib.sha256(f"{self.path.name}|{self.view}|{self.seed}".encode()).digest()
        return int.from_bytes(digest[:8], "little")

    def content_key(self) -> tuple[Any, ...]:
        return ("image", str(self.path), self.view)

    def hash_key(self) -> list[Any]:
        """What a stage hash needs: the file's bytes (not its path), the view and the label."""
        from edgepack.artifacts import sha256_file

        return ["image", sha256_file(self.path), self.view, self.seed, self.label]

    def load(self) -> Any:
        """The decoded image (PIL), the view's crop and flip applied; BadImageError names the file."""
        image = open_image(self.path, max_pixels=self.max_pixels)
        return _view(image, self.view, self.mode_seed) if self.view else image

    def check(self) -> None:
        """Decode the whole file once (truncated files fail only when their last pixels are read)."""
        self.load()


def open_image(path: Path, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Any:
    """Decode `path` with PIL after checking its header's size against `max_pixels`."""
    from PIL import Image, UnidentifiedImageError

    fix = "remove or replace the file, or set data.images.on_error: skip"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit is checked below
            image = Image.open(path)
            width, height = image.size
            if width * height > max_pixels:
                raise BadImageError(f"{path}: {width} x {height} = {width * height:,} pixels, over the "
                                    f"{max_pixels:,}-pixel limit (a decompression bomb guard); {fix}, or raise "
                                    "data.images.max_pixels if the image is real")
            image.load()
    except BadImageError:
        raise
    except Image.DecompressionBombError as err:
        raise BadImageError(f"{path}: {err}; {fix}") from None
    except UnidentifiedImageError:
        raise BadImageError(f"{path}: not an image PIL can read (unknown or corrupt format); {fix}") from None
    except (OSError, SyntaxError, ValueError) as err:  # truncated / corrupt data inside a known format
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise BadImageError(f"{path}: corrupt or truncated image ({reason}); {fix}") from None
    return image


def _view(image: Any, view: int, seed: int) -> Any:
    """View k >= 1: a random crop of 25-100% of the area at aspect 3/4..4/3, flipped with probability 1/2."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    width, height = image.size
    area = rng.uniform(0.25, 1.0) * width * height
    aspect = float(np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3))))
    w = int(min(width, max(1, round(np.sqrt(area * aspect)))))
    h = int(min(height, max(1, round(np.sqrt(area / aspect)))))
    left, top = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
    crop = image.crop((left, top, left + w, top + h))
    return crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else crop


# ------------------------------------------------------------------------------------------------- the reader


def read_image_folder(folder: Path, options: ImageFolderOptions = ImageFolderOptions(), *,
                      labels: str | None = None) -> list[ImageSample]:
    """Every image under `folder` (recursively, sorted by path), as `views` samples each, with their labels."""
    files = list_images(folder)
    if not files:
        found = sorted({p.suffix.lower() for p in folder.rglob("*") if p.is_file()})
        other = f" (found only: {', '.join(found)})" if found else " (the folder is empty)"
        raise BadInputError(f"{folder}: no images{other}; a directory is read as an image folder ("
                            f"{', '.join(IMAGE_SUFFIXES)} files, in sub-folders per class if you like); for text or "
                            "arrays point at a .txt, .jsonl, .csv or .npz file")
    label_of = _labels(folder, files, labels)
    return [ImageSample(path, label_of.get(path), view, options.seed, options.max_pixels,
                        skip_bad=options.on_error == "skip")
            for path in files for view in range(options.views)]


def list_images(folder: Path) -> list[Path]:
    """Image files under `folder`, sorted; hidden files and folders are skipped. Reads no file content."""
    found = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [Path(root) / n for n in names if not n.startswith(".") and n.lower().endswith(IMAGE_SUFFIXES)]
    return sorted(found)


def _labels(folder: Path, files: list[Path], spec: str | None) -> dict[Path, str | int]:
    if spec is None:
        return {}
    if spec == "folder":
        labels: dict[Path, str | int] = {}
        for path in files:
            parent = path.parent.relative_to(folder)
            if parent != Path("."):
                labels[path] = parent.parts[0]
        if not labels:
            raise BadInputError(f"{folder}: label_field folder, but every image is directly in the folder; put each "
                                "class in its own sub-folder, or give a CSV (label_field: labels.csv)")
        return labels
    if spec.startswith(("bundled:", "package:")):
        from edgepack.calibration_data import resolve_data_path

        return _csv_labels(folder, files, resolve_data_path(spec))
    return _csv_labels(folder, files, Path(spec) if Path(spec).is_absolute() else folder / spec)


def _csv_labels(folder: Path, files: list[Path], csv_path: Path) -> dict[Path, str | int]:
    if not csv_path.is_file():
        raise BadInputError(f"label_field {csv_path}: no such file; name 'folder' (labels from sub-folder names) or "
                            "a CSV with columns file,label (paths relative to the image folder)")
    with csv_path.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    columns = list(rows[0]) if rows else []
    file_column = next((c for c in _FILE_COLUMNS if c in columns), None)
    if file_column is None or "label" not in columns:
        raise BadInputError(f"{csv_path}: needs a header with a file column ({' / '.join(_FILE_COLUMNS)}) and a label "
                            f"column, has {', '.join(columns) or 'none'}")
    known = set(files)
    labels: dict[Path, str | int] = {}
    for line, row in enumerate(rows, start=2):
        match = Path(row[file_column]) if Path(row[file_column]).is_absolute() else folder / row[file_column]
        if match not in known:
            raise BadInputError(f"{csv_path}:{line}: image '{row[file_column]}' is not in {folder}; fix the path "
                                "(relative to the image folder) or remove the row")
        value = (row.get("label") or "").strip()
        if not value:
            raise BadInputError(f"{csv_path}:{line}: empty label for '{row[file_column]}'")
        labels[match] = int(value) if value.lstrip("-").isdigit() else value
    return labels
