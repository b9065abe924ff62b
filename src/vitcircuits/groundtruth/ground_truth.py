"""Score the head atlas and the composition finder against known truth.

Reusable pieces: :func:`roc_auc` (Mann-Whitney U, ties counted as half) and :func:`score_edges`
(precision/recall at a threshold and ROC-AUC of any edge detector against a set of true edges)
work for any model whose edges are known; :func:`run_member` and :func:`run_benchmark` apply them
to the planted family of :mod:`vitcircuits.groundtruth.planted_family`.

Populations (what each detector is scored on, per member):

- head kinds: every head with a kind truth (planted positional heads are positives of their kind,
  fillers and uniform decoys are ``other``; content-matching receivers are left out). A head is
  predicted of a kind when the atlas labels it so; the continuous score of each kind is
  :data:`KIND_SCORES`.
- edges: every ``(sender, later receiver, input q/k/v)`` edge of the model. Positives are the planted
  causal edges; everything else, decoys included, is negative. On it: ``verdict`` (1 for
  ``supported``), ``composes`` (the composes line's effect over its bar, the larger of the null's
  95th percentile and the floor; ≥ 1 passes), ``weight_z`` (the weight score's z against random
  heads), ``attribution`` (the EAP-IG estimate of the drop of the task metric) and ``task_effect``
  (the exact drop, on the edges the stage checked).
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Hashable, Iterable, Mapping

import numpy as np
import torch

from vitcircuits.composition.circuits import EdgeRow, edge_key
from vitcircuits.composition.config import ComposeConfig
from vitcircuits.composition.scan import CompositionResult, run_composition
from vitcircuits.composition.task_patching import EdgeKey
from vitcircuits.groundtruth.planted_family import FamilyConfig, FamilyMember, build_family_member
from vitcircuits.heads.atlas import AtlasConfig, HeadAtlas, accumulate, build_atlas, new_accumulator
from vitcircuits.heads.metrics import HeadRow

KIND_SCORES: dict[str, Callable[[HeadRow], float]] = {
    "modular": lambda row: row.modular_score,
    "directional": lambda row: row.peak_mass if (row.peak_dy, row.peak_dx) != (0, 0) else 0.0,
    "self": lambda row: row.self_mass,
    "cls/sink": lambda row: row.cls_mass + row.dist_mass + row.register_mass,
}
"""Kind -> continuous atlas score ranked for its ROC-AUC: ``modular_score``; the kernel's peak
mass when the peak is at a non-zero offset (else 0); ``self_mass``; the prefix-token mass."""
SCORED_KINDS = tuple(KIND_SCORES)
EDGE_DETECTORS = ("verdict", "composes", "weight_z", "attribution", "task_effect")


def roc_auc(labels: Iterable[bool], scores: Iterable[float]) -> float:
    """Probability that a random positive outscores a random negative, ties counting one half
    (Mann-Whitney ``U / (n_pos n_neg)`` from average ranks). NaN scores rank lowest (as
    ``-inf``); NaN when either class is empty."""
    y = np.asarray(list(labels), dtype=bool)
    s = np.asarray(list(scores), dtype=float)
    s = np.where(np.isnan(s), -np.inf, s)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    ranks = (np.cumsum(counts) - (counts - 1) / 2.0)[inverse]  # 1-based average ranks
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def _ratio(a: int, b: int) -> float:
    return a / b if b else float("nan")


def score_edges(truth_edges: Iterable[Hashable], negatives: Iterable[Hashable], scores: Mapping[Hashable, float],
                threshold: float | None = None) -> dict:
    """Score one edge detector. ``truth_edges`` are the positives, ``negatives`` the other edges
    it should have rejected (a key in both is a positive); ``scores`` maps edges to the detector's
    value, and an edge it has no value for gets ``-inf`` (counted in ``n_unscored_*``). Returns
    counts and ``roc_auc``; with ``threshold``, also ``tp, fp, fn, tn, precision, recall`` of
    ``score >= threshold`` (precision NaN when nothing is predicted)."""
    positives = set(truth_edges)
    negatives = set(negatives) - positives
    keys = [*sorted(positives, key=repr), *sorted(negatives, key=repr)]
    values = [float(scores.get(key, -math.inf)) for key in keys]
    labels = [True] * len(positives) + [False] * len(negatives)
    out = {
        "n_pos": len(positives), "n_neg": len(negatives),
        "n_unscored_pos": sum(key not in scores for key in positives),
        "n_unscored_neg": sum(key not in scores for key in negatives),
        "roc_auc": roc_auc(labels, values),
    }
    if threshold is not None:
        hit = [v >= threshold for v in values]
        tp = sum(h and y for h, y in zip(hit, labels))
        fp = sum(h and not y for h, y in zip(hit, labels))
        fn, tn = len(positives) - tp, len(negatives) - fp
        out.update(tp=tp, fp=fp, fn=fn, tn=tn, precision=_ratio(tp, tp + fp), recall=_ratio(tp, tp + fn))
    return out


def score_kinds(truth: Mapping[tuple[int, int], str | None], rows: Iterable[HeadRow]) -> dict[str, dict]:
    """Per kind of :data:`SCORED_KINDS`: precision/recall of the atlas label and ROC-AUC of its
    score, over the heads whose ``truth`` is not None."""
    rows = [row for row in rows if truth.get((row.layer, row.head)) is not None]
    out = {}
    for kind, score in KIND_SCORES.items():
        labels = [truth[(row.layer, row.head)] == kind for row in rows]
        hit = [row.kind == kind for row in rows]
        tp = sum(h and y for h, y in zip(hit, labels))
        fp, fn = sum(h and not y for h, y in zip(hit, labels)), sum(y and not h for h, y in zip(hit, labels))
        out[kind] = {"n_pos": sum(labels), "n_neg": len(labels) - sum(labels), "tp": tp, "fp": fp, "fn": fn,
                     "precision": _ratio(tp, tp + fp), "recall": _ratio(tp, tp + fn),
                     "roc_auc": roc_auc(labels, [score(row) for row in rows]),
                     "mislabelled": [[row.layer, row.head, truth[(row.layer, row.head)], row.kind]
                                     for row, h, y in zip(rows, hit, labels) if h != y]}
    return out


def _composes_score(row: EdgeRow) -> float:
    """The composes line as a number: the largest effect over its bar (the null's 95th percentile
    or the floor, whichever is higher) across the query sets; ≥ 1 when it passes."""
    lines = [line for line in (row.composes_patch, row.composes_prefix) if line is not None]
    return max(line["effect"] / max(line["null_q95"], line["floor"]) for line in lines)


def edge_scores(result: CompositionResult) -> dict[str, dict[EdgeKey, float]]:
    """Detector name -> ``{edge: value}`` over every edge of the model (module docstring)."""
    out: dict[str, dict[EdgeKey, float]] = {name: {} for name in EDGE_DETECTORS}
    for row in result.candidates:
        key = edge_key(row)
        out["verdict"][key] = float(row.verdict == "supported")
        out["composes"][key] = _composes_score(row)
        out["weight_z"][key] = row.weight_z
        if row.attribution is not None:
            out["attribution"][key] = row.attribution
        if row.matters is not None:
            out["task_effect"][key] = row.matters["effect"]
    return out


def noise_images(member: FamilyMember, n: int, seed: int = 0) -> torch.Tensor:
    """``[n, 3, H, W]`` seeded standard-normal pixels."""
    return torch.randn(n, 3, *member.model.cfg.img_size, generator=torch.Generator().manual_seed(seed))


def run_member(member: FamilyMember, n_images: int = 16, batch_size: int = 8, n_boot: int = 10,
               compose: ComposeConfig = ComposeConfig()) -> dict:
    """Atlas and composition stage on ``n_images`` noise images; kind and edge scores."""
    images = noise_images(member, n_images)
    t0 = time.perf_counter()
    atlas_config = AtlasConfig(n_boot=n_boot)
    acc = new_accumulator(member.model, atlas_config)
    for start in range(0, n_images, batch_size):
        accumulate(member.model, acc, images[start : start + batch_size], list(range(start, min(start + batch_size, n_images))))
    atlas: HeadAtlas = build_atlas(member.model, acc, atlas_config, f"family-{member.config.seed}")
    t1 = time.perf_counter()
    result = run_composition(member.model, lambda: (images[i : i + batch_size] for i in range(0, n_images, batch_size)), atlas, compose)
    t2 = time.perf_counter()
    truth = {(layer, head): member.kind_truth(layer, head) for layer in range(member.model.cfg.n_layers) for head in range(member.model.cfg.n_heads)}
    detectors = edge_scores(result)
    population = detectors["verdict"].keys()
    positives = {(*edge, kind) for edge, kind in member.edges.items()}
    edges = {name: score_edges(positives, population, values, threshold=0.5 if name == "verdict" else None) for name, values in detectors.items()}
    verdicts = {edge_key(row): row.verdict for row in result.candidates}
    cfg = member.config
    return {
        "seed": cfg.seed, "grid": list(cfg.grid), "n_layers": cfg.n_layers, "n_heads": member.model.cfg.n_heads, "sender_layer": cfg.sender_layer,
        "class_token": cfg.class_token, "registers": cfg.registers, "n_images": n_images,
        "edges": [[*edge, kind] for edge, kind in member.edges.items()],
        "decoy_verdicts": [[*edge, kind, verdicts[(*edge, kind)]] for edge, kind in member.decoy_edges.items()],
        "kinds": score_kinds(truth, atlas.rows), "edge_detectors": edges,
        "seconds": {"atlas": t1 - t0, "compose": t2 - t1},
    }


SHAPES = {
    "small": [
        dict(grid=(4, 4), n_layers=2, n_heads=6, cls_edges=("k",)),
        dict(grid=(4, 5), n_layers=3, n_heads=7, sender_layer=1, class_token=False, registers=1, edges=("k",), inert_decoys=("q",), heads_kept=2),
        dict(grid=(5, 4), n_layers=3, n_heads=8, registers=1, n_directional=3, inert_decoys=("k", "q", "v"), local_decoys=2, silent_fillers=True),
    ],
    "full": [
        dict(grid=(8, 8), n_layers=2, n_heads=6, cls_edges=("k",)),
        dict(grid=(6, 9), n_layers=3, n_heads=7, sender_layer=1, class_token=False, registers=2),
        dict(grid=(4, 4), n_layers=2, n_heads=6, inert_decoys=("q",)),
        dict(grid=(7, 5), n_layers=4, n_heads=8, sender_layer=2, registers=1, inert_decoys=("k", "q", "v"), local_decoys=2, silent_fillers=True),
        dict(grid=(5, 8), n_layers=3, n_heads=8, class_token=False, registers=1, n_directional=3, edges=("k", "v"), inert_decoys=("q", "v")),
        dict(grid=(10, 10), n_layers=2, n_heads=7, n_directional=3, cls_edges=("k",)),
        dict(grid=(6, 6), n_layers=4, n_heads=9, sender_layer=1, n_directional=4, inert_decoys=("k", "q", "v"), local_decoys=2),
        dict(grid=(9, 7), n_layers=3, n_heads=7, sender_layer=1, registers=2, edges=("q",), inert_decoys=("v",), heads_kept=2),
    ],
}
"""Member shapes, cycled; member ``i`` gets seed ``i``."""


def benchmark_configs(n_models: int, small: bool = False) -> list[FamilyConfig]:
    shapes = SHAPES["small" if small else "full"]
    return [FamilyConfig(**shapes[i % len(shapes)], seed=i) for i in range(n_models)]


def _pool(counts: list[dict], keys=("tp", "fp", "fn")) -> dict:
    total = {key: sum(c[key] for c in counts) for key in keys}
    return {**total, "precision": _ratio(total["tp"], total["tp"] + total["fp"]), "recall": _ratio(total["tp"], total["tp"] + total["fn"])}


def _auc_stats(values: list[float]) -> dict:
    finite = [v for v in values if not math.isnan(v)]
    return {"auc_min": min(finite) if finite else float("nan"), "auc_mean": float(np.mean(finite)) if finite else float("nan")}


def run_benchmark(configs: list[FamilyConfig], n_images: int = 16, batch_size: int = 8, n_boot: int = 10,
                  log: Callable[[str], None] | None = None) -> dict:
    """:func:`run_member` on every config; per-member results plus pooled counts and AUC min/mean."""
    members = []
    for config in configs:
        t0 = time.perf_counter()
        member = build_family_member(config)
        built = time.perf_counter()
        result = run_member(member, n_images, batch_size, n_boot)
        result["seconds"]["build"] = built - t0
        result["seconds"]["total"] = time.perf_counter() - t0
        members.append(result)
        if log:
            log(f"member seed={config.seed} grid={config.grid} L={config.n_layers} H={config.n_heads}: {result['seconds']['total']:.1f} s")
    kinds = {kind: {**_pool([m["kinds"][kind] for m in members]), "n_pos": sum(m["kinds"][kind]["n_pos"] for m in members),
                    **_auc_stats([m["kinds"][kind]["roc_auc"] for m in members])} for kind in SCORED_KINDS}
    edges = {}
    for name in EDGE_DETECTORS:
        per = [m["edge_detectors"][name] for m in members]
        edges[name] = {"n_pos": sum(p["n_pos"] for p in per), "n_neg": sum(p["n_neg"] for p in per),
                       "n_unscored_pos": sum(p["n_unscored_pos"] for p in per), **_auc_stats([p["roc_auc"] for p in per])}
        if name == "verdict":
            edges[name].update(_pool(per))
    return {"n_models": len(members), "n_images": n_images, "kinds": kinds, "edges": edges, "members": members,
            "seconds": sum(m["seconds"]["total"] for m in members)}


def format_report(summary: dict) -> str:
    """Plain-text tables of a :func:`run_benchmark` summary."""
    f = lambda v: "  nan" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:5.3f}"  # noqa: E731
    lines = [f"Head kinds ({summary['n_models']} models, pooled counts; AUC min/mean over models)",
             f"{'kind':<12}{'pos':>5}{'TP':>5}{'FP':>5}{'FN':>5}{'prec':>7}{'recall':>7}{'AUCmin':>8}{'AUCmean':>8}"]
    for kind, k in summary["kinds"].items():
        lines.append(f"{kind:<12}{k['n_pos']:>5}{k['tp']:>5}{k['fp']:>5}{k['fn']:>5}{f(k['precision']):>7}{f(k['recall']):>7}"
                     f"{f(k['auc_min']):>8}{f(k['auc_mean']):>8}")
    lines += ["", "Edges (positives: planted causal edges; decoys are negatives)",
              f"{'detector':<22}{'population':<22}{'pos':>5}{'neg':>6}{'prec':>7}{'recall':>7}{'AUCmin':>8}{'AUCmean':>8}"]
    for name, e in summary["edges"].items():
        population = "all edges"
        lines.append(f"{name:<22}{population:<22}{e['n_pos']:>5}{e['n_neg']:>6}{f(e.get('precision')):>7}{f(e.get('recall')):>7}"
                     f"{f(e['auc_min']):>8}{f(e['auc_mean']):>8}")
    lines += ["", "Members (kinds P/R pooled over the 4 kinds; decoys: supported / planted; AUC of weight_z / attribution / composes)",
              f"{'seed':>4} {'grid':<6}{'L':>2}{'H':>3}{'snd':>4}{'cls':>4}{'reg':>4}  {'kinds P/R':<12}{'verdict TP/FP/FN':<18}"
              f"{'decoys':<8}{'AUC w/att/cmp':<16}{'sec':>6}"]
    for m in summary["members"]:
        kp = _pool(list(m["kinds"].values()))
        v = m["edge_detectors"]["verdict"]
        kinds = f"{f(kp['precision'])}/{f(kp['recall'])}"
        verdict = f"{v['tp']}/{v['fp']}/{v['fn']}"
        decoys = f"{sum(d[-1] == 'supported' for d in m['decoy_verdicts'])}/{len(m['decoy_verdicts'])}"
        aucs = "/".join(f"{m['edge_detectors'][n]['roc_auc']:.2f}" for n in ("weight_z", "attribution", "composes"))
        grid = "x".join(map(str, m["grid"]))
        lines.append(f"{m['seed']:>4} {grid:<6}{m['n_layers']:>2}{m['n_heads']:>3}{m['sender_layer']:>4}{int(m['class_token']):>4}{m['registers']:>4}  "
                     f"{kinds:<12}{verdict:<18}{decoys:<8}{aucs:<16}{m['seconds']['total']:>6.1f}")
    return "\n".join(lines)
