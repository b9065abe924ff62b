"""Verdicts for every edge ``sender → receiver → q/k/v``, from three lines of evidence.

- **composes** — the receiver reads the sender. Path patching the sender's mean-ablated output into
  the receiver's one input changes the receiver beyond the null (:mod:`~vitcircuits.composition.evidence`):
  the Jensen–Shannon divergence of its attention rows for q/k, the relative change of its output
  for v. It is measured separately at patch queries and at prefix queries (class token, registers,
  distillation token), each against its own null; the edge composes when either passes, and
  ``read_at`` says where. A classifier reads its decision at the class token, a dense backbone at
  the patches: the verdict uses whichever the model reads.
- **matters** — the output uses the edge. Task-level path patching of that one edge lowers the
  task metric (:mod:`~vitcircuits.composition.task_metric`: the logit margin of the model's own
  prediction, a probe's margin, or the move of the embedding) beyond the null.
  Edges are picked for this exact check by task-grounded edge attribution over every edge
  (:mod:`~vitcircuits.composition.edge_attribution`); an edge below the cut has ``matters`` None.
- **weights** — corroboration, reported and never a gate: the weight composition score's z
  against random heads, and its percentile among the earlier heads into the same receiver.

Verdict: ``supported`` = composes **and** matters; ``weak`` = exactly one of the two (an edge
that composes but was not checked for mattering is weak); ``none`` = neither. Why both: a pair can
compose strongly in a way the output never uses (a receiver whose attention moves but whose
output nobody reads), and ablating an edge can move the output through a change the receiver's
attention metric does not see. Only the conjunction says "these heads compose, and the model uses
it".

An edge whose sender has a zero OV circuit, or whose receiver's circuit of that kind is zero, is
``silent`` (:attr:`~vitcircuits.composition.weights.CompositionScores.silent`): its weight score
and effects are 0, and it is never supported.

Shuffle reading, stated beside every verdict: ``positional`` when the receiver keeps its
attention under patch shuffling (``attention_kept`` ≥ 0.8), ``content-matching`` when it does not.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from vitcircuits.composition.patching import VERDICT_METRIC

EFFECT_OF_KIND = {kind: f"patch_{metric}" for kind, metric in VERDICT_METRIC.items()}
VERDICTS = ("supported", "weak", "none")


@dataclass(frozen=True)
class VerdictCriteria:
    """Practical floors of the verdicts (documented in the module docstring)."""

    min_js: float = 0.005
    """Smallest JS divergence (nats, mean over queries) that counts as an attention change."""
    min_rel_out: float = 0.05
    """Smallest relative output change that counts for V-composition."""
    attention_kept: float = 0.8
    """Kernel similarity under shuffling above which a receiver's attention is positional."""

    def composes_floor(self, kind: str) -> float:
        return self.min_rel_out if kind == "v" else self.min_js


def verdict(composes: bool, matters: bool | None) -> str:
    """``supported``, ``weak`` or ``none`` (module docstring)."""
    if composes and matters:
        return "supported"
    return "weak" if composes or matters else "none"


@dataclass
class EdgeRow:
    """Every line of evidence of one edge ``sender → receiver → input`` and its verdict
    (:func:`~vitcircuits.composition.edges.edge_rows`); the evidence lines are
    :meth:`~vitcircuits.composition.evidence.Line.as_dict` documents."""

    sender_layer: int
    sender_head: int
    sender_kind: str
    """The sender's atlas kind (a label only)."""
    receiver_layer: int
    receiver_head: int
    kind: str
    """The receiver's input: ``q``, ``k`` or ``v``."""
    verdict: str
    silent: bool
    read_at: list[str]
    """The query sets at which the edge composes (``patch``, ``prefix``)."""
    composes_patch: dict
    composes_prefix: dict | None
    """None for a model without prefix tokens."""
    ablation: str
    matters: dict | None
    """None for an edge not checked exactly."""
    attribution: float | None
    weight_score: float
    baseline_mean: float
    baseline_std: float
    weight_z: float
    weight_percentile: float | None
    shuffle_effect: float
    attention_kept: float


def edge_key(row: EdgeRow) -> tuple[int, int, int, int, str]:
    return row.sender_layer, row.sender_head, row.receiver_layer, row.receiver_head, row.kind


def build_circuits(rows: list[EdgeRow], criteria: VerdictCriteria) -> list[dict]:
    """One circuit per edge row that is supported, weak or was checked exactly, with its
    evidence; sorted by verdict, then by the drop of the task metric."""
    circuits = []
    for row in rows:
        if row.verdict == "none" and row.matters is None:
            continue
        circuits.append({
            "senders": [[row.sender_layer, row.sender_head]],
            "sender_kinds": [row.sender_kind],
            "receivers": [[row.receiver_layer, row.receiver_head]],
            "kind": row.kind,
            "verdict": row.verdict,
            "silent": row.silent,
            "read_at": row.read_at,
            "shuffle_reading": "positional" if row.attention_kept >= criteria.attention_kept else "content-matching",
            "evidence": {
                "composes": {"metric": EFFECT_OF_KIND[row.kind], "patch": row.composes_patch, "prefix": row.composes_prefix,
                             "ablation": row.ablation},
                "matters": row.matters,
                "attribution": row.attribution,
                "weights": {"value": row.weight_score, "baseline_mean": row.baseline_mean, "baseline_std": row.baseline_std,
                            "z": row.weight_z, "percentile_earlier": row.weight_percentile},
                "shuffle": {"effect": row.shuffle_effect, "attention_kept": row.attention_kept},
            },
            "criteria": asdict(criteria),
        })
    order = {v: i for i, v in enumerate(VERDICTS)}
    drop = lambda c: c["evidence"]["matters"]["effect"] if c["evidence"]["matters"] else float("-inf")  # noqa: E731
    return sorted(circuits, key=lambda c: (order[c["verdict"]], -drop(c)))
