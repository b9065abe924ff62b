"""The ``ray`` engine: image passes on model replicas held by Ray actors (:mod:`vitcircuits.engine`).

- **Replicas.** Each worker is a Ray actor that loads the model from the command's
  :class:`~vitcircuits.inputs.ModelOptions` once (every node must see the same weights file, image
  files and run folder: a shared file system or an object store mounted alike) and refuses to
  start when its weights differ from the driver's (the digest of
  :func:`~vitcircuits.inputs.weights_digest`).
- **Shards.** The image list is cut into shards of whole batches
  (:func:`~vitcircuits.engine.shard_spans`); each worker has at most two shards in flight, so a
  slow worker takes fewer. A worker runs the pass over its shard with its own decoding
  (:meth:`~vitcircuits.inputs.ImageSet.batches`) and returns the partial result and the shard's
  load summary.
- **Merging.** The driver merges partial results in shard order as they arrive (later ones wait in
  memory until the gap before them is filled), so the result is the same whichever worker ran
  what.
- **Faults.** Actors restart when their process dies (``max_restarts``) and Ray runs the shards that
  were in flight again (``max_task_retries``). A shard's result is taken once, so no image is
  counted twice or lost. A pass that writes files (the activation harvest) writes each shard
  atomically under a name of its own, so a retried shard overwrites its own partial output.
"""
from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from vitcircuits.data.loader import LoadSummary, SkipLog, image_list_sha256
from vitcircuits.engine import EngineOptions, ImagePass, R, Streamed, fold, shard_spans

if TYPE_CHECKING:
    from vitcircuits.inputs import ImageSet, ModelOptions
    from vitcircuits.models.loading import LoadedModel

IN_FLIGHT = 2
"""Shards queued on one worker at a time."""
MAX_RESTARTS = 3
"""Restarts of one worker (each reloads the model) before the command fails."""


def _ray():
    try:
        import ray
    except ImportError:
        raise RuntimeError("--engine ray needs Ray: pip install 'vitcircuits[ray]'") from None
    return ray


class Replica:
    """One model replica (the body of a Ray actor)."""

    def __init__(self, model: ModelOptions, expected_weights: str) -> None:
        from vitcircuits.inputs import weights_digest

        self.loaded = model.load()
        found = weights_digest(self.loaded)
        if found != expected_weights:
            raise RuntimeError(f"--model {model.model}: a worker loaded other weights than the driver "
                               f"({found[:16]}… against {expected_weights[:16]}…); every node must see the same files")

    def pid(self) -> int:
        return os.getpid()

    def call(self, fn, item):
        return fn(self.loaded.model, item)

    def run(self, work: ImagePass[R], shard: ImageSet) -> tuple[R, LoadSummary]:
        batches = shard.batches(progress=False)
        return fold(work, self.loaded.model, batches), batches.summary()


class RayEngine:
    """Image passes spread over ``options.workers`` replicas (module docstring)."""

    name = "ray"

    def __init__(self, options: EngineOptions, model: ModelOptions, loaded: LoadedModel) -> None:
        from vitcircuits.inputs import weights_digest

        ray = _ray()
        self.options = options
        if not ray.is_initialized():
            if options.ray_address is None:
                ray.init(num_cpus=max(2, int(options.workers * options.cpus_per_worker + 0.999)), include_dashboard=False,
                         log_to_driver=False, logging_level=logging.WARNING)
            else:
                ray.init(address=options.ray_address, log_to_driver=False, logging_level=logging.WARNING)
        total = ray.cluster_resources()  # more than the cluster has would wait forever; less waits for busy ones
        cpus, gpus = options.workers * options.cpus_per_worker, options.workers * options.gpus_per_worker
        if total.get("CPU", 0) < cpus or total.get("GPU", 0) < gpus:
            raise RuntimeError(f"--workers {options.workers}: they need {cpus:g} CPUs and {gpus:g} GPUs, and the Ray cluster has "
                               f"{total.get('CPU', 0):g} CPUs and {total.get('GPU', 0):g} GPUs")
        device = ("cuda" if options.gpus_per_worker > 0 else "cpu") if model.device == "auto" else model.device
        actor = ray.remote(num_cpus=options.cpus_per_worker, num_gpus=options.gpus_per_worker, max_restarts=MAX_RESTARTS,
                           max_task_retries=-1)(Replica)
        self.workers = [actor.remote(replace(model, device=device), weights_digest(loaded)) for _ in range(options.workers)]
        self.pids()  # every replica has loaded its model, or the command fails here

    def _get(self, refs):
        """``ray.get``, with a worker's failure raised as its own exception (or one line of why the
        worker died)."""
        ray = _ray()
        try:
            return ray.get(refs)
        except ray.exceptions.RayTaskError as err:
            raise err.cause if isinstance(err.cause, Exception) else RuntimeError(str(err).splitlines()[-1]) from None
        except ray.exceptions.RayActorError as err:
            lines = [line for line in re.sub(r"\x1b\[[0-9;]*m", "", str(err)).splitlines() if line.strip()]
            raise RuntimeError(f"a Ray worker died and could not be restarted: {lines[-1].strip() if lines else type(err).__name__}") from None

    def close(self) -> None:
        """Stop the replicas now (they also stop when the engine is garbage-collected)."""
        ray = _ray()
        for worker in self.workers:
            ray.kill(worker)
        self.workers = []

    def pids(self) -> list[int]:
        """The workers' process ids (for tests that kill one)."""
        return self._get([w.pid.remote() for w in self.workers])

    def _spread(self, n: int, submit: Callable, arrived: Callable[[int, object], None]) -> None:
        """Run tasks ``0 … n-1`` (``submit(worker, i)`` returns the task's ref), at most
        :data:`IN_FLIGHT` per worker, the least loaded first; ``arrived(i, result)`` as each ends."""
        ray = _ray()
        queue, running, load = list(range(n)), {}, {w: 0 for w in range(len(self.workers))}
        while queue or running:
            for w in sorted(load, key=load.get):
                while queue and load[w] < IN_FLIGHT:
                    i = queue.pop(0)
                    running[submit(self.workers[w], i)] = (i, w)
                    load[w] += 1
            done, _ = ray.wait(list(running), num_returns=1)
            for ref in done:
                i, w = running.pop(ref)
                load[w] -= 1
                arrived(i, self._get(ref))

    def map_items(self, model, fn, items, advance: Callable[[], None] = lambda: None) -> list:
        fn_ref = _ray().put(fn)  # sent once, however many items
        results: dict[int, object] = {}

        def arrived(i: int, result: object) -> None:
            results[i] = result
            advance()

        self._spread(len(items), lambda worker, i: worker.call.remote(fn_ref, items[i]), arrived)
        return [results[i] for i in range(len(items))]

    def map(self, images: ImageSet, loaded: LoadedModel, work: ImagePass[R], progress: bool = True) -> Streamed[R]:
        spans = shard_spans(len(images), self.options.shard_images, images.batch_size)
        shards = [images.slice(start, stop) for start, stop in spans]
        arrived: dict[int, tuple[R, LoadSummary]] = {}
        merged, next_shard = work.start(loaded.model), 0
        summaries: list[LoadSummary] = []
        columns = (TextColumn(f"images ({len(self.workers)} workers)"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, console=Console(stderr=True), disable=not progress) as bar:
            task = bar.add_task("images", total=len(images))

            def merge_in_order(s: int, result: tuple[R, LoadSummary]) -> None:
                nonlocal merged, next_shard
                arrived[s] = result
                bar.advance(task, len(shards[s]))
                while next_shard in arrived:
                    partial, summary = arrived.pop(next_shard)
                    merged = work.merge(merged, partial)
                    summaries.append(summary)
                    next_shard += 1

            work_ref = _ray().put(work)  # sent once, however many shards
            self._spread(len(shards), lambda worker, s: worker.run.remote(work_ref, shards[s]), merge_in_order)
        return Streamed(merged, merge_summaries(images, summaries))

    def describe(self) -> dict:
        o = self.options
        return {"engine": "ray", "workers": o.workers, "gpus_per_worker": o.gpus_per_worker, "cpus_per_worker": o.cpus_per_worker,
                "shard_images": o.shard_images, "address": o.ray_address}


def merge_summaries(images: ImageSet, parts: list[LoadSummary]) -> LoadSummary:
    """The load summary of the whole image list from those of its shards, in order; the driver
    warns about the skipped inputs as a local pass would (the workers' logs stay with them)."""
    whole = images.source
    skip_log = SkipLog(whole.spec)
    for skipped in (s for p in parts for s in p.skipped):
        skip_log.record(skipped)
    skip_log.warn_total(len(whole))
    return LoadSummary(spec=whole.spec, n_total=len(whole), n_ok=sum(p.n_ok for p in parts), skipped=skip_log.skipped,
                       image_list_sha256=image_list_sha256(whole), ignored=whole.ignored, labels=whole.labels, classes=whole.classes)
