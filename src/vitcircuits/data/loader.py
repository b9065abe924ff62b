"""Preprocessed batches from a resolved :class:`ImageSource`, with the bad-input policy applied.

Decoding and preprocessing run in the :class:`ImageDataset` (so in DataLoader worker processes when
``num_workers > 0``). A bad input becomes a :class:`SkippedImage` record that travels back inside
its batch; only the main process (:class:`ImageBatches`) warns about it and records it, so each
failure is reported once however many workers there are, and once per process however many
passes (stages of a run) read the source: after a pass that warned, one summary line says how
many were skipped and that the list is in the run manifest (``images.skipped``).

Typical use::

    source = resolve_source("bundled:cifar10", max_images=256)
    config = PreprocessConfig.from_pretrained_cfg(model.pretrained_cfg)
    batches = iter_batches(source, config, batch_size=64, num_workers=2)
    for batch in batches:
        logits_BC = model(batch.images_BCHW)
    manifest["images"] = batches.summary()
"""

from __future__ import annotations

import functools
import hashlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch.utils.data import DataLoader, Dataset

from vitcircuits.data.images import DEFAULT_MAX_PIXELS, DEFAULT_MIN_SIZE, BadImage, open_item
from vitcircuits.data.items import ImageItem, ImageSource, SkippedImage
from vitcircuits.data.listing import IgnoredFiles
from vitcircuits.data.names import display_id, name_bytes
from vitcircuits.data.transforms import PreprocessConfig, preprocess_image

logger = logging.getLogger("vitcircuits.data")
# (source spec, id, reason) of every skipped input already warned about in this process.
_WARNED: set[tuple[str, str, str]] = set()


@dataclass(frozen=True)
class LoadedImage:
    """A successfully decoded and preprocessed input.

    Attributes:
        index: ``ImageItem.index`` (position in the source order).
        id: ``ImageItem.id``.
        label: class index, or None if unknown.
        image_CHW: preprocessed float32 tensor [3, H, W].
    """

    index: int
    id: str
    label: int | None
    image_CHW: torch.Tensor


@dataclass(frozen=True)
class ImageBatch:
    """One batch; failed inputs are dropped from the tensors and listed in ``skipped``.

    Attributes:
        images_BCHW: preprocessed float32 images [B, 3, H, W] (B may be 0 from ``make_loader``).
        indices: source position of each image (``ImageItem.index``), length B.
        paths: id of each image (``ImageItem.id``), length B.
        labels_B: int64 class indices [B] with -1 where unknown; None if no image has a label.
        skipped: inputs of this batch dropped by the bad-input policy.
    """

    images_BCHW: torch.Tensor
    indices: tuple[int, ...]
    paths: tuple[str, ...]
    labels_B: torch.Tensor | None
    skipped: tuple[SkippedImage, ...]

    def pin_memory(self) -> ImageBatch:
        """The batch in page-locked memory (the DataLoader calls this when it pins), so the copy
        to a GPU can overlap the previous batch's forward pass."""
        return replace(self, images_BCHW=self.images_BCHW.pin_memory(),
                       labels_B=None if self.labels_B is None else self.labels_B.pin_memory())


@dataclass(frozen=True)
class LoadSummary:
    """What a pass over a source produced, for the run manifest.

    Attributes:
        spec: the source spec (as given, not escaped).
        n_total: number of selected inputs (after ``max_images`` / sampling).
        n_ok: inputs decoded and yielded in batches.
        skipped: inputs dropped by the bad-input policy, sorted by index.
        image_list_sha256: :func:`image_list_sha256` of the selected inputs.
        ignored: ``ImageSource.ignored`` (files the source does not list).
        labels: ``ImageSource.labels`` (where the labels come from, or None).
        classes: ``ImageSource.classes`` (class names by index, or None).
    """

    spec: str
    n_total: int
    n_ok: int
    skipped: tuple[SkippedImage, ...]
    image_list_sha256: str
    ignored: IgnoredFiles
    labels: str | None
    classes: tuple[str, ...] | None


class SkipLog:
    """Collects the skipped inputs of one pass (keyed by ``index``) and warns about each once per
    process (keyed by source spec, id and reason), so the stages of a run that each re-read the
    source do not repeat the warnings.

    Attributes:
        spec: the source spec the inputs come from.
        n_warned: inputs this log warned about (not already warned about in this process).
    """

    def __init__(self, spec: str = "") -> None:
        self.spec = spec
        self.n_warned = 0
        self._by_index: dict[int, SkippedImage] = {}

    def record(self, skipped: SkippedImage) -> None:
        """Remember ``skipped`` and warn on logger ``vitcircuits.data`` unless already warned about."""
        if skipped.index in self._by_index:
            return
        self._by_index[skipped.index] = skipped
        key = (self.spec, skipped.id, skipped.reason)
        if key not in _WARNED:
            _WARNED.add(key)
            self.n_warned += 1
            logger.warning("skipped image %s: %s", skipped.id, skipped.reason)

    def warn_total(self, n_total: int) -> None:
        """One summary line when this pass warned about any input."""
        if self.n_warned:
            logger.warning("skipped %d of %d images in %s; the list with reasons is in the run manifest (images.skipped)",
                           len(self), n_total, display_id(self.spec))

    @property
    def skipped(self) -> tuple[SkippedImage, ...]:
        """All recorded inputs, sorted by source index."""
        return tuple(self._by_index[i] for i in sorted(self._by_index))

    def __len__(self) -> int:
        return len(self._by_index)


def image_list_sha256(source: ImageSource) -> str:
    """SHA-256 hex digest of the ordered item names, as bytes (:func:`~vitcircuits.data.names.name_bytes`:
    UTF-8 names as UTF-8, undecodable bytes as themselves), joined by newlines."""
    return hashlib.sha256(b"\n".join(name_bytes(item.name) for item in source.items)).hexdigest()


class ImageDataset(Dataset):
    """Map-style dataset over items: ``dataset[i]`` is a :class:`LoadedImage` or a :class:`SkippedImage`."""

    def __init__(
        self,
        items: Sequence[ImageItem],
        config: PreprocessConfig,
        *,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        min_size: int = DEFAULT_MIN_SIZE,
    ) -> None:
        self.items = tuple(items)
        self.config = config
        self.max_pixels = max_pixels
        self.min_size = min_size

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, position: int) -> LoadedImage | SkippedImage:
        item = self.items[position]
        try:
            image = open_item(item, max_pixels=self.max_pixels, min_size=self.min_size)
            check_resize(image.size, self.config, self.max_pixels)
        except BadImage as exc:
            return SkippedImage(index=item.index, id=item.id, reason=str(exc))
        return LoadedImage(item.index, item.id, item.label, preprocess_image(image, self.config))


def check_resize(size: tuple[int, int], config: PreprocessConfig, max_pixels: int) -> None:
    """Raise :class:`BadImage` when resizing an image of ``size`` (W, H) before the crop would give
    more than ``max_pixels`` pixels or an empty side (extreme aspect ratios such as 8 x 100000)."""
    height, width = config.resized_hw(*size)
    if min(height, width) < 1 or height * width > max_pixels:
        raise BadImage(
            f"extreme aspect ratio: {size[0]}x{size[1]} would be resized to {width}x{height} before cropping "
            f"(limit: sides >= 1 and max_pixels {max_pixels})"
        )


def collate_records(
    records: Sequence[LoadedImage | SkippedImage], *, input_size: tuple[int, int]
) -> ImageBatch:
    """Stack the loaded records of one batch; failures go to ``ImageBatch.skipped``."""
    loaded = [r for r in records if isinstance(r, LoadedImage)]
    images_BCHW = torch.stack([r.image_CHW for r in loaded]) if loaded else torch.empty(0, 3, *input_size)
    labels = [r.label for r in loaded]
    has_labels = any(label is not None for label in labels)
    labels_B = torch.tensor([-1 if label is None else label for label in labels], dtype=torch.int64)
    return ImageBatch(
        images_BCHW=images_BCHW,
        indices=tuple(r.index for r in loaded),
        paths=tuple(r.id for r in loaded),
        labels_B=labels_B if has_labels else None,
        skipped=tuple(r for r in records if isinstance(r, SkippedImage)),
    )


def make_loader(
    source: ImageSource,
    config: PreprocessConfig,
    *,
    batch_size: int = 32,
    num_workers: int = 0,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_size: int = DEFAULT_MIN_SIZE,
) -> DataLoader:
    """A DataLoader of :class:`ImageBatch` in source order, pinned when a GPU is present (decode
    workers then hand batches over in page-locked memory).

    Skipped inputs are only carried in ``ImageBatch.skipped`` (not warned about); use
    :func:`iter_batches` to apply the bad-input policy.
    """
    dataset = ImageDataset(source.items, config, max_pixels=max_pixels, min_size=min_size)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=functools.partial(collate_records, input_size=config.input_size),
        pin_memory=torch.cuda.is_available(),
    )


class ImageBatches:
    """Iterable of non-empty :class:`ImageBatch` that warns about and records every skipped input.

    Each iteration is a fresh pass; :meth:`summary` describes the latest (possibly partial) pass.
    """

    def __init__(self, source: ImageSource, loader: DataLoader, *, progress: bool = True) -> None:
        self.source = source
        self.loader = loader
        self.progress = progress
        self.skip_log = SkipLog(source.spec)
        self.n_ok = 0

    def __len__(self) -> int:
        """Number of DataLoader batches (an upper bound on the batches yielded)."""
        return len(self.loader)

    def __iter__(self) -> Iterator[ImageBatch]:
        self.skip_log = SkipLog(self.source.spec)
        self.n_ok = 0
        columns = (TextColumn("images"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        try:
            with Progress(*columns, console=Console(stderr=True), disable=not self.progress) as bar:
                task = bar.add_task("images", total=len(self.source))
                for batch in self.loader:
                    for skipped in batch.skipped:
                        self.skip_log.record(skipped)
                    self.n_ok += len(batch.indices)
                    bar.advance(task, len(batch.indices) + len(batch.skipped))
                    if batch.indices:
                        yield batch
        finally:
            self.skip_log.warn_total(len(self.source))

    def summary(self) -> LoadSummary:
        """Counts, skipped inputs and image list hash of the latest pass."""
        return LoadSummary(
            spec=self.source.spec,
            n_total=len(self.source),
            n_ok=self.n_ok,
            skipped=self.skip_log.skipped,
            image_list_sha256=image_list_sha256(self.source),
            ignored=self.source.ignored,
            labels=self.source.labels,
            classes=self.source.classes,
        )


def iter_batches(
    source: ImageSource,
    config: PreprocessConfig,
    *,
    batch_size: int = 32,
    num_workers: int = 0,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_size: int = DEFAULT_MIN_SIZE,
    progress: bool = True,
) -> ImageBatches:
    """Batches of preprocessed images in source order, bad inputs skipped with one warning each
    (per process: see :class:`SkipLog`).

    ``num_workers > 0`` decodes in worker processes. ``progress`` shows a rich progress bar (stderr).
    Batches whose inputs all failed are not yielded. Call ``.summary()`` on the result afterwards.
    """
    loader = make_loader(
        source,
        config,
        batch_size=batch_size,
        num_workers=num_workers,
        max_pixels=max_pixels,
        min_size=min_size,
    )
    return ImageBatches(source, loader, progress=progress)
