"""Reading harvested activations (the shards of :mod:`vitcircuits.cache`) for SAE training and
evaluation, one shard in memory at a time.

Rows are split by *image*: images whose list index is a multiple of ``holdout_every`` are held
out for evaluation (with all their views), so no evaluation row shares an image with training.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from vitcircuits.files import read_json

POSITION_KEYS = ("image_index", "view", "row", "col")


@dataclass(frozen=True)
class HarvestRows:
    """One shard's rows of one hook, with their positions."""

    acts_ND: torch.Tensor
    image_index_N: torch.Tensor
    view_N: torch.Tensor
    row_N: torch.Tensor
    col_N: torch.Tensor

    def select(self, keep_N: torch.Tensor) -> HarvestRows:
        return HarvestRows(*(t[keep_N] for t in (self.acts_ND, self.image_index_N, self.view_N, self.row_N, self.col_N)))


class ShardReader:
    """The rows of one hook in a cache folder (``index.json`` + ``shard_*.safetensors``)."""

    def __init__(self, folder: str | Path, hook: str) -> None:
        self.folder = Path(folder)
        index_path = self.folder / "index.json"
        if not index_path.is_file():
            raise FileNotFoundError(f"{index_path}: no activation cache here (run `vitcircuits cache` or `sae train`)")
        self.index = read_json(index_path)
        hooks = self.index["config"]["hooks"]
        if hook not in hooks:
            raise ValueError(f"{self.folder}: hook {hook!r} was not cached (cached: {', '.join(hooks)})")
        self.hook = hook
        if not self.index["shards"]:
            raise ValueError(f"{self.folder}: the cache has no finished shard")

    @property
    def n_rows(self) -> int:
        return sum(shard["rows"] for shard in self.index["shards"])

    def n_training_rows(self, holdout_every: int) -> int:
        """Rows of the images not held out (index not a multiple of ``holdout_every``), from the index
        alone: every image of a shard has the same number of rows (its views times the kept tokens)."""
        return sum(shard["rows"] // len(shard["images"]) * sum(i % holdout_every != 0 for i in shard["images"])
                   for shard in self.index["shards"])

    @property
    def width(self) -> int:
        with self._open(0) as f:
            return f.get_slice(self.hook).get_shape()[1]

    @contextmanager
    def _open(self, i: int):
        """Shard ``i``; a missing, truncated or corrupt shard raises one line naming it."""
        path = self.folder / self.index["shards"][i]["file"]
        try:
            with safe_open(str(path), "pt") as f:
                yield f
        except (SafetensorError, OSError) as err:
            raise ValueError(f"{path}: unreadable activation shard ({err}); rerun with --force") from None

    def rows(self, order: list[int] | None = None) -> Iterator[HarvestRows]:
        """Shard by shard (in ``order`` if given), as float32."""
        shards = self.index["shards"]
        for i in order if order is not None else range(len(shards)):
            with self._open(i) as f:
                acts_ND = f.get_tensor(self.hook).float()
                positions = [f.get_tensor(k) if k in f.keys() else torch.zeros(acts_ND.shape[0], dtype=torch.long) for k in POSITION_KEYS]
            if acts_ND.shape[0] != shards[i]["rows"]:
                raise ValueError(f"{self.folder / shards[i]['file']}: {acts_ND.shape[0]} rows, the index says {shards[i]['rows']}; rerun with --force")
            yield HarvestRows(acts_ND, *positions)

    def split(self, held_out: bool, holdout_every: int, order: list[int] | None = None) -> Iterator[HarvestRows]:
        """Only the held-out (or only the training) images' rows."""
        for rows in self.rows(order):
            keep_N = (rows.image_index_N % holdout_every == 0) == held_out
            if keep_N.any():
                yield rows.select(keep_N)


class ShuffleBuffer:
    """Shuffle a stream of activation batches with bounded memory.

    Rows from ``source`` (an iterable of ``[*, D]`` tensors) accumulate until ``capacity_rows`` are held;
    the pool is then shuffled and whole ``batch_size`` batches are emitted until fewer than
    ``capacity_rows // 2`` remain. At the end the rest is shuffled and emitted (the last batch may be
    smaller). Every source row is yielded exactly once per pass; at most ``capacity_rows - 1`` plus one
    source batch are held. Each pass re-iterates ``source`` and uses the same seed, so passes over a
    deterministic source are identical. ``peak_rows`` records the largest pool seen.

    The pool and its shuffled copy live in two buffers allocated once per pass (grown only for a
    larger source batch), and each emitted batch is its own copy: the allocations do not change
    size from one refill to the next, so a long pass does not fragment the heap.
    """

    def __init__(self, source: Iterable[torch.Tensor], capacity_rows: int, batch_size: int, seed: int = 0) -> None:
        if capacity_rows < 2 * batch_size:
            raise ValueError(f"capacity_rows ({capacity_rows}) must be at least 2 * batch_size ({batch_size})")
        self.source, self.capacity_rows, self.batch_size, self.seed = source, capacity_rows, batch_size, seed
        self.peak_rows = 0

    def _shuffled(self, pool_ND: torch.Tensor, out_ND: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """``pool_ND`` in a random order, written into ``out_ND``."""
        n = pool_ND.shape[0]
        self.peak_rows = max(self.peak_rows, n)
        return torch.index_select(pool_ND, 0, torch.randperm(n, generator=gen), out=out_ND[:n])

    def __iter__(self) -> Iterator[torch.Tensor]:
        gen = torch.Generator().manual_seed(self.seed)
        pool_ND = shuffled_ND = torch.empty(0)
        n_held = 0
        for batch in self.source:
            batch_ND = batch.reshape(-1, batch.shape[-1])
            if n_held + batch_ND.shape[0] > pool_ND.shape[0] or pool_ND.dtype != batch_ND.dtype:
                size = max(self.capacity_rows + batch_ND.shape[0], n_held + batch_ND.shape[0])
                grown = batch_ND.new_empty(size, batch_ND.shape[-1])
                if n_held:
                    grown[:n_held] = pool_ND[:n_held]
                pool_ND, shuffled_ND = grown, batch_ND.new_empty(size, batch_ND.shape[-1])
            pool_ND[n_held : n_held + batch_ND.shape[0]] = batch_ND
            n_held += batch_ND.shape[0]
            if n_held < self.capacity_rows:
                continue
            mixed_ND = self._shuffled(pool_ND[:n_held], shuffled_ND, gen)
            n_out = (n_held - self.capacity_rows // 2) // self.batch_size * self.batch_size
            yield from (b.clone() for b in mixed_ND[:n_out].split(self.batch_size))
            pool_ND[: n_held - n_out] = mixed_ND[n_out:]
            n_held -= n_out
        if n_held:
            yield from (b.clone() for b in self._shuffled(pool_ND[:n_held], shuffled_ND, gen).split(self.batch_size))


def training_batches(reader: ShardReader, batch_size: int, epochs: int, holdout_every: int, capacity_rows: int, seed: int) -> Iterator[torch.Tensor]:
    """Shuffled training batches over ``epochs`` passes; each pass visits the shards in a new
    seeded order through a :class:`ShuffleBuffer` of ``capacity_rows`` rows."""
    n_shards = len(reader.index["shards"])
    for epoch in range(epochs):
        order = torch.randperm(n_shards, generator=torch.Generator().manual_seed(seed * 7919 + epoch)).tolist()
        source = (rows.acts_ND for rows in reader.split(False, holdout_every, order))
        yield from ShuffleBuffer(source, max(capacity_rows, 2 * batch_size), batch_size, seed + epoch)
