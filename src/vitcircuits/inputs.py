"""The model and images a command works on, from the options every command shares."""
from __future__ import annotations

import functools
import hashlib
import logging
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING

import torch

from vitcircuits.data.images import BadImage, resolve_source
from vitcircuits.data.items import ImageSource, SkippedImage
from vitcircuits.data.loader import ImageBatches, ImageDataset, LoadSummary, image_list_sha256, iter_batches
from vitcircuits.data.names import display_id
from vitcircuits.data.transforms import PreprocessConfig
from vitcircuits.engine import LOCAL, Engine, ImagePass, Streamed
from vitcircuits.models.loading import LoadedModel, load_model

if TYPE_CHECKING:
    from vitcircuits.engine import R


@dataclass(frozen=True, kw_only=True)
class ModelOptions:
    """How to get the model (same meaning in every command)."""

    model: str
    """Timm name, hub id (``timm/…``, ``hf-hub:…``, transformers id), folder or weights file."""
    arch: str | None = None
    """timm architecture, needed when ``model`` is a bare weights file."""
    img_size: int | None = None
    """Input size override; position embeddings are resampled as timm does."""
    random_weights: bool = False
    """Build the architecture with seeded random weights (recorded in the manifest)."""
    device: str = "auto"
    """``auto`` (cuda if present, else cpu), ``cpu``, ``cuda``, ``cuda:1`` …"""
    dtype: str = "float32"
    """``float32``, ``float16`` or ``bfloat16``."""
    seed: int = 0
    """Seed for everything random in the command."""

    def load(self) -> LoadedModel:
        torch.manual_seed(self.seed)
        return load_model(
            self.model,
            arch=self.arch,
            img_size=self.img_size,
            random_weights=self.random_weights,
            seed=self.seed,
            device=self.device,
            dtype=self.dtype,
        )

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True, kw_only=True)
class ImageOptions:
    """Which images, and how they are batched."""

    images: str
    """Image source: file, folder, list file, glob, ``bundled:NAME`` or ``hf:DATASET[:SPLIT]``."""
    batch_size: int = 32
    """Images per forward pass."""
    max_images: int | None = None
    """Use only the first N images of the source's deterministic order."""
    num_workers: int = 0
    """DataLoader worker processes for decoding."""

    def open(self, loaded: LoadedModel, engine: Engine = LOCAL) -> ImageSet:
        """The images, resolved once, preprocessed for this model (its pretrained_cfg at its input
        size), streamed by ``engine``."""
        return ImageSet(source=resolve_source(self.images, max_images=self.max_images), preprocess=preprocess_config(loaded),
                        batch_size=self.batch_size, num_workers=self.num_workers, engine=engine)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True, kw_only=True)
class ImageSet:
    """The images of a run for one model: resolved once (:func:`~vitcircuits.data.images.resolve_source`),
    then batched for every pass, loaded by index for analyses that revisit particular images, and
    labelled where the source has labels (in the batches' ``labels_B``). :meth:`map` runs a
    mergeable pass over every image through the run's engine (:mod:`vitcircuits.engine`)."""

    source: ImageSource
    """The resolved, ordered items (ids, labels, what was ignored)."""
    preprocess: PreprocessConfig
    """The model's eval preprocessing."""
    batch_size: int
    """Images per forward pass."""
    num_workers: int = 0
    """DataLoader worker processes for decoding."""
    engine: Engine = field(default=LOCAL, compare=False, repr=False)
    """Where :meth:`map` runs (in this process by default)."""

    def __len__(self) -> int:
        return len(self.source)

    def __getstate__(self) -> dict:
        """Sent to workers without the engine (and without cached decoders)."""
        return {"source": self.source, "preprocess": self.preprocess, "batch_size": self.batch_size, "num_workers": self.num_workers}

    def __setstate__(self, state: dict) -> None:
        for name, value in {**state, "engine": LOCAL}.items():
            object.__setattr__(self, name, value)

    def map(self, loaded: LoadedModel, work: ImagePass[R], progress: bool = True) -> Streamed[R]:
        """Run ``work`` over every image (see :mod:`vitcircuits.engine`)."""
        return self.engine.map(self, loaded, work, progress)

    def slice(self, start: int, stop: int) -> ImageSet:
        """The items at positions ``[start, stop)`` of the list (source indices kept)."""
        return replace(self, source=replace(self.source, items=self.source.items[start:stop]))

    @property
    def image_list_sha256(self) -> str:
        return image_list_sha256(self.source)

    def batches(self, progress: bool = True) -> ImageBatches:
        """One pass: preprocessed batches in source order, bad images skipped (warned once per run)."""
        return iter_batches(self.source, self.preprocess, batch_size=self.batch_size, num_workers=self.num_workers, progress=progress)

    def first(self, n: int | None) -> ImageSet:
        """The first ``n`` images (all for None)."""
        return self if n is None else self.slice(0, n)

    def load(self, indices: list[int]) -> torch.Tensor:
        """The images at these source indices ``[B, 3, H, W]``; a bad image raises :class:`BadImage`."""
        records = [self._dataset[self._position[i]] for i in indices]
        for record in records:
            if isinstance(record, SkippedImage):
                raise BadImage(f"{record.id}: {record.reason}")
        return torch.stack([record.image_CHW for record in records])

    @functools.cached_property
    def _dataset(self) -> ImageDataset:
        return ImageDataset(self.source.items, self.preprocess)

    @functools.cached_property
    def _position(self) -> dict[int, int]:
        return {item.index: i for i, item in enumerate(self.source.items)}


def preprocess_config(loaded: LoadedModel) -> PreprocessConfig:
    """The model's eval preprocessing (its pretrained_cfg) at the model's input size."""
    return PreprocessConfig.from_pretrained_cfg(loaded.pretrained_cfg, img_size=loaded.model.cfg.img_size)


def check_folder_classes(loaded: LoadedModel, images: ImageSet) -> None:
    """Warn once when class folders (labelled by their sorted order) are not the model's classes by
    name: the labels may then not be the model's class indices."""
    source = images.source
    names = loaded.label_names
    if source.labels != "folders" or not names or source.classes is None:
        return
    wanted = [display_id(str(name)).lower() for name in names]
    if [c.lower() for c in source.classes] != wanted:
        logging.getLogger("vitcircuits").warning(
            "the %d class folders (%s …) are not the model's %d class names (%s …); labels are the folders' sorted order",
            len(source.classes), ", ".join(source.classes[:3]), len(names), ", ".join(wanted[:3]))


def images_manifest(read: ImageBatches | LoadSummary) -> dict:
    """The manifest's ``images`` section: source, counts, list hash, where labels come from and the
    class names, files the source ignored (counted), and skipped inputs with reasons.

    Every string is printable and strict UTF-8 whatever the file names: ids, the source and class
    names are stored escaped (:func:`~vitcircuits.data.names.display_id`), reasons one line."""
    summary = read.summary() if isinstance(read, ImageBatches) else read
    ignored = summary.ignored
    return {
        "source": display_id(summary.spec),
        "n_total": summary.n_total,
        "n_ok": summary.n_ok,
        "n_skipped": len(summary.skipped),
        "image_list_sha256": summary.image_list_sha256,
        "labels": summary.labels,
        "classes": None if summary.classes is None else list(summary.classes),
        "ignored": {"n": ignored.n, "hidden": ignored.hidden, "extensions": ignored.extensions,
                    "repeated_folders": ignored.repeated_folders, "unreadable_folders": ignored.unreadable_folders},
        "skipped": [{"id": s.id, "reason": s.reason} for s in summary.skipped],
    }


def provenance(loaded: LoadedModel, images: ImageSet) -> dict:
    """What cached rows are made from: the model, its weights (the file's sha256, or a digest of
    seeded random weights), its dtype, the image list and the preprocessing."""
    return {"model": loaded.model_id, "weights_sha256": weights_digest(loaded), "dtype": str(next(loaded.model.parameters()).dtype),
            "image_list_sha256": images.image_list_sha256, "n_images": len(images), "preprocess": asdict(images.preprocess)}


def weights_digest(loaded: LoadedModel) -> str:
    """The weights file's sha256, or for seeded random weights ``random:`` and a digest of the tensors."""
    if loaded.weights_sha256 is not None:
        return loaded.weights_sha256
    digest = hashlib.sha256()
    for tensor in loaded.model.state_dict().values():
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return f"random:{digest.hexdigest()}"
