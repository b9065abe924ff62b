"""Per-token activations at chosen hooks, streamed to safetensors shards with bounded memory.

Each shard holds, for every cached hook, a ``[rows, width]`` tensor (trailing dims flattened,
e.g. ``hook_z`` ``[rows, H*Dh]``), plus per-row ``image_index`` (position in the image list),
``view`` (0 for the image itself, ≥ 1 for augmented views, :mod:`vitcircuits.data.augment`),
``token`` (sequence index), ``row`` and ``col`` (patch grid position; -1 for CLS, distillation
and register tokens). Memory holds at most one shard's rows (per worker). ``index.json`` lists the
finished shards and the images they cover, so an interrupted run resumes after the last one.
Shard files are named by their first image, so workers of the ``ray`` engine
(:mod:`vitcircuits.engine`) write them side by side into the same folder.

The index is keyed by what produced the rows (:func:`vitcircuits.inputs.provenance`: the model
and its weights' sha256, the image list's sha256 and the preprocessing) and by the cache config; a folder made by
anything else is refused with one line, never appended to.
"""
from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import save_file

from vitcircuits.data.augment import AugmentConfig, with_views
from vitcircuits.data.loader import ImageBatch
from vitcircuits.engine import ImagePass, fold
from vitcircuits.files import read_json, write_json, write_with
from vitcircuits.models.hooked_vit import HookedViT

if TYPE_CHECKING:
    from vitcircuits.engine import Streamed
    from vitcircuits.inputs import ImageSet
    from vitcircuits.models.loading import LoadedModel


@dataclass(frozen=True)
class CacheConfig:
    """What to cache and how to shard it."""

    hooks: tuple[str, ...]
    """Hook names with one vector per token (residual, ln, q/k/v/z, mlp pre/post, outputs)."""
    include_prefix: bool = False
    """Also keep CLS/distillation/register tokens (row = col = -1)."""
    shard_rows: int = 65536
    """Rows per shard file; memory holds at most about one shard."""
    dtype: str = "float32"
    """Storage dtype of the activations (``float32``, ``float16``, ``bfloat16``)."""
    views: int = 1
    """Views per image: the image plus ``views - 1`` seeded random crops/flips (more rows from few images)."""
    augment: AugmentConfig = AugmentConfig()
    """Crop and flip settings of the extra views."""


class CacheIndex:
    """``index.json`` of a cache folder: what made the rows (checked on open) and the finished shards."""

    def __init__(self, out_dir: Path, config: CacheConfig, made_from: dict) -> None:
        self.out_dir = out_dir
        self.index_path = out_dir / "index.json"
        key = json.loads(json.dumps({"config": asdict(config), "made_from": made_from}))
        self.index = read_json(self.index_path) if self.index_path.exists() else {**key, "shards": []}
        differs = [name for name in ("config", "made_from") if self.index.get(name) != key[name]]
        if differs:
            what = {"config": "another cache config", "made_from": "another model, weights, image list or preprocessing"}
            raise ValueError(f"{self.index_path}: these activations were made from {' and '.join(what[d] for d in differs)}; "
                             "use --force to recompute them or a new --out")

    @property
    def done_images(self) -> frozenset[int]:
        return frozenset(i for shard in self.index["shards"] for i in shard["images"])

    def add(self, shards: list[dict]) -> None:
        """Record finished shard files (in image order) and save the index."""
        if shards:
            self.index["shards"].extend(shards)
            write_json(self.index_path, self.index)


@dataclass
class Harvested:
    """A partial harvest: the shard files written, rows not yet written, held-out images kept."""

    shards: list[dict] = field(default_factory=list)
    """``{"file", "rows", "images"}`` per written shard, in image order."""
    pending: list[dict[str, torch.Tensor]] = field(default_factory=list)
    pending_images: list[int] = field(default_factory=list)
    kept: list[tuple[torch.Tensor, torch.Tensor | None]] = field(default_factory=list)
    """Up to ``keep_max`` images (and labels) whose index is a multiple of ``keep_every``."""

    @property
    def n_kept(self) -> int:
        return sum(len(images) for images, _ in self.kept)


@dataclass(frozen=True)
class HarvestPass(ImagePass[Harvested]):
    """The harvest as an :class:`~vitcircuits.engine.ImagePass`: every image not in ``done`` is
    cached into shard files of about ``config.shard_rows`` rows, each named by its first image
    (a shard run again overwrites its own files); merging records the shards in ``index``, so a
    run resumes after the last merged shard."""

    out_dir: Path
    config: CacheConfig
    index: CacheIndex
    done: frozenset[int] = frozenset()
    keep_every: int = 0
    """Also keep images whose index is a multiple of this in memory (0: none)."""
    keep_max: int = 0

    def start(self, model: HookedViT) -> Harvested:
        return Harvested()

    def step(self, model: HookedViT, part: Harvested, batch: ImageBatch) -> Harvested:
        if self.keep_every:
            keep = [j for j, i in enumerate(batch.indices) if i % self.keep_every == 0][: self.keep_max - part.n_kept]
            if keep:
                part.kept.append((batch.images_BCHW[keep], None if batch.labels_B is None else batch.labels_B[keep]))
        todo = without_images(batch, self.done)
        if todo.indices:
            part.pending.append(cache_batch(model, todo, self.config))
            part.pending_images.extend(todo.indices)
            if sum(len(p["token"]) for p in part.pending) >= self.config.shard_rows:
                self._flush(part)
        return part

    def finish(self, model: HookedViT, part: Harvested) -> Harvested:
        self._flush(part)
        return part

    def merge(self, first: Harvested, later: Harvested) -> Harvested:
        self.index.add(later.shards)
        kept = list(first.kept)
        for images_BCHW, labels_B in later.kept:
            room = self.keep_max - sum(len(x) for x, _ in kept)
            if room <= 0:
                break
            kept.append((images_BCHW[:room], None if labels_B is None else labels_B[:room]))
        return Harvested(first.shards + later.shards, kept=kept)

    def _flush(self, part: Harvested) -> None:
        if not part.pending:
            return
        tensors = {k: torch.cat([p[k] for p in part.pending]).contiguous() for k in part.pending[0]}
        name = f"shard_{part.pending_images[0]:08d}.safetensors"
        write_with(self.out_dir / name, lambda tmp: save_file(tensors, str(tmp)))
        part.shards.append({"file": name, "rows": len(tensors["token"]), "images": part.pending_images})
        part.pending, part.pending_images = [], []


def token_positions(model: HookedViT, include_prefix: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``token``, ``row``, ``col`` for the kept tokens of one image."""
    layout = model.layout
    start = 0 if include_prefix else layout.patch_start
    token = torch.arange(start, layout.n_tokens)
    patch = token - layout.patch_start
    row = torch.where(patch >= 0, patch // layout.cols, -1)
    col = torch.where(patch >= 0, patch % layout.cols, -1)
    return token, row, col


@torch.no_grad()
def cache_batch(model: HookedViT, batch: ImageBatch, config: CacheConfig) -> dict[str, torch.Tensor]:
    """Rows for one batch: every kept token of every image, hooks flattened to ``[rows, width]``."""
    images_BCHW = with_views(batch.images_BCHW, batch.indices, config.views, config.augment)
    _, acts = model.run_with_cache(images_BCHW, names_filter=list(config.hooks))
    token, row, col = token_positions(model, config.include_prefix)
    B, T = images_BCHW.shape[0], token.numel()
    dtype = getattr(torch, config.dtype)
    rows = {name: acts[name][:, token].reshape(B * T, -1).to("cpu", dtype) for name in config.hooks}
    rows["image_index"] = torch.tensor(batch.indices).repeat_interleave(config.views * T)
    rows["view"] = torch.arange(config.views).repeat(len(batch.indices)).repeat_interleave(T)
    rows["token"], rows["row"], rows["col"] = token.repeat(B), row.repeat(B), col.repeat(B)
    return rows


def without_images(batch: ImageBatch, done: set[int]) -> ImageBatch:
    """The batch minus images already cached (for resuming)."""
    keep = [j for j, i in enumerate(batch.indices) if i not in done]
    if len(keep) == len(batch.indices):
        return batch
    return replace(
        batch,
        images_BCHW=batch.images_BCHW[keep],
        indices=tuple(batch.indices[j] for j in keep),
        paths=tuple(batch.paths[j] for j in keep),
        labels_B=None if batch.labels_B is None else batch.labels_B[keep],
    )


def clear_cache(folder: Path) -> None:
    """Remove the index and every shard of a cache folder (``--force``)."""
    (folder / "index.json").unlink(missing_ok=True)
    for shard in folder.glob("shard_*.safetensors"):
        shard.unlink()


def write_cache(folder: Path, model: HookedViT, batches: Iterable[ImageBatch], config: CacheConfig, made_from: dict) -> CacheIndex:
    """Cache every image of ``batches`` not already in ``folder`` in this process (see
    :func:`harvest` for an image set on any engine); returns the index."""
    index = CacheIndex(folder, config, made_from)
    work = HarvestPass(folder, config, index, index.done_images)
    work.merge(work.start(model), fold(work, model, batches))
    return index


def harvest(folder: Path, images: ImageSet, loaded: LoadedModel, config: CacheConfig, made_from: dict, *, keep_every: int = 0,
            keep_max: int = 0, progress: bool = True) -> tuple[CacheIndex, Streamed[Harvested]]:
    """Cache every image of ``images`` not already in ``folder`` (a killed run resumes after its
    last merged shard, if ``made_from`` (:func:`vitcircuits.inputs.provenance`) and ``config`` are
    those of the index), through the image set's engine; also keep up to ``keep_max`` images whose
    index is a multiple of ``keep_every``."""
    index = CacheIndex(folder, config, made_from)
    streamed = images.map(loaded, HarvestPass(folder, config, index, index.done_images, keep_every, keep_max), progress=progress)
    return index, streamed
