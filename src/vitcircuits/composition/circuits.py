"""Candidate circuits and their verdicts, from weight scores and path-patching effects.

A candidate is one sender head (modular or directional, from the head atlas) → one later
receiver head, through one input (q, k or v). Its evidence:

- ``weight_z``: the weight-based composition score's z against random heads of the same shapes;
- ``weight_z_within``: its z against the other heads of the sender's layer into the same receiver
  (trained weights are anisotropic, so every pair of a trained model can beat random heads);
- ``patch_effect``: the path-patching effect through that input alone (JS divergence of the
  receiver's attention for q/k, relative change of its output for v), averaged over images;
- ``patch_z``: that effect against the *control senders*, the other heads of the sender's layer,
  patched into the same receiver through the same input (mean and std over them);
- ``shuffle_effect``: the same effect on patch-shuffled images, and ``attention_kept``: the
  total-variation similarity of the receiver's mean offset kernel on shuffled vs clean images;
- ``task_margin_drop`` (classifiers): how much the model's margin for its own prediction drops with
  this one edge ablated (:mod:`~vitcircuits.composition.task_patching`). It is reported beside the
  verdict, not part of it: the verdict is about composition, this about what the output uses.

Verdicts (:class:`VerdictCriteria`):
- ``supported``: the weights (weight_z ≥ 3 and weight_z_within ≥ 2) **and** the causal test
  (patch_z ≥ 3 and patch_effect ≥ the effect floor) agree, each beyond its baselines;
- ``weak``: exactly one of the two is beyond its baselines;
- ``none``: neither.

Reading of the shuffle control, stated beside every verdict: ``positional`` when the receiver
keeps its attention under shuffling (attention_kept ≥ 0.8) — its attention follows position, so
what it moves on shuffled images is unrelated content; ``content-matching`` when it does not.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

EFFECT_OF_KIND = {"q": "patch_js", "k": "patch_js", "v": "patch_rel_out"}


@dataclass(frozen=True)
class VerdictCriteria:
    """Thresholds of the verdicts (documented in the module docstring)."""

    weight_z: float = 3.0
    """Weight-score z against random heads."""
    weight_z_within: float = 2.0
    """Weight-score z against the sender's layer-mates into the same receiver."""
    patch_z: float = 3.0
    """Path-patching effect z against the control senders."""
    min_js: float = 0.005
    """Smallest JS divergence (nats) that counts as an attention change."""
    min_rel_out: float = 0.05
    """Smallest relative output change that counts for V-composition."""
    attention_kept: float = 0.8
    """Kernel similarity under shuffling above which a receiver's attention is positional."""


def _floor(kind: str, criteria: VerdictCriteria) -> float:
    return criteria.min_rel_out if kind == "v" else criteria.min_js


def verdict(weight_z: float, weight_z_within: float, patch_z: float, effect: float, kind: str, criteria: VerdictCriteria) -> str:
    weight_ok = weight_z >= criteria.weight_z and weight_z_within >= criteria.weight_z_within
    causal_ok = patch_z >= criteria.patch_z and effect >= _floor(kind, criteria)
    if weight_ok and causal_ok:
        return "supported"
    if weight_ok or causal_ok:
        return "weak"
    return "none"


def control_stats(effects_SP: dict[tuple[int, int], np.ndarray], sender: tuple[int, int], controls: list[tuple[int, int]]) -> tuple[float, float]:
    """Mean and std of an effect array over control senders (std floored to avoid division by 0)."""
    values = np.array([effects_SP[c] for c in controls if c != sender])
    if values.size == 0:
        return 0.0, 1e-6
    return float(values.mean()), float(max(values.std(ddof=1) if values.size > 1 else 0.0, 1e-6))


def build_circuits(candidates: list[dict], criteria: VerdictCriteria) -> list[dict]:
    """Group candidate rows (one per sender → receiver → kind with all evidence) into circuits
    with a verdict; receivers of the same sender and kind stay separate circuits."""
    circuits = []
    for row in candidates:
        kind = row["kind"]
        v = verdict(row["weight_z"], row["weight_z_within"], row["patch_z"], row["patch_effect"], kind, criteria)
        reading = "positional" if row["attention_kept"] >= criteria.attention_kept else "content-matching"
        circuits.append({
            "senders": [[row["sender_layer"], row["sender_head"]]],
            "sender_kinds": [row["sender_kind"]],
            "receivers": [[row["receiver_layer"], row["receiver_head"]]],
            "kind": kind,
            "verdict": v,
            "shuffle_reading": reading,
            "evidence": {
                "weight_score": {"value": row["weight_score"], "baseline_mean": row["baseline_mean"], "baseline_std": row["baseline_std"], "z": row["weight_z"],
                                 "z_within_layer": row["weight_z_within"]},
                "patch_effect": {"metric": EFFECT_OF_KIND[kind], "value": row["patch_effect"], "control_mean": row["control_mean"],
                                 "control_std": row["control_std"], "z": row["patch_z"], "ablation": row["ablation"]},
                "shuffle": {"effect": row["shuffle_effect"], "effect_retained": row["shuffle_effect"] / max(row["patch_effect"], 1e-12),
                            "attention_kept": row["attention_kept"]},
                "task_margin_drop": row.get("task_effect"),
            },
            "criteria": asdict(criteria),
        })
    order = {"supported": 0, "weak": 1, "none": 2}
    return sorted(circuits, key=lambda c: (order[c["verdict"]], -c["evidence"]["patch_effect"]["z"]))
