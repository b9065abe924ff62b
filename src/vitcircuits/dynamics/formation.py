"""When do the heads, the composition edges and the classes' performance form, and in what order?

From the per-image measurements of every checkpoint (:class:`~vitcircuits.dynamics.measure.StepMeasures`)
this fits every metric's formation step (:func:`~vitcircuits.dynamics.phase.fit_crossing`, the
half-way point of its change from the first checkpoint to the last, with an image-bootstrap
interval) and the lags between them:

- **heads**: every head's modular score and neighbour mass (as in the atlas: the modular score is
  recomputed from the resampled means of neighbour mass and the 8 direction masses);
- **edges**: the strength (path-patching verdict metric) of the edges the final model supports,
  read at the query set where the verdict found them, and the strongest others: per input (q, k,
  v), the ``new_edges`` unsupported edges whose strength rose most above its first value at any
  checkpoint (an edge that appears during training, whether or not it lasts);
- **groups**: the test loss and accuracy of every class group (compositional, single-patch), a
  ratio over the group's images recomputed on every resample;
- **circuit**: the mean progress of the supported edges, each scaled to go from 0 at the first
  checkpoint to 1 at the last (without supported edges: of the final model's modular heads' scores).

The lags put the circuit first and each group's loss drop and accuracy rise second: a ratio of
steps above 1 means the group changes after the circuit forms. ``in_window`` says whether that
crossing falls inside the circuit's interval, the test that the compositional loss drop happens
in the same window; the single-patch group is the control, which needs no circuit.

Shape letters local to this module, as in :mod:`~vitcircuits.dynamics.phase`: ``G`` the
checkpoints, ``V`` a metric's per-image components.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from vitcircuits.composition.patching import PATHS, QUERY_SETS
from vitcircuits.dynamics.measure import StepMeasures
from vitcircuits.dynamics.phase import Crossing, PhaseConfig, Statistic, crossing_of, curve, first_component, lag_of, resampled_crossings
from vitcircuits.heads.metrics import direction_entropy, direction_shares

Edge = tuple[int, int, int, int, str, str]
"""``(sender layer, sender head, receiver layer, receiver head, input, query set)``."""


@dataclass(frozen=True)
class FormationConfig:
    """How formation is read from a series."""

    phase: PhaseConfig = field(default_factory=PhaseConfig)
    """The crossing fit and its bootstrap."""
    new_edges: int = 2
    """Unsupported edges followed per input (q, k, v): those whose strength rose most."""
    key_heads: int = 8
    """At most this many key heads in the figures (the final model's modular heads, then the heads
    of supported edges)."""


@dataclass
class Metric:
    """One followed metric: its curve over the checkpoints and its formation step."""

    kind: str
    """``head``, ``edge``, ``group`` or ``circuit``."""
    subject: str
    name: str
    curve_G: np.ndarray
    crossing: Crossing
    key: bool = False
    """A key head, a supported edge, a group or the circuit (drawn in the figures)."""
    extra: dict = field(default_factory=dict)
    """Per kind: a head's final kind and peak offset; an edge's verdict at the end."""
    samples_Z: np.ndarray | None = field(default=None, repr=False)
    """The crossing step of every image resample (NaN: none), for the lags."""

    def row(self) -> dict:
        c = self.crossing
        return {"kind": self.kind, "subject": self.subject, "metric": self.name, "key": self.key,
                "initial": float(self.curve_G[0]), "final": float(self.curve_G[-1]), "change": c.change,
                "step": c.step, "step_lo": c.lo, "step_hi": c.hi, "crossed_share": c.crossed_share, **self.extra}


@dataclass
class Formation:
    """Every metric's curve and crossing, and the lags of the groups behind the circuit."""

    steps_G: np.ndarray
    metrics: list[Metric]
    lags: list[dict]

    def find(self, kind: str, subject: str, name: str) -> Metric:
        return next(m for m in self.metrics if (m.kind, m.subject, m.name) == (kind, subject, name))


def modular_score(means_GV: np.ndarray) -> np.ndarray:
    """The atlas's modular score from the means of neighbour mass and the 8 direction masses."""
    return means_GV[..., 0] * direction_entropy(direction_shares(means_GV[..., 1:]))


def ratio(means_GV: np.ndarray) -> np.ndarray:
    """Mean of a group's values over its images: components (value × membership, membership)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return means_GV[..., 0] / means_GV[..., 1]


def head_name(layer: int, head: int) -> str:
    return f"L{layer}H{head}"


def edge_name(edge: Edge) -> str:
    sl, sh, rl, rh, path, query = edge
    return f"{head_name(sl, sh)}→{head_name(rl, rh)}.{path}@{query}"


def _edge_values_IG(measures: Sequence[StepMeasures], edge: Edge) -> np.ndarray:
    sl, sh, rl, rh, path, query = edge
    s = measures[0].senders.index((sl, sh))
    return np.stack([m.edges_ISJLHU[:, s, PATHS.index(path), rl, rh, QUERY_SETS.index(query)] for m in measures], axis=1)


def new_edges(measures: Sequence[StepMeasures], supported: Sequence[Edge], per_input: int) -> list[Edge]:
    """Per input, the ``per_input`` unsupported edges whose mean strength rose most above its
    value at the first checkpoint (module docstring)."""
    if not measures[0].senders:
        return []
    means_GSJLHU = np.stack([m.edges_ISJLHU.mean(0) for m in measures])
    rise_SJLHU = means_GSJLHU.max(0) - means_GSJLHU[0]
    taken = {e[:5] for e in supported}
    senders = measures[0].senders
    chosen = []
    for j, path in enumerate(PATHS):
        candidates = []
        for s, (sl, sh) in enumerate(senders):
            for rl in range(sl + 1, rise_SJLHU.shape[2]):
                for rh in range(rise_SJLHU.shape[3]):
                    if (sl, sh, rl, rh, path) in taken:
                        continue
                    u = int(np.argmax(rise_SJLHU[s, j, rl, rh]))
                    candidates.append((rise_SJLHU[s, j, rl, rh, u], (sl, sh, rl, rh, path, QUERY_SETS[u])))
        chosen += [edge for _, edge in sorted(candidates, key=lambda c: -c[0])[:per_input]]
    return chosen


def _progress_IG(values_IG: np.ndarray) -> np.ndarray | None:
    """Values scaled to 0 at the first checkpoint's mean and 1 at the last's; None without change."""
    mean_G = values_IG.mean(0)
    change = mean_G[-1] - mean_G[0]
    return None if change == 0 else (values_IG - mean_G[0]) / change


def _metric(kind: str, subject: str, name: str, steps_G: np.ndarray, components: np.ndarray, config: PhaseConfig,
            statistic: Statistic = first_component, **extra) -> Metric:
    key = extra.pop("key", False)
    curve_G, samples_Z = curve(components, statistic), resampled_crossings(steps_G, components, config, statistic)
    return Metric(kind, subject, name, curve_G, crossing_of(steps_G, curve_G, samples_Z, config), key, extra, samples_Z)


def formation(steps: Sequence[int], measures: Sequence[StepMeasures], supported: Sequence[Edge], groups: Mapping[str, Sequence[int]],
              config: FormationConfig = FormationConfig()) -> Formation:
    """Fit every metric of the series (module docstring); ``measures`` in the order of ``steps``,
    all over the same images; ``supported``: the final model's supported edges; ``groups``: class
    name → class indices (ignored without labels)."""
    steps_G = np.asarray(steps, dtype=np.float64)
    if len(measures) != len(steps_G) or len(steps_G) < 2:
        raise ValueError(f"need the measures of at least 2 checkpoints, one per step; got {len(measures)} for {len(steps_G)} steps")
    phase = config.phase
    heads_GILHM = np.stack([m.heads_ILHM for m in measures])
    modular = [(r.layer, r.head) for r in measures[-1].atlas.rows if r.kind == "modular"]
    edge_heads = [h for e in supported for h in ((e[0], e[1]), (e[2], e[3]))]
    key_heads = list(dict.fromkeys(modular + edge_heads))[: config.key_heads]
    metrics = _head_metrics(steps_G, measures[-1], heads_GILHM, key_heads, phase)
    followed = [(e, True) for e in supported] + [(e, False) for e in new_edges(measures, supported, config.new_edges)]
    edge_progress = []
    for edge, is_supported in followed:
        values_IG = _edge_values_IG(measures, edge)
        metrics.append(_metric("edge", edge_name(edge), "strength", steps_G, values_IG, phase, key=is_supported,
                               final_verdict="supported" if is_supported else "other"))
        if is_supported and (p := _progress_IG(values_IG)) is not None:
            edge_progress.append(p)
    head_progress = [p for layer, head in modular if (p := _progress_IG(_modular_values_IG(heads_GILHM, layer, head))) is not None]
    parts, of = (edge_progress, "supported edges") if edge_progress else (head_progress, "modular heads")
    circuit = _metric("circuit", "circuit", "progress", steps_G, np.mean(parts, axis=0), phase, key=True, parts=len(parts), of=of) \
        if parts else None
    group_metrics = _group_metrics(steps_G, measures, groups, phase)
    metrics += ([circuit] if circuit else []) + group_metrics
    lags = [] if circuit is None else [_lag(circuit, g) for g in group_metrics]
    return Formation(steps_G, metrics, lags)


def _head_metrics(steps_G: np.ndarray, final: StepMeasures, heads_GILHM: np.ndarray, key_heads: list[tuple[int, int]],
                  phase: PhaseConfig) -> list[Metric]:
    """Every head's modular score and neighbour mass, labelled by the final atlas."""
    metrics = []
    for r in final.atlas.rows:
        comps_IGV = heads_GILHM[:, :, r.layer, r.head].transpose(1, 0, 2)
        extra = {"key": (r.layer, r.head) in key_heads, "layer": r.layer, "head": r.head, "final_kind": r.kind, "peak_dy": r.peak_dy,
                 "peak_dx": r.peak_dx}
        subject = head_name(r.layer, r.head)
        metrics.append(_metric("head", subject, "modular_score", steps_G, comps_IGV, phase, modular_score, **extra))
        metrics.append(_metric("head", subject, "neighbour_mass", steps_G, comps_IGV[..., :1], phase, **extra))
    return metrics


def _group_metrics(steps_G: np.ndarray, measures: Sequence[StepMeasures], groups: Mapping[str, Sequence[int]],
                   phase: PhaseConfig) -> list[Metric]:
    """Loss and accuracy of all labelled images (of the groups' classes, when there are groups)
    and of every group; none without labels."""
    labels_I = measures[0].labels_I
    if labels_I is None:
        return []
    metrics = []
    every = sorted({c for cs in groups.values() for c in cs}) or sorted(set(labels_I[labels_I >= 0].tolist()))
    values = {"loss": np.stack([m.loss_I for m in measures], axis=1), "accuracy": np.stack([m.correct_I for m in measures], axis=1)}
    for name, classes in {"all": every, **groups}.items():
        member_I = np.isin(labels_I, list(classes)).astype(np.float64)
        if not member_I.any():
            continue
        for metric_name, values_IG in values.items():
            comps_IGV = np.stack([values_IG * member_I[:, None], np.broadcast_to(member_I[:, None], values_IG.shape)], axis=-1)
            metrics.append(_metric("group", name, metric_name, steps_G, comps_IGV, phase, ratio, key=True, images=int(member_I.sum())))
    return metrics


def _modular_values_IG(heads_GILHM: np.ndarray, layer: int, head: int) -> np.ndarray:
    """Per-image modular scores (for the circuit's progress only; the head rows use the atlas's)."""
    return modular_score(heads_GILHM[:, :, layer, head]).T


def _lag(a: Metric, b: Metric) -> dict:
    lag = lag_of(a.crossing, b.crossing, a.samples_Z, b.samples_Z)
    window = (a.crossing.lo, a.crossing.hi)
    in_window = None if b.crossing.step is None or None in window else bool(window[0] <= b.crossing.step <= window[1])
    return {"first": f"{a.subject} {a.name}", "then": f"{b.subject} {b.name}", "ratio": lag.ratio, "ratio_lo": lag.lo, "ratio_hi": lag.hi,
            "both_crossed_share": lag.both_crossed_share, "then_step": b.crossing.step, "in_window": in_window}
