"""How a pass over the images runs: in this process, or spread over a Ray cluster's model replicas.

A pass (:class:`ImagePass`) is work over images whose partial results merge: the atlas
accumulators, the predictions, the activation shards. :meth:`Engine.map` runs it over an
:class:`~vitcircuits.inputs.ImageSet` and returns the merged result with the pass's
:class:`~vitcircuits.data.loader.LoadSummary`. :meth:`Engine.map_items` spreads other independent
model calls the same way (the exact task-level checks of the composition stage, chunks of edges).

Either way the image list is cut into shards of whole batches (``shard_images``), each shard
becomes a partial result, and the partial results are merged in shard order:

- ``local`` (the default): one decoding pass in this process, shard after shard.
- ``ray`` (:mod:`vitcircuits.engine.ray`): each worker holds one model replica and turns shards
  into partial results; the driver merges them in shard order, so the result does not depend on
  which worker ran which shard or when. A worker
  that dies is restarted and its shards are run again; a shard's result is merged once, when it
  arrives, so no image is counted twice or lost.

The batches and the merge order are the same for both, so sums are added in the same order; what
can differ is the torch thread count inside a worker (one per CPU it reserves) and the driver.
With the same thread count the outputs are byte-identical (tested on ``hunt``). With different
ones, forward passes still matched to the last bit here, while the backward passes of the edge
attribution moved by about 1e-7 relative and the transfer probes' R² by about 1e-14.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Generic, Literal, Protocol, TypeVar

import torch

from vitcircuits.data.loader import ImageBatch, LoadSummary
from vitcircuits.models.hooked_vit import HookedViT

if TYPE_CHECKING:
    from vitcircuits.inputs import ImageSet, ModelOptions
    from vitcircuits.models.loading import LoadedModel

R = TypeVar("R")
T = TypeVar("T")
U = TypeVar("U")


class ImagePass(Protocol, Generic[R]):
    """Work over images that splits into shards and merges back (picklable: Ray sends it to
    workers). Passes subclass it for the default :meth:`finish`."""

    def start(self, model: HookedViT) -> R:
        """An empty partial result."""

    def step(self, model: HookedViT, partial: R, batch: ImageBatch) -> R:
        """``partial`` with one more batch (images in source order within a shard)."""

    def finish(self, model: HookedViT, partial: R) -> R:
        """``partial`` at the end of a shard, on the worker (flush what it buffers; by default as is)."""
        return partial

    def merge(self, first: R, later: R) -> R:
        """Two partial results of consecutive, disjoint image ranges, ``first`` before ``later``
        (on the driver, in shard order)."""


@dataclass(frozen=True)
class Streamed(Generic[R]):
    """A pass's merged result and what the pass read."""

    result: R
    summary: LoadSummary


class Engine(Protocol):
    """Runs passes over images (module docstring)."""

    name: str

    def map(self, images: ImageSet, loaded: LoadedModel, work: ImagePass[R], progress: bool = True) -> Streamed[R]:
        """Run ``work`` over every image of ``images``; ``loaded`` is the driver's model."""

    def map_items(self, model: HookedViT, fn: Callable[[HookedViT, T], U], items: Sequence[T],
                  advance: Callable[[], None] = lambda: None) -> list[U]:
        """``[fn(model, item) for item in items]`` in order, each call on ``model`` (the driver's)
        or on a replica of it (``fn`` and the items must then be picklable); ``advance()`` after
        each call ends."""

    def describe(self) -> dict:
        """The manifest's ``engine`` section."""

    def close(self) -> None:
        """Release what the engine holds (its replicas) before the process ends."""


class LocalEngine:
    """Every pass in this process: one decoding pass over the images, cut into the same shards
    (of ``shard_images``) and merged the same way as on a cluster."""

    name = "local"

    def __init__(self, shard_images: int = 256) -> None:
        self.shard_images = shard_images

    def map(self, images: ImageSet, loaded: LoadedModel, work: ImagePass[R], progress: bool = True) -> Streamed[R]:
        model = loaded.model
        size = shard_size(self.shard_images, images.batch_size)
        position = {item.index: p for p, item in enumerate(images.source.items)}
        batches = images.batches(progress=progress)
        merged, partial, current = work.start(model), None, -1
        for batch in batches:
            shard = position[batch.indices[0]] // size
            if shard != current:
                if partial is not None:
                    merged = work.merge(merged, work.finish(model, partial))
                partial, current = work.start(model), shard
            partial = work.step(model, partial, batch)
        if partial is not None:
            merged = work.merge(merged, work.finish(model, partial))
        return Streamed(merged, batches.summary())

    def map_items(self, model: HookedViT, fn: Callable[[HookedViT, T], U], items: Sequence[T],
                  advance: Callable[[], None] = lambda: None) -> list[U]:
        results = []
        for item in items:
            results.append(fn(model, item))
            advance()
        return results

    def describe(self) -> dict:
        return {"engine": "local", "shard_images": self.shard_images}

    def close(self) -> None:
        """Nothing to release: the model is the driver's."""


LOCAL = LocalEngine()


@dataclass(frozen=True, kw_only=True)
class EngineOptions:
    """Where the image passes of a command run (same meaning in every command)."""

    engine: Literal["local", "ray"] = "local"
    """``local`` (in this process) or ``ray`` (model replicas on a Ray cluster)."""
    ray_address: str | None = None
    """Cluster to join (``auto``: the one ``ray start`` runs on this node; ``ray://host:port``);
    None starts a local cluster for this command."""
    workers: int = 2
    """Model replicas (Ray actors), each one process."""
    gpus_per_worker: float = 0.0
    """GPUs each replica reserves (fractions share a GPU); with any, replicas run on ``cuda``."""
    cpus_per_worker: float = 1.0
    """CPUs each replica reserves (its torch threads)."""
    shard_images: int = 256
    """Images per shard, rounded up to whole batches: the unit that is retried when a worker dies."""

    def __post_init__(self) -> None:
        if self.engine not in ("local", "ray"):
            raise ValueError(f"--engine: unknown engine {self.engine!r} (local or ray)")
        if self.workers < 1 or self.shard_images < 1 or self.gpus_per_worker < 0 or self.cpus_per_worker <= 0:
            raise ValueError("--workers and --shard-images must be ≥ 1, --gpus-per-worker ≥ 0")

    def start(self, model: ModelOptions, loaded: LoadedModel) -> Engine:
        """The engine; for ``ray``, connect to the cluster and start the replicas (each loads
        ``model`` and checks its weights against ``loaded``'s)."""
        if self.engine == "local":
            return LocalEngine(self.shard_images)
        from vitcircuits.engine.ray import RayEngine

        return RayEngine(self, model, loaded)


def fold(work: ImagePass[R], model: HookedViT, batches: Iterable) -> R:
    """``work`` over ``batches`` as one shard, in this process: start, every step, finish."""
    partial = work.start(model)
    for batch in batches:
        partial = work.step(model, partial, batch)
    return work.finish(model, partial)


def numbered(batches: Iterable[torch.Tensor]) -> list[tuple[torch.Tensor, int]]:
    """Each image batch (on the CPU, ready to send to a replica) with the index of its first image
    in the concatenation: the items of :meth:`Engine.map_items` for per-batch work."""
    items, start = [], 0
    for images_BCHW in batches:
        items.append((images_BCHW.cpu(), start))
        start += len(images_BCHW)
    return items


def shard_size(shard_images: int, batch_size: int) -> int:
    """Images per shard: ``shard_images`` rounded up to whole batches."""
    return -(-shard_images // batch_size) * batch_size


def shard_spans(n_items: int, shard_images: int, batch_size: int) -> list[tuple[int, int]]:
    """``[start, stop)`` positions of consecutive shards covering ``n_items``."""
    size = shard_size(shard_images, batch_size)
    return [(start, min(n_items, start + size)) for start in range(0, n_items, size)]
