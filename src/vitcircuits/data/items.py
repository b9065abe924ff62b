"""What a resolved image source is: its items (:class:`ImageItem`), the source itself
(:class:`ImageSource`) and an input the bad-input policy dropped (:class:`SkippedImage`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from vitcircuits.data.listing import IgnoredFiles


@dataclass(frozen=True)
class ImageItem:
    """One entry of a resolved source.

    Attributes:
        index: position in the full deterministic order of the source (kept after subsampling).
        id: stable printable id, :func:`~vitcircuits.data.names.display_id` of ``name``; the form
            shown and stored everywhere (logs, batches, figures, manifests, JSON).
        name: the raw id: posix path relative to the source root as the OS gave it (undecodable
            bytes as ``surrogateescape`` surrogates), or ``hf:NAME:SPLIT/ROW``; hashed by its bytes,
            never printed.
        path: file to decode, or None when the encoded bytes are held in ``data``.
        data: encoded image bytes (HuggingFace rows), or None for files.
        label: class index from ``labels.tsv``, the ImageFolder layout or the dataset's ``label``
            column; None if unknown.
    """

    index: int
    id: str
    name: str
    path: Path | None = None
    data: bytes | None = field(default=None, repr=False)
    label: int | None = None


@dataclass(frozen=True)
class SkippedImage:
    """An input dropped by the bad-input policy.

    Attributes:
        index: ``ImageItem.index`` of the input.
        id: ``ImageItem.id`` of the input (printable).
        reason: one-line printable reason.
    """

    index: int
    id: str
    reason: str


@dataclass(frozen=True)
class ImageSource:
    """A resolved, ordered list of images.

    Attributes:
        spec: the source spec string it was resolved from (as given, not escaped).
        items: the selected items, in deterministic order.
        ignored: files under a folder or glob source that it does not list (always empty for
            list files, single files and ``hf:`` sources).
        labels: where ``ImageItem.label`` comes from: ``labels.tsv``, ``folders`` (the ImageFolder
            layout), ``dataset`` (an ``hf:`` label column), or None (no labels).
        classes: class names by class index (printable) when the source names them: the class
            folders of the ImageFolder layout or an ``hf:`` ``ClassLabel``; else None.
    """

    spec: str
    items: tuple[ImageItem, ...]
    ignored: IgnoredFiles = field(default_factory=IgnoredFiles)
    labels: str | None = None
    classes: tuple[str, ...] | None = None

    def __len__(self) -> int:
        return len(self.items)

    @property
    def ids(self) -> tuple[str, ...]:
        """Item ids in order."""
        return tuple(item.id for item in self.items)
