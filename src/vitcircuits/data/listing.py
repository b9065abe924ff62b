"""Which files of a folder source are listed, which are ignored, and ImageFolder class labels.

Listed: every entry below the folder whose name does not start with ``.`` and whose extension
(any case) is in :data:`IMAGE_EXTENSIONS` and that is not a folder. That includes broken symlinks
and special files (FIFOs, devices) with an image extension: they are reported as skipped, with
a reason, when they fail to load. Symlinked folders are followed.

Ignored, and counted in :class:`IgnoredFiles` (the manifest's ``images.ignored``):

* hidden entries (the name starts with ``.``); a hidden folder counts once and is not read;
* files with any other extension (``photo.heic``, ``notes.txt``), except the source's own
  ``labels.tsv``;
* symlinked folders that are not followed because that would list files twice or loop forever:
  the target is inside the source folder, contains it, or was already listed;
* folders that cannot be read (permissions).
"""

from __future__ import annotations

import os
import stat
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from vitcircuits.data.names import display_id

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jfif", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm"}
)
LABELS_FILE = "labels.tsv"
NO_EXTENSION = "(none)"


@dataclass(frozen=True)
class IgnoredFiles:
    """Entries under a source that it does not list (see the module docstring).

    Attributes:
        hidden: hidden files and folders (each hidden folder counts once, its contents unread).
        extensions: ``{extension: count}`` of files with an extension not in ``IMAGE_EXTENSIONS``
            (lower case, escaped like ids; ``(none)`` for names without one), sorted by extension.
        repeated_folders: symlinked folders not followed (inside the source, containing it, or
            already listed).
        unreadable_folders: folders whose entries could not be read.
    """

    hidden: int = 0
    extensions: dict[str, int] = field(default_factory=dict)
    repeated_folders: int = 0
    unreadable_folders: int = 0

    @property
    def n(self) -> int:
        """Number of ignored entries."""
        return self.hidden + sum(self.extensions.values()) + self.repeated_folders + self.unreadable_folders


@dataclass(frozen=True)
class FolderListing:
    """What :func:`list_folder` found.

    Attributes:
        names: listed files as posix paths relative to the folder (raw OS names), sorted.
        ignored: entries not listed, counted.
        top_folders: names of the first-level sub-folders walked (symlinked ones included), sorted.
    """

    names: tuple[str, ...]
    ignored: IgnoredFiles
    top_folders: tuple[str, ...]


def extension(name: str) -> str:
    """Lower-case extension of a file name with its dot, or ``(none)``."""
    return Path(name).suffix.lower() or NO_EXTENSION


def list_folder(root: str | os.PathLike) -> FolderListing:
    """List the image files below ``root`` (see the module docstring), with loop-safe symlinks.

    Each folder is walked at most once (keyed by device and inode), so the walk ends whatever
    the symlinks; entries are visited in a fixed order (by name), so the result does not depend
    on the order the file system returns them in.
    """
    root_real = os.path.realpath(root)
    names: list[str] = []
    extensions: Counter[str] = Counter()
    hidden = repeated = unreadable = 0
    top_folders: list[str] = []
    seen = {_folder_key(root_real)}
    stack = [(os.fspath(root), "")]
    while stack:
        folder, rel = stack.pop()
        try:
            with os.scandir(folder) as scan:
                entries = sorted(scan, key=lambda entry: entry.name)
        except OSError:
            unreadable += 1
            continue
        for entry in entries:
            child = f"{rel}/{entry.name}" if rel else entry.name
            if entry.name.startswith("."):
                hidden += 1
            elif _is_dir(entry):
                key = _folder_key(entry.path)
                if key is None:
                    unreadable += 1
                    continue
                if key in seen or (entry.is_symlink() and _overlaps(os.path.realpath(entry.path), root_real)):
                    repeated += 1
                    continue
                seen.add(key)
                if not rel:
                    top_folders.append(entry.name)
                stack.append((entry.path, child))
            elif extension(entry.name) in IMAGE_EXTENSIONS:
                names.append(child)
            elif child != LABELS_FILE:
                extensions[display_id(extension(entry.name))] += 1
    ignored = IgnoredFiles(hidden, dict(sorted(extensions.items())), repeated, unreadable)
    return FolderListing(tuple(sorted(names)), ignored, tuple(sorted(top_folders)))


def folder_classes(listing: FolderListing) -> tuple[str, ...] | None:
    """Class names when the folder is in the ImageFolder layout (``class_name/xxx.png``), else None.

    The layout holds when every listed file sits directly in a first-level sub-folder and there are
    at least two sub-folders. The classes are all first-level sub-folders sorted by name, as
    torchvision's ``ImageFolder`` (and HuggingFace's ``imagefolder``) assign class indices, so a
    sub-folder without images still takes its index. Hidden sub-folders are not classes.
    """
    if len(listing.top_folders) < 2 or not all(name.count("/") == 1 for name in listing.names):
        return None
    return listing.top_folders


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()
    except OSError:
        return False


def _folder_key(path: str) -> tuple[int, int] | None:
    """(device, inode) of a folder, following symlinks; None if it cannot be stat-ed."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    return (info.st_dev, info.st_ino) if stat.S_ISDIR(info.st_mode) else None


def _overlaps(target: str, root: str) -> bool:
    """Whether ``target`` is ``root``, inside it, or contains it (both real paths)."""
    try:
        return os.path.commonpath([target, root]) in (target, root)
    except ValueError:  # different drives
        return False
