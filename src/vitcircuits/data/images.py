"""Image sources, safe decoding to RGB, and the bad-input policy.

A *source spec* is one string resolved by :func:`resolve_source` into an :class:`ImageSource`, an
ordered tuple of :class:`ImageItem` (the order is deterministic, see the function docstring). What a
folder source lists and ignores is described in :mod:`vitcircuits.data.listing`; how file names
become printable ids in :mod:`vitcircuits.data.names`.

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
import os
import stat
import warnings
from collections import Counter
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from vitcircuits.data.hf import resolve_hf
from vitcircuits.data.items import ImageItem, ImageSource
from vitcircuits.data.listing import IMAGE_EXTENSIONS, LABELS_FILE, IgnoredFiles, extension, folder_classes, list_folder
from vitcircuits.data.names import display_id, printable_text
from vitcircuits.sampling import reservoir

# Same as PIL's hard limit (2 * PIL.Image.MAX_IMAGE_PIXELS with the default setting).
DEFAULT_MAX_PIXELS = 178_956_970
DEFAULT_MIN_SIZE = 8
_GLOB_CHARS = frozenset("*?[")
_SIXTEEN_BIT_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N"})


class BadImage(Exception):
    """An input that cannot be decoded into a usable RGB image; ``str(exc)`` is the one-line reason
    (whitespace collapsed, non-printable characters escaped: see :func:`~vitcircuits.data.names.printable_text`)."""

    def __init__(self, reason: str) -> None:
        super().__init__(printable_text(reason))


# --------------------------------------------------------------------------------------------------
# Decoding


def open_image(
    source: str | os.PathLike | bytes,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_size: int = DEFAULT_MIN_SIZE,
) -> Image.Image:
    """Decode a file (or encoded bytes) into a fully loaded RGB image, or raise :class:`BadImage`.

    * Only regular files are opened (a FIFO or device named ``x.jpg`` is rejected, not read).
    * EXIF orientation is applied (``ImageOps.exif_transpose``); animated images give frame 0.
    * Images whose header declares more than ``max_pixels`` pixels are rejected before decoding.
      PIL's own check is muted but its hard limit (``2 * PIL.Image.MAX_IMAGE_PIXELS``) still
      applies and is reported the same way; PIL's global setting is never modified.
    * Images with a side shorter than ``min_size`` are rejected (they carry no usable signal).
    * Colour: see :func:`to_rgb` (alpha is composited onto white).

    Truncated files are rejected unless someone set PIL's global ``ImageFile.LOAD_TRUNCATED_IMAGES``.
    """
    if isinstance(source, bytes):
        if not source:
            raise BadImage("empty file (0 bytes)")
        return _decode(io.BytesIO(source), max_pixels, min_size)
    try:
        info = os.stat(source)
        if not stat.S_ISREG(info.st_mode):
            raise BadImage("not a regular file")
        if info.st_size == 0:
            raise BadImage("empty file (0 bytes)")
        with open(source, "rb") as handle:
            return _decode(handle, max_pixels, min_size)
    except FileNotFoundError:
        raise BadImage("file not found") from None
    except OSError as exc:
        raise BadImage(f"cannot read file: {exc.strerror or type(exc).__name__}") from None


def _decode(handle: BinaryIO, max_pixels: int, min_size: int) -> Image.Image:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PIL warns about odd but decodable files; the policy is ours
        try:
            image = Image.open(handle)
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
        except BadImage:
            raise
        except Exception as exc:  # a mode PIL decodes but cannot convert
            raise BadImage(f"cannot convert mode {image.mode} to RGB: {type(exc).__name__}: {exc}") from None


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

    The file is UTF-8 and tab-separated with a header row that must contain ``filename`` and
    ``index`` columns; other columns (``label``, ``wnid``, ...) are ignored. A file whose name is
    not UTF-8 can be labelled under its escaped id (:func:`~vitcircuits.data.names.display_id`).
    """
    path = Path(folder) / LABELS_FILE
    if not path.is_file():
        return None
    shown = display_id(str(path))
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{shown}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    rows = csv.DictReader(io.StringIO(text, newline=""), delimiter="\t")
    missing = {"filename", "index"} - set(rows.fieldnames or ())
    if missing:
        raise ValueError(f"{shown}: header lacks column(s) {sorted(missing)}")
    labels = {}
    for row in rows:
        try:
            labels[row["filename"]] = int(row["index"])
        except (TypeError, ValueError):
            raise ValueError(f"{shown} line {rows.line_num}: bad index {row['index']!r}") from None
    return labels


def resolve_source(
    spec: str, *, max_images: int | None = None, sample_seed: int | None = None
) -> ImageSource:
    """Resolve a source spec into an ordered :class:`ImageSource`.

    Specs, tried in this order:

    * ``hf:DATASET[:SPLIT]``: a HuggingFace ``datasets`` split (default ``train``), streamed in
      dataset order; needs the optional ``datasets`` package (see :mod:`vitcircuits.data.hf`);
    * ``bundled:NAME``: images shipped in ``vitcircuits/assets/images/NAME/`` (a folder source);
      ``bundled:`` alone raises an error listing the available names;
    * an existing folder: every image file below it, sorted by relative posix path; hidden entries
      and other extensions are ignored and counted, symlinked folders followed (see
      :mod:`vitcircuits.data.listing`);
    * an existing ``.txt`` file: a list file, one path per line, in file order; relative paths are
      resolved against the list file's folder; blank lines and lines starting with ``#`` are ignored;
      bytes that are not UTF-8 name files by those bytes;
    * any other existing file: that single image (a non-image is reported as bad at load time);
    * a glob pattern (contains ``*``, ``?`` or ``[``; ``**`` recurses): matching files with an image
      extension, sorted by path relative to the pattern's fixed leading folder; matching files with
      other extensions are counted as ignored.

    Names are posix paths relative to the source root (the folder; the list file's, single file's
    or pattern's folder); ids are their printable form (:mod:`vitcircuits.data.names`).

    Labels: ``labels.tsv`` in the root when present (see :func:`read_labels`); otherwise, for a
    folder in the ImageFolder layout (``class_name/xxx.png``, see
    :func:`~vitcircuits.data.listing.folder_classes`), the index of the image's class folder among
    the sorted class folders, as torchvision assigns it.

    Selection: ``max_images`` keeps the first N items; with ``sample_seed`` it instead keeps N items
    drawn uniformly with that seed (still in source order). ``ImageItem.index`` stays the position
    in the full order. Sampling a ``hf:`` source reads the whole split.
    """
    if max_images is not None and max_images < 0:
        raise ValueError(f"max_images must be >= 0, got {max_images}")
    if sample_seed is not None and max_images is None:
        raise ValueError("sample_seed needs max_images (the sample size)")
    if spec.startswith("hf:"):

        return resolve_hf(spec, max_images, sample_seed)
    root = _bundled_root(spec.removeprefix("bundled:")) if spec.startswith("bundled:") else Path(spec)
    classes = None
    if spec.startswith("bundled:") or root.is_dir():
        listing = list_folder(root)
        if not listing.names:
            raise FileNotFoundError(f"no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) under {display_id(str(root))}")
        names, ignored, classes = listing.names, listing.ignored, folder_classes(listing)
    else:
        root, names, ignored = _resolve_file_spec(spec)
    root = Path(os.path.abspath(root))
    table = read_labels(root)
    if table is not None:
        kind, classes = LABELS_FILE, None
        labels = [table.get(name, table.get(display_id(name))) for name in names]
    elif classes is not None:
        kind, class_index = "folders", {name: i for i, name in enumerate(classes)}
        labels = [class_index[name.partition("/")[0]] for name in names]
    else:
        kind, labels = None, [None] * len(names)
    items = [
        ImageItem(index=i, id=display_id(name), name=name, path=root / name, label=label)
        for i, (name, label) in enumerate(zip(names, labels))
    ]
    shown_classes = None if classes is None else tuple(display_id(name) for name in classes)
    return ImageSource(spec, tuple(_select(items, max_images, sample_seed)), ignored, kind, shown_classes)


def _resolve_file_spec(spec: str) -> tuple[Path, list[str], IgnoredFiles]:
    """Root folder, relative names and ignored files for a list file, single file or glob spec."""
    path = Path(spec)
    if path.is_file() and path.suffix.lower() == ".txt":
        return path.parent, _read_list_file(path), IgnoredFiles()
    if path.is_file():
        return path.parent, [path.name], IgnoredFiles()
    if _GLOB_CHARS & set(spec):
        return _resolve_glob(spec)
    raise FileNotFoundError(f"image source not found: {display_id(spec)}")


def _read_list_file(list_path: Path) -> list[str]:
    root = list_path.parent
    entries = []
    for line in list_path.read_text(encoding="utf-8-sig", errors="surrogateescape").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            entries.append(_relative_name(root / line, root))
    return entries


def _relative_name(path: Path, root: Path) -> str:
    """Normalised posix path relative to ``root``, or the absolute posix path if outside it."""
    absolute = Path(os.path.abspath(path))
    try:
        return absolute.relative_to(os.path.abspath(root)).as_posix()
    except ValueError:
        return absolute.as_posix()


def _resolve_glob(pattern: str) -> tuple[Path, list[str], IgnoredFiles]:
    parts = Path(pattern).parts
    n_fixed = next(i for i, part in enumerate(parts) if _GLOB_CHARS & set(part))
    root = Path(*parts[:n_fixed]) if n_fixed else Path(".")
    matches, other = [], Counter()
    for match in glob.glob(pattern, recursive=True):
        if os.path.isdir(match):
            continue
        if extension(match) in IMAGE_EXTENSIONS:
            matches.append(Path(match).relative_to(root).as_posix())
        else:
            other[display_id(extension(match))] += 1
    if not matches:
        raise FileNotFoundError(f"image source not found: no image files match {display_id(pattern)}")
    return root, sorted(matches), IgnoredFiles(extensions=dict(sorted(other.items())))


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
    return reservoir(items, [max_images], sample_seed)[0]
