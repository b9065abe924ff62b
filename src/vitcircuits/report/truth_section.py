"""The report's comparison of the run's circuit verdicts with known causal edges (``truth.json``).

``truth.json`` (written by ``vitcircuits hunt --truth FILE``, e.g. the measured edges that ship
with the shapes organism) lists ``sender → receiver → input`` edges with their task effect and
whether they count as causal (:func:`vitcircuits.testing.organism_benchmark.truth_document`).
"""
from __future__ import annotations

import json

from vitcircuits.report import html
from vitcircuits.runs import Run


def _edge(e: list) -> str:
    sl, sh, rl, rh, kind = e
    return f"L{sl}H{sh} → L{rl}H{rh} {kind.upper()}"


def compare(truth: dict, circuits: list[dict]) -> dict:
    """Counts of ``supported`` verdicts against the causal edges, and one row per candidate circuit
    and per causal edge that is not a candidate."""
    effect = {tuple(row["edge"]): row for row in truth["edges"]}
    causal = {edge for edge, row in effect.items() if row["causal"]}
    verdicts = {(*c["senders"][0], *c["receivers"][0], c["kind"]): c["verdict"] for c in circuits}
    supported = {edge for edge, verdict in verdicts.items() if verdict == "supported"}
    rows = [{"edge": list(edge), "verdict": verdict, "effect": effect.get(edge, {}).get("margin_drop"), "causal": edge in causal}
            for edge, verdict in verdicts.items()]
    rows += [{"edge": list(edge), "verdict": "not a candidate", "effect": effect[edge]["margin_drop"], "causal": True}
             for edge in sorted(causal - verdicts.keys())]
    rows.sort(key=lambda r: -(r["effect"] or 0.0))
    tp = len(supported & causal)
    return {"tp": tp, "fp": len(supported - causal), "fn": len(causal - supported), "n_causal": len(causal), "rows": rows}


def truth_section(run: Run) -> str:
    truth = json.loads(run.file("truth.json").read_text())
    circuits = json.loads(run.file("composition/circuits.json").read_text())["circuits"]
    result = compare(truth, circuits)
    intro = (f"Known causal edges ({truth['source']}): {result['n_causal']} edges whose path ablation alone lowers the true "
             f"class's logit margin by at least {truth['threshold']} ({truth['images']}). "
             f"Of the run's 'supported' circuits, {result['tp']} are causal edges and {result['fp']} are not; "
             f"{result['fn']} causal edges are not supported.")
    rows = [(_edge(r["edge"]), r["verdict"], "n/a" if r["effect"] is None else f"{r['effect']:.3f}", "causal" if r["causal"] else "not causal")
            for r in result["rows"]]
    table = html.table(rows, ("edge", "run's verdict", "task effect (margin drop)", "truth"))
    return html.section("Verdicts against the ground truth", html.paragraph(intro) + table, "truth")
