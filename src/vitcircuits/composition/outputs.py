"""Writing the composition stage: ``composition.csv``, ``circuits.json`` and figures."""
from __future__ import annotations

import csv
import io
from pathlib import Path

from vitcircuits.composition.circuits import EFFECT_OF_KIND
from vitcircuits.composition.figures import plot_circuit_graph, plot_patch_heatmaps, plot_weight_heatmaps
from vitcircuits.composition.patching import PATHS
from vitcircuits.composition.scan import CompositionResult
from vitcircuits.composition.transfer import plot_receptive_field
from vitcircuits.composition.weights import COMPOSITION_COLUMNS
from vitcircuits.runs import write_json, write_text

CAUSAL_COLUMNS = ("attribution", "patch_metric", "patch_effect", "patch_z", "shuffle_effect", "attention_kept", "ablation", "task_effect")


def write_composition(folder: Path, result: CompositionResult, n_layers: int, n_heads: int) -> list[tuple[Path, str]]:
    """Write the tables and figures into ``folder``; return (figure path, caption) pairs."""
    causal = {(c["sender_layer"], c["sender_head"], c["receiver_layer"], c["receiver_head"], c["kind"]): c for c in result.candidates}
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COMPOSITION_COLUMNS + CAUSAL_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for row in result.scores.rows():
        key = (row["sender_layer"], row["sender_head"], row["receiver_layer"], row["receiver_head"], row["kind"])
        if result.attribution is not None and row["kind"] in PATHS:
            row["attribution"] = float(result.attribution[key[0], key[1], PATHS.index(row["kind"]), key[2], key[3]])
        if key in causal:
            row = {**row, **causal[key], "patch_metric": EFFECT_OF_KIND[row["kind"]]}
        if key in result.task_effects:
            row["task_effect"] = result.task_effects[key]["margin_drop"]
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    write_text(folder / "composition.csv", buf.getvalue())
    write_json(folder / "circuits.json", {
        "senders": [{"layer": layer, "head": head, "kind": kind} for layer, head, kind in result.senders],
        "ablation": result.candidates[0]["ablation"] if result.candidates else None,
        "circuits": result.circuits,
        "attribution": result.attribution_agreement,
        "task_patching": _task_summary(result),
        "transfer": {name: {"layers": r.layer_names, "offsets": [list(o) for o in r.offsets], "r2": r.r2_LO.tolist(),
                            "ring_r2": r.ring_r2_LR().tolist(), "n_test_images": r.n_test_images}
                     for name, r in result.transfer.items()},
    })
    figures = [(plot_weight_heatmaps(result, folder / "weight_heatmaps.png"),
                "Weight-based composition z-scores (sender rows × receiver columns) per kind, against random heads.")]
    if result.circuits:
        figures += [
            (plot_patch_heatmaps(result, folder / "patch_heatmaps.png"),
             f"Path-patching effects of every head in the sender layers ({result.candidates[0]['ablation']} ablation) on every later head."),
            (plot_circuit_graph(result, folder / "circuit_graph.png", n_layers, n_heads),
             "Circuit graph: supported (solid) and weak (dashed) candidates, coloured by kind, width by path-patching z."),
        ]
    if result.transfer:
        figures.append((plot_receptive_field(result.transfer, folder / "receptive_field.png"),
                        "Neighbour → centre transfer: held-out R² of ridge probes predicting a neighbour's patch embedding "
                        "from the centre token's residual, by layer and distance; dashed: with heads ablated."))
    return figures


def _task_summary(result: CompositionResult, n_top: int = 10) -> dict:
    """The edges whose ablation lowers the model's margin most (``circuits.json["task_patching"]``)."""
    ranked = sorted(result.task_effects.items(), key=lambda item: -item[1]["margin_drop"])
    return {"n_edges": len(ranked), "metric": "drop of the clean prediction's logit margin with the one edge mean-ablated",
            "strongest": [{"sender": [sl, sh], "receiver": [rl, rh], "kind": kind, **effect} for (sl, sh, rl, rh, kind), effect in ranked[:n_top]]}
