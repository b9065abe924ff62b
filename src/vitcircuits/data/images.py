"""Image sources, safe decoding to RGB, and the bad-input policy.

A *source spec* is one string resolved by :func:`resolve_source` into an :class:`ImageSource`, an
ordered tuple of :class:`ImageItem` (the order is deterministic, see the function docstring).

Decoding (:func:`open_image`) never trusts the file: anything that cannot become a sane RGB image
raises :class:`BadImage` with a one-line reason. The policy for bad inputs is *skip and warn once*:
each becomes a :class:`SkippedImage`, which ``vitcircuits.data.loader.SkipLog`` warns about once
(logger ``vitcircuits.data``) and keeps for the run manifest; the run goes on.
"""

from __future__ import annotations

import csv
import glob
import importlib.resources
import io
import itertools
import os
import random
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jfif", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm"}
)
LABELS_FILE = "labels.tsv"
# Same as PIL's hard limit (2 * PIL.Image.MAX_IMAGE_PIXELS with the default setting).
DEFAULT_MAX_PIXELS = 178_956_970
DEFAULT_MIN_SIZE = 8
_GLOB_CHARS = frozenset("*?[")
_SIXTEEN_BIT_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N"})


class BadImage(Exception):
    """An input that cannot be decoded into a usable RGB image; ``str(exc)`` is the one-line reason."""

    def __init__(self, reason: str) -> None:
        super().__init__(" ".join(reason.split()))


@dataclass(frozen=True)
class ImageItem:
    """One entry of a resolved source.

    Attributes:
        index: position in the full deterministic order of the source (kept after subsampling).
        id: stable string id: posix path relative to the source root, or ``hf:NAME:SPLIT/ROW``.
        path: file to decode, or None when the encoded bytes are held in ``data``.
        data: encoded image bytes (HuggingFace rows), or None for files.
        label: class index from ``labels.tsv`` / the dataset's ``label`` column, None if unknown.
    """

    index: int
    id: str
    path: Path | None = None
    data: bytes | None = field(default=None, repr=False)
    label: int | None = None


@dataclass(frozen=True)
class SkippedImage:
    """An input dropped by the bad-input policy.

    Attributes:
        index: ``ImageItem.index`` of the input.
        id: ``ImageItem.id`` of the input.
        reason: one-line human-readable reason.
    """

    index: int
    id: str
    reason: str


@dataclass(frozen=True)
class ImageSource:
    """A resolved, ordered list of images.

    Attributes:
        spec: the source spec string it was resolved from.
        items: the selected items, in deterministic order.
    """

    spec: str
    items: tuple[ImageItem, ...]

    def __len__(self) -> int:
        return len(self.items)

    @property
    def ids(self) -> tuple[str, ...]:
        """Item ids in order."""
        return tuple(item.id for item in self.items)


# --------------------------------------------------------------------------------------------------
# Decoding


def open_image(
    source: str | os.PathLike | bytes,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_size: int = DEFAULT_MIN_SIZE,
) -> Image.Image:
    """Decode a file (or encoded bytes) into a fully loaded RGB image, or raise :class:`BadImage`.

    * EXIF orientation is applied (``ImageOps.exif_transpose``); animated images give frame 0.
    * Images whose header declares more than ``max_pixels`` pixels are rejected before decoding.
      PIL's own check is muted but its hard limit (``2 * PIL.Image.MAX_IMAGE_PIXELS``) still
      applies and is reported the same way; PIL's global setting is never modified.
    * Images with a side shorter than ``min_size`` are rejected (they carry no usable signal).
    * Colour: see :func:`to_rgb` (alpha is composited onto white).

    Truncated files are rejected unless someone set PIL's global ``ImageFile.LOAD_TRUNCATED_IMAGES``.
    """
    if isinstance(source, bytes):
        data = source
    else:
        try:
            data = Path(source).read_bytes()
        except FileNotFoundError:
            raise BadImage("file not found") from None
        except OSError as exc:
            raise BadImage(f"cannot read file: {exc.strerror or exc}") from None
    if not data:
        raise BadImage("empty file (0 bytes)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))
        except UnidentifiedImageError:
            raise BadImage("not a recognised image format") from None
        except Image.DecompressionBombError as exc:
            raise BadImage(f"decompression bomb: {exc}") from None
        except Exception as exc:  # untrusted input: PIL raises many exception types on bad headers
            raise BadImage(f"unreadable image header: {type(exc).__name__}: {exc}") from None
        width, height = image.size
        if width * height > max_pixels:
            raise BadImage(
                f"decompression bomb: {width}x{height} = {width * height} pixels > max_pixels {max_pixels}"
            )
        if min(width, height) < min_size:
            raise BadImage(f"too small: {width}x{height} < min_size {min_size}")
        try:
            image.load()
            image = ImageOps.exif_transpose(image)
        except Exception as exc:  # truncated / corrupt data surfaces as OSError, SyntaxError, ValueError...
            raise BadImage(f"corrupt or truncated image: {type(exc).__name__}: {exc}") from None
    try:
        return to_rgb(image)
    except ValueError as exc:
        raise BadImage(f"cannot convert mode {image.mode} to RGB: {exc}") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any decoded PIL mode to 8-bit RGB.

    * alpha (RGBA, LA, PA, and palette/grey/RGB with a ``transparency`` entry) is composited onto
      a white background, so fully transparent pixels become (255, 255, 255);
    * 16-bit greyscale (``I;16*`` and ``I``, which PIL uses for 16-bit PNG/TIFF) is scaled by
      255/65535 (values clipped to [0, 65535]), so 65535 becomes 255;
    * CMYK, palette, 1-bit, L, YCbCr, LAB, HSV use PIL's conversion (ICC profiles are ignored);
    * float images (``F``) have no agreed range and are rejected with :class:`BadImage`.
    """
    mode = image.mode
    if mode == "RGB":
        return image
    if mode == "F":
        raise BadImage("unsupported mode F (floating point pixels have no defined range)")
    if mode in _SIXTEEN_BIT_MODES:
        values = np.clip(np.asarray(image, dtype=np.int64), 0, 65535)
        grey = ((values * 255 + 32767) // 65535).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if "A" in mode or "a" in mode or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def open_item(
    item: ImageItem, *, max_pixels: int = DEFAULT_MAX_PIXELS, min_size: int = DEFAULT_MIN_SIZE
) -> Image.Image:
    """:func:`open_image` on the item's bytes or file."""
    source = item.data if item.data is not None else item.path
    return open_image(source, max_pixels=max_pixels, min_size=min_size)


# --------------------------------------------------------------------------------------------------
# Sources


def read_labels(folder: str | os.PathLike) -> dict[str, int] | None:
    """Read ``folder/labels.tsv`` into ``{relative posix path: class index}``; None if absent.

    The file is tab-separated with a header row that must contain ``filename`` and ``index``
    columns; other columns (``label``, ``wnid``, ...) are ignored.
    """
    path = Path(folder) / LABELS_FILE
    if not path.is_file():
        return None
    with path.open(newline="", encoding="utf-8-sig") as handle:
        rows = csv.DictReader(handle, delimiter="\t")
        missing = {"filename", "index"} - set(rows.fieldnames or ())
        if missing:
            raise ValueError(f"{path}: header lacks column(s) {sorted(missing)}")
        labels = {}
        for row in rows:
            try:
                labels[row["filename"]] = int(row["index"])
            except (TypeError, ValueError):
                raise ValueError(f"{path} line {rows.line_num}: bad index {row['index']!r}") from None
    return labels


def resolve_source(
    spec: str, *, max_images: int | None = None, sample_seed: int | None = None
) -> ImageSource:
    """Resolve a source spec into an ordered :class:`ImageSource`.

    Specs, tried in this order:

    * ``bundled:NAME``: images shipped in ``vitcircuits/assets/images/NAME/`` (a folder source);
      ``bundled:`` alone raises an error listing the available names;
    * ``hf:DATASET[:SPLIT]``: a HuggingFace ``datasets`` split (default ``train``), streamed in
      dataset order; needs the optional ``datasets`` package;
    * an existing folder: every image file below it (extension in ``IMAGE_EXTENSIONS``, hidden files
      and folders skipped), sorted by relative posix path;
    * an existing ``.txt`` file: a list file, one path per line, in file order; relative paths are
      resolved against the list file's folder; blank lines and lines starting with ``#`` are ignored;
    * any other existing file: that single image (a non-image is reported as bad at load time);
    * a glob pattern (contains ``*``, ``?`` or ``[``; ``**`` recurses): matching image files,
      sorted by path relative to the pattern's fixed leading folder.

    Ids are posix paths relative to the source root (the folder; the list file's, single file's or
    pattern's folder); labels come from ``labels.tsv`` in that root (see :func:`read_labels`).

    Selection: ``max_images`` keeps the first N items; with ``sample_seed`` it instead keeps N items
    drawn uniformly with that seed (still in source order). ``ImageItem.index`` stays the position
    in the full order. Sampling a ``hf:`` source reads the whole split.
    """
    if max_images is not None and max_images < 0:
        raise ValueError(f"max_images must be >= 0, got {max_images}")
    if sample_seed is not None and max_images is None:
        raise ValueError("sample_seed needs max_images (the sample size)")
    if spec.startswith("hf:"):
        return ImageSource(spec, _resolve_hf(spec, max_images, sample_seed))
    if spec.startswith("bundled:"):
        root, rel_paths = _bundled_root(spec.removeprefix("bundled:")), None
    else:
        root, rel_paths = _resolve_path_spec(spec)
    if rel_paths is None:
        rel_paths = _list_folder(root)
    root = Path(os.path.abspath(root))
    labels = read_labels(root) or {}
    items = [
        ImageItem(index=i, id=rel, path=root / rel, label=labels.get(rel)) for i, rel in enumerate(rel_paths)
    ]
    return ImageSource(spec, tuple(_select(items, max_images, sample_seed)))


def _resolve_path_spec(spec: str) -> tuple[Path, list[str] | None]:
    """Root folder and relative paths for a path-like spec (None: list the whole folder)."""
    path = Path(spec)
    if path.is_dir():
        return path, None
    if path.is_file() and path.suffix.lower() == ".txt":
        return path.parent, _read_list_file(path)
    if path.is_file():
        return path.parent, [path.name]
    if _GLOB_CHARS & set(spec):
        return _resolve_glob(spec)
    raise FileNotFoundError(f"image source not found: {spec}")


def _list_folder(root: Path) -> list[str]:
    rel_paths = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_EXTENSIONS:
                rel_paths.append((Path(dirpath) / name).relative_to(root).as_posix())
    if not rel_paths:
        raise FileNotFoundError(f"no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) under {root}")
    return sorted(rel_paths)


def _read_list_file(list_path: Path) -> list[str]:
    root = list_path.parent
    entries = []
    for line in list_path.read_text(encoding="utf-8-sig").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            entries.append(_relative_id(root / line, root))
    return entries


def _relative_id(path: Path, root: Path) -> str:
    """Normalised posix path relative to ``root``, or the absolute posix path if outside it."""
    absolute = Path(os.path.abspath(path))
    try:
        return absolute.relative_to(os.path.abspath(root)).as_posix()
    except ValueError:
        return absolute.as_posix()


def _resolve_glob(pattern: str) -> tuple[Path, list[str]]:
    parts = Path(pattern).parts
    n_fixed = next(i for i, part in enumerate(parts) if _GLOB_CHARS & set(part))
    root = Path(*parts[:n_fixed]) if n_fixed else Path(".")
    matches = [
        Path(m).relative_to(root).as_posix()
        for m in glob.glob(pattern, recursive=True)
        if os.path.isfile(m) and Path(m).suffix.lower() in IMAGE_EXTENSIONS
    ]
    if not matches:
        raise FileNotFoundError(f"image source not found: no image files match {pattern}")
    return root, sorted(matches)


def _bundled_root(name: str) -> Path:
    images_dir = Path(str(importlib.resources.files("vitcircuits") / "assets" / "images"))
    available = sorted(p.name for p in images_dir.iterdir() if p.is_dir()) if images_dir.is_dir() else []
    if name not in available:
        prefix = f"unknown bundled image set {name!r}; " if name else "bundled:NAME needs a NAME; "
        raise ValueError(
            f"{prefix}available: {', '.join(f'bundled:{n}' for n in available) or '(none installed)'}"
        )
    return images_dir / name


def _select(items: list[ImageItem], max_images: int | None, sample_seed: int | None) -> list[ImageItem]:
    if max_images is None or max_images >= len(items):
        return items
    if sample_seed is None:
        return items[:max_images]
    keep = sorted(random.Random(sample_seed).sample(range(len(items)), max_images))
    return [items[i] for i in keep]


def _resolve_hf(spec: str, max_images: int | None, sample_seed: int | None) -> tuple[ImageItem, ...]:
    try:
        import datasets
    except ImportError:
        raise ImportError(
            f"source {spec!r} needs the optional 'datasets' package: pip install 'vitcircuits[datasets]'"
        ) from None
    name, _, split = spec.removeprefix("hf:").partition(":")
    if not name:
        raise ValueError(f"bad source spec {spec!r}: expected hf:DATASET[:SPLIT]")
    split = split or "train"
    stream = datasets.load_dataset(name, split=split, streaming=True)
    features = stream.features or {}
    image_columns = [col for col, feature in features.items() if isinstance(feature, datasets.Image)]
    if not image_columns:
        raise ValueError(f"source {spec!r}: no image column among features {sorted(features)}")
    column = image_columns[0]
    stream = stream.cast_column(column, datasets.Image(decode=False))
    rows = _hf_rows(stream, column, f"hf:{name}:{split}")
    if sample_seed is None:
        return tuple(itertools.islice(rows, max_images))
    return tuple(_reservoir_sample(rows, max_images, sample_seed))


def _hf_rows(stream, column: str, prefix: str) -> Iterator[ImageItem]:
    from datasets.utils.file_utils import xopen

    for row_index, row in enumerate(stream):
        encoded = row[column] or {}
        label = row.get("label")
        label = int(label) if isinstance(label, (int, np.integer)) and not isinstance(label, bool) else None
        item_id = f"{prefix}/{row_index}"
        if encoded.get("bytes") is not None:
            yield ImageItem(index=row_index, id=item_id, data=encoded["bytes"], label=label)
        elif encoded.get("path") and os.path.isfile(encoded["path"]):
            yield ImageItem(index=row_index, id=item_id, path=Path(encoded["path"]), label=label)
        elif encoded.get("path"):
            with xopen(encoded["path"], "rb") as handle:
                data = handle.read()
            yield ImageItem(index=row_index, id=item_id, data=data, label=label)
        else:
            yield ImageItem(index=row_index, id=item_id, data=b"", label=label)


def _reservoir_sample(rows: Iterator[ImageItem], k: int, seed: int) -> list[ImageItem]:
    """Seeded uniform sample of ``k`` rows from a stream of unknown length, in stream order."""
    rng = random.Random(seed)
    reservoir: list[ImageItem] = []
    for n_seen, item in enumerate(rows):
        if n_seen < k:
            reservoir.append(item)
        else:
            slot = rng.randrange(n_seen + 1)
            if slot < k:
                reservoir[slot] = item
    return sorted(reservoir, key=lambda item: item.index)
