"""The one seeded sampler: uniform random samples from one pass over a stream of unknown length.

Reservoir sampling (Algorithm R) with memory for the samples only. Each sample size gets its own
generator seeded with ``seed``, so a sample does not depend on which other sizes are drawn beside
it. Used for the images of path patching and task checks, and for sampled ``hf:`` sources.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TypeVar

import torch

T = TypeVar("T")


def reservoir(stream: Iterable[T], sizes: Sequence[int], seed: int) -> list[list[T]]:
    """A uniform random sample of ``n`` items (all, if fewer) for each ``n`` of ``sizes``, each in
    stream order."""
    generators = [torch.Generator().manual_seed(seed) for _ in sizes]
    kept: list[list[tuple[int, T]]] = [[] for _ in sizes]
    for seen, item in enumerate(stream):
        for n, sample, generator in zip(sizes, kept, generators):
            if len(sample) < n:
                sample.append((seen, item))
            else:
                slot = int(torch.randint(seen + 1, (1,), generator=generator))
                if slot < n:
                    sample[slot] = (seen, item)
    return [[item for _, item in sorted(sample, key=lambda pair: pair[0])] for sample in kept]
