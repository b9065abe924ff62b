"""When does a metric change? The step at which a per-image metric, followed over a series of
training checkpoints, crosses a fraction of its total change, with a bootstrap interval over images.

A metric's **crossing** is the first step at which the mean over images reaches
``initial + fraction × (final − initial)`` (``fraction`` ½ by default: the half-way point of its
change), interpolated linearly in log(step) between the two checkpoints around it, since
checkpoints are spaced log-uniformly and formation is read on a log axis. The interval comes from
resampling the images (the same resamples for every metric, so that the **lag** between two
crossings, e.g. a composition edge's and the compositional classes' loss drop, gets an interval
of its own). A metric that is not a plain mean over images (a ratio such as a class group's loss,
or the modular score, a product of means) is given as per-image **components** ``[I, G, V]`` and a
**statistic** that maps their image means ``[..., G, V]`` to the metric ``[..., G]``; it is
recomputed on every resample. A metric without change (final = initial), or whose resample never crosses, has no
crossing: the result says so and counts the resamples that did, and nothing is interpolated.

Shape letters local to this module: ``G`` the checkpoints of the series (in training order), ``V``
a metric's per-image components.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

Statistic = Callable[[np.ndarray], np.ndarray]
"""Image means of the components ``[..., G, V]`` to the metric ``[..., G]``."""


def first_component(means_GV: np.ndarray) -> np.ndarray:
    """The statistic of a plain mean over images (one component)."""
    return means_GV[..., 0]


def _components(values: np.ndarray) -> np.ndarray:
    """``[I, G]`` or ``[I, G, V]`` as float64 ``[I, G, V]``."""
    values = np.asarray(values, dtype=np.float64)
    return values[..., None] if values.ndim == 2 else values


@dataclass(frozen=True)
class PhaseConfig:
    """How a crossing is fitted."""

    fraction: float = 0.5
    """Share of the total change (initial to final checkpoint) whose crossing is reported."""
    n_boot: int = 1000
    """Bootstrap resamples of the images."""
    seed: int = 0
    """Seeds the resamples."""

    def __post_init__(self) -> None:
        if not 0 < self.fraction < 1:
            raise ValueError(f"fraction {self.fraction}: must lie strictly between 0 and 1")


@dataclass(frozen=True)
class Crossing:
    """A metric's crossing step (module docstring)."""

    step: float | None
    """Interpolated step of the crossing of the image mean; None when it does not change or never crosses."""
    lo: float | None
    """2.5th percentile of the resamples' crossing steps (over those that cross)."""
    hi: float | None
    """97.5th percentile."""
    change: float
    """Final minus initial value of the image mean."""
    crossed_share: float
    """Share of the resamples with a crossing (the interval is over those)."""


def crossing_step(steps_G: np.ndarray, values_G: np.ndarray, fraction: float = 0.5) -> float | None:
    """The first step where ``values_G`` reaches ``initial + fraction × (final − initial)``,
    interpolated linearly in log(step); None without change or crossing."""
    steps_G, values_G = np.asarray(steps_G, dtype=np.float64), np.asarray(values_G, dtype=np.float64)
    change = values_G[-1] - values_G[0]
    if not np.isfinite(change) or change == 0:
        return None
    progress_G = (values_G - values_G[0]) / change
    above = np.nonzero(progress_G >= fraction)[0]
    if len(above) == 0:
        return None
    g = int(above[0])
    if g == 0:
        return float(steps_G[0])
    t0, t1 = np.log(steps_G[g - 1]), np.log(steps_G[g])
    w = (fraction - progress_G[g - 1]) / (progress_G[g] - progress_G[g - 1])
    return float(np.exp(t0 + w * (t1 - t0)))


def _check(steps_G: np.ndarray, values_IGV: np.ndarray) -> None:
    if values_IGV.ndim != 3 or values_IGV.shape[1] != len(steps_G) or len(steps_G) < 2 or values_IGV.shape[0] == 0:
        raise ValueError(f"need per-image values [images, {len(steps_G)} checkpoints(, components)] over at least 2 checkpoints, "
                         f"got {values_IGV.shape}")
    if np.any(np.asarray(steps_G) <= 0) or np.any(np.diff(steps_G) <= 0):
        raise ValueError("checkpoint steps must be positive and increasing (the fit reads them on a log axis)")


def curve(values: np.ndarray, statistic: Statistic = first_component) -> np.ndarray:
    """``[G]``: the metric at every checkpoint, from per-image values ``[I, G]`` or components ``[I, G, V]``."""
    return statistic(_components(values).mean(0))


def resampled_crossings(steps_G: np.ndarray, values: np.ndarray, config: PhaseConfig = PhaseConfig(),
                        statistic: Statistic = first_component) -> np.ndarray:
    """The crossing step of each bootstrap resample of the images ``[Z]``. NaN marks a resample
    without a crossing; :func:`fit_crossing` and :func:`fit_lag` leave those out and count them,
    so no NaN reaches a result."""
    values_IGV = _components(values)
    _check(steps_G, values_IGV)
    n = values_IGV.shape[0]
    counts_ZI = np.random.default_rng(config.seed).multinomial(n, np.full(n, 1.0 / n), size=config.n_boot)
    curves_ZG = statistic(np.einsum("zi,igv->zgv", counts_ZI, values_IGV) / n)
    return np.array([np.nan if (step := crossing_step(steps_G, c, config.fraction)) is None else step for c in curves_ZG])


def crossing_of(steps_G: np.ndarray, curve_G: np.ndarray, samples_Z: np.ndarray, config: PhaseConfig = PhaseConfig()) -> Crossing:
    """The crossing of a metric's curve ``[G]`` with the interval of its resamples' crossings
    ``[Z]`` (:func:`resampled_crossings`)."""
    crossed = samples_Z[np.isfinite(samples_Z)]
    lo, hi = (float(v) for v in np.quantile(crossed, [0.025, 0.975])) if len(crossed) else (None, None)
    return Crossing(step=crossing_step(steps_G, curve_G, config.fraction), lo=lo, hi=hi, change=float(curve_G[-1] - curve_G[0]),
                    crossed_share=len(crossed) / len(samples_Z))


def fit_crossing(steps_G: np.ndarray, values: np.ndarray, config: PhaseConfig = PhaseConfig(),
                 statistic: Statistic = first_component) -> Crossing:
    """The crossing of the metric (the image mean of ``values`` ``[I, G]``, or ``statistic`` of
    the components' means ``[I, G, V]``) and its bootstrap interval."""
    return crossing_of(steps_G, curve(values, statistic), resampled_crossings(steps_G, values, config, statistic), config)


@dataclass(frozen=True)
class Lag:
    """How many times later one metric crosses than another (a ratio of steps, since formation is
    read on a log axis), with a bootstrap interval over the same image resamples."""

    ratio: float | None
    """``step_b / step_a``: above 1 when ``b`` crosses after ``a``; None when either does not cross."""
    lo: float | None
    hi: float | None
    both_crossed_share: float
    """Share of the resamples in which both cross (the interval is over those)."""


def lag_of(a: Crossing, b: Crossing, samples_a_Z: np.ndarray, samples_b_Z: np.ndarray) -> Lag:
    """The lag of ``b``'s crossing behind ``a``'s, from both crossings and their resamples' crossings
    (the same image resamples)."""
    ratio_Z = samples_b_Z / samples_a_Z
    both = ratio_Z[np.isfinite(ratio_Z)]
    lo, hi = (float(v) for v in np.quantile(both, [0.025, 0.975])) if len(both) else (None, None)
    ratio = None if a.step is None or b.step is None else b.step / a.step
    return Lag(ratio=ratio, lo=lo, hi=hi, both_crossed_share=len(both) / len(ratio_Z))


def fit_lag(steps_G: np.ndarray, a: np.ndarray, b: np.ndarray, config: PhaseConfig = PhaseConfig(),
            statistic_a: Statistic = first_component, statistic_b: Statistic = first_component) -> Lag:
    """The lag of ``b``'s crossing behind ``a``'s; ``a`` and ``b`` are per-image values (or
    components, with their statistics) of the same images, resampled together."""
    if np.asarray(a).shape[0] != np.asarray(b).shape[0]:
        raise ValueError("the two metrics must be measured on the same images")
    samples_a_Z, samples_b_Z = (resampled_crossings(steps_G, v, config, s) for v, s in ((a, statistic_a), (b, statistic_b)))
    return lag_of(crossing_of(steps_G, curve(a, statistic_a), samples_a_Z, config), crossing_of(steps_G, curve(b, statistic_b), samples_b_Z, config),
                  samples_a_Z, samples_b_Z)
