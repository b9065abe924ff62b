"""One line of evidence for an edge: its effect with an image-bootstrap interval, set against a
null of enough members, with a practical floor.

An effect is **beyond its null** when it reaches the practical floor and exceeds the null's 95th
percentile: a one-sided test at 5 %. Each null member is a mean over the same images as the
effect, so the members carry the effect's own sampling noise and the percentile accounts for it.
A null without spread (every member silent, or every random direction unread) carries no noise:
then the lower end of the effect's 95 % bootstrap interval over images must exceed it instead, so
the verdict rests on the effect's interval and the floor. The rule never divides by the null's
spread; the z-score is reported beside it only when there is spread (``z`` None and
``null_degenerate`` true otherwise).

Null members (:data:`MIN_NULL` at least) are the same measurement for other senders of *all*
earlier layers into the same receiver input, topped up with random-direction ablations of the
tested sender's own per-token norm when the model has too few earlier heads. An effect below its
floor can never pass, so where a null costs extra forward passes (the task-level checks) none is
drawn for it and its null fields are None (:func:`below_floor`).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

MIN_NULL = 20
"""Fewest members of any null."""
N_BOOT = 1000
"""Bootstrap resamples of the images for an effect's interval."""


@dataclass(frozen=True)
class Line:
    """One line of evidence (module docstring)."""

    effect: float
    """Mean effect over images."""
    lo: float
    """2.5th percentile of the bootstrap means (never above ``effect``)."""
    hi: float
    """97.5th percentile of the bootstrap means (never below ``effect``)."""
    null_mean: float | None
    null_std: float | None
    """Sample standard deviation (ddof 1) of the null members; 0 for a null without spread."""
    null_q95: float | None
    n_null: int
    z: float | None
    """``(effect − null_mean) / null_std``; None when the null has no spread."""
    null_degenerate: bool
    floor: float
    """The practical floor the effect must reach."""
    beyond: bool
    """``effect ≥ floor`` and ``effect > null_q95`` (``lo > null_q95`` for a null without spread)."""

    def as_dict(self) -> dict:
        return asdict(self)


def bootstrap_intervals(values_IE: np.ndarray, n_boot: int = N_BOOT, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """95 % percentile intervals ``(lo_E, hi_E)`` of the mean over images of each column, from
    ``n_boot`` resamples of the images (the same resamples for every column), widened to contain
    the mean itself."""
    values_IE = np.asarray(values_IE, dtype=np.float64)
    n = values_IE.shape[0]
    if n == 0:
        raise ValueError("an effect's interval needs at least one image")
    mean_E = values_IE.mean(0)
    if n == 1:
        return mean_E.copy(), mean_E.copy()
    counts_ZI = np.random.default_rng(seed).multinomial(n, np.full(n, 1.0 / n), size=n_boot).astype(np.float64)
    lo, hi = np.empty_like(mean_E), np.empty_like(mean_E)
    step = max(1, 2**24 // n_boot)
    for c0 in range(0, values_IE.shape[1], step):
        means_ZE = counts_ZI @ values_IE[:, c0 : c0 + step] / n
        lo[c0 : c0 + step], hi[c0 : c0 + step] = np.quantile(means_ZE, [0.025, 0.975], axis=0)
    return np.minimum(lo, mean_E), np.maximum(hi, mean_E)


def judge(effect: float, lo: float, hi: float, null: Sequence[float], floor: float) -> Line:
    """Set one effect against its null (module docstring)."""
    members = np.asarray(null, dtype=np.float64)
    if members.size < MIN_NULL:
        raise ValueError(f"a null needs at least {MIN_NULL} members, got {members.size}")
    std = float(members.std(ddof=1))
    mean, q95 = float(members.mean()), float(np.quantile(members, 0.95))
    degenerate = not std > 0
    return Line(effect=float(effect), lo=float(lo), hi=float(hi), null_mean=mean, null_std=std if not degenerate else 0.0,
                null_q95=q95, n_null=int(members.size), z=None if degenerate else (float(effect) - mean) / std,
                null_degenerate=degenerate, floor=float(floor), beyond=bool(effect >= floor and (lo if degenerate else effect) > q95))


def below_floor(effect: float, lo: float, hi: float, floor: float) -> Line:
    """The line of an effect under its floor, for which no null was drawn."""
    if effect >= floor:
        raise ValueError(f"effect {effect} reaches its floor {floor}: it needs a null")
    return Line(effect=float(effect), lo=float(lo), hi=float(hi), null_mean=None, null_std=None, null_q95=None, n_null=0, z=None,
                null_degenerate=False, floor=float(floor), beyond=False)


def fill_count(n_other: int) -> int:
    """Random-direction members needed beside ``n_other`` other senders to reach :data:`MIN_NULL`."""
    return max(0, MIN_NULL - n_other)
