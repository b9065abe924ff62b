"""Per-token activations at chosen hooks, streamed to safetensors shards with bounded memory.

Each shard holds, for every cached hook, a ``[rows, width]`` tensor (trailing dims flattened,
e.g. ``hook_z`` ``[rows, H*Dh]``), plus per-row ``image_index`` (position in the image list),
``view`` (0 for the image itself, ≥ 1 for augmented views, :mod:`vitcircuits.data.augment`),
``token`` (sequence index), ``row`` and ``col`` (patch grid position; -1 for CLS, distillation
and register tokens). Memory holds at most one shard's rows. ``index.json`` lists the
finished shards and the images they cover, so an interrupted run resumes after the last one.

The index is keyed by what produced the rows (:func:`vitcircuits.inputs.provenance`: the model
and its weights' sha256, the image list's sha256 and the preprocessing) and by the cache config; a folder made by
anything else is refused with one line, never appended to.
"""
from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from safetensors.torch import save_file

from vitcircuits.data.augment import AugmentConfig, with_views
from vitcircuits.data.loader import ImageBatch
from vitcircuits.files import read_json, write_json, write_with
from vitcircuits.models.hooked_vit import HookedViT


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


class ShardWriter:
    """Collects rows and writes a shard whenever ``shard_rows`` are reached."""

    def __init__(self, out_dir: Path, config: CacheConfig, made_from: dict) -> None:
        self.out_dir = out_dir
        self.config = config
        self.index_path = out_dir / "index.json"
        key = json.loads(json.dumps({"config": asdict(config), "made_from": made_from}))
        self.index = read_json(self.index_path) if self.index_path.exists() else {**key, "shards": []}
        differs = [name for name in ("config", "made_from") if self.index.get(name) != key[name]]
        if differs:
            what = {"config": "another cache config", "made_from": "another model, weights, image list or preprocessing"}
            raise ValueError(f"{self.index_path}: these activations were made from {' and '.join(what[d] for d in differs)}; "
                             "use --force to recompute them or a new --out")
        self.pending: list[dict[str, torch.Tensor]] = []
        self.pending_rows = 0
        self.pending_images: list[int] = []

    @property
    def done_images(self) -> set[int]:
        return {i for shard in self.index["shards"] for i in shard["images"]}

    def add(self, rows: dict[str, torch.Tensor], image_indices: list[int]) -> None:
        self.pending.append(rows)
        self.pending_rows += next(iter(rows.values())).shape[0]
        self.pending_images.extend(image_indices)
        if self.pending_rows >= self.config.shard_rows:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        tensors = {k: torch.cat([p[k] for p in self.pending]).contiguous() for k in self.pending[0]}
        name = f"shard_{len(self.index['shards']):05d}.safetensors"
        write_with(self.out_dir / name, lambda tmp: save_file(tensors, str(tmp)))
        self.index["shards"].append({"file": name, "rows": self.pending_rows, "images": self.pending_images})
        write_json(self.index_path, self.index)
        self.pending, self.pending_rows, self.pending_images = [], 0, []


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


def write_cache(folder: Path, model: HookedViT, batches: Iterable[ImageBatch], config: CacheConfig, made_from: dict) -> ShardWriter:
    """Cache every image of ``batches`` not already in ``folder`` (a killed run resumes after its
    last finished shard, if ``made_from`` (:func:`vitcircuits.inputs.provenance`) and ``config``
    are those of the index); returns the writer, whose ``index`` lists the shards."""
    writer = ShardWriter(folder, config, made_from)
    done = writer.done_images
    for batch in batches:
        todo = without_images(batch, done)
        if todo.indices:
            writer.add(cache_batch(model, todo, config), list(todo.indices))
    writer.flush()
    return writer
