"""The report's comparison of the run's circuit verdicts with known causal edges (``truth.json``).

``truth.json`` (written by ``vitcircuits hunt --truth FILE``, e.g. the measured edges that ship
with the shapes organism) lists ``sender → receiver → input`` edges with their task effect and
whether they count as causal (:func:`vitcircuits.groundtruth.organism_benchmark.truth_document`).
"""
from __future__ import annotations

from vitcircuits.files import read_json
from vitcircuits.layout import LAYOUT
from vitcircuits.report import html
from vitcircuits.report.summary import number
from vitcircuits.runs import Run


def _edge(e: list) -> str:
    sl, sh, rl, rh, kind = e
    return f"L{sl}H{sh} → L{rl}H{rh} {kind.upper()}"


def compare(truth: dict, circuits: list[dict]) -> dict:
    """Counts of ``supported`` verdicts against the causal edges, and one row per causal edge and
    per supported or weak edge (with the truth's and the run's own task effect). ``circuits`` lists
    every edge that is supported, weak or was checked exactly: any other edge's verdict is none."""
    effect = {tuple(row["edge"]): row for row in truth["edges"]}
    causal = {edge for edge, row in effect.items() if row["causal"]}
    by_edge = {(*c["senders"][0], *c["receivers"][0], c["kind"]): c for c in circuits}
    supported = {edge for edge, c in by_edge.items() if c["verdict"] == "supported"}
    shown = causal | {edge for edge, c in by_edge.items() if c["verdict"] != "none"}
    matters = {edge: c["evidence"]["matters"] or {} for edge, c in by_edge.items()}
    rows = [{"edge": list(edge), "verdict": by_edge[edge]["verdict"] if edge in by_edge else "none (not checked)",
             "effect": effect.get(edge, {}).get("margin_drop"), "causal": edge in causal,
             "run_effect": matters.get(edge, {}).get("effect")} for edge in shown]
    rows.sort(key=lambda r: -(r["effect"] or 0.0))
    tp = len(supported & causal)
    return {"tp": tp, "fp": len(supported - causal), "fn": len(causal - supported), "n_causal": len(causal), "rows": rows}


def truth_section(run: Run) -> str:
    truth = read_json(run.file(LAYOUT.truth))
    circuits = read_json(run.file(LAYOUT.circuits))["circuits"]
    result = compare(truth, circuits)
    intro = (f"Known causal edges ({truth['source']}): {result['n_causal']} edges whose path ablation alone lowers the true "
             f"class's logit margin by at least {truth['threshold']} ({truth['images']}). "
             f"Of the run's 'supported' circuits, {result['tp']} are causal edges and {result['fp']} are not; "
             f"{result['fn']} causal edges are not supported. The last column is this run's own task-level path patching "
             "(the drop of its task metric with the one edge ablated, the 'matters' line of the composition section; n/a where the "
             "edge was not checked exactly), which needs no truth. Rows: every causal edge and every supported or weak edge.")
    rows = [(_edge(r["edge"]), r["verdict"], "causal" if r["causal"] else "not causal", number(r["effect"]), number(r["run_effect"]))
            for r in result["rows"]]
    table = html.table(rows, ("edge", "run's verdict", "truth", "true task effect (margin drop)", "run's task effect"))
    return html.section("Verdicts against the ground truth", html.paragraph(intro) + table, "truth")
