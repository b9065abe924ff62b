"""The ``composition`` stage: a verdict for every edge (:func:`~vitcircuits.composition.scan.run_composition`),
written as ``composition.csv``, ``circuits.json`` and figures."""
from __future__ import annotations

import csv
import io
from pathlib import Path

import torch

from vitcircuits.composition.circuits import EFFECT_OF_KIND, VERDICTS, EdgeRow, edge_key
from vitcircuits.composition.config import ComposeConfig
from vitcircuits.composition.figures import plot_circuit_graph, plot_patch_heatmaps, plot_weight_heatmaps
from vitcircuits.composition.necessity import LabelledBatches
from vitcircuits.composition.scan import CompositionResult, run_composition
from vitcircuits.composition.task_metric import TaskMetric, fit_probe
from vitcircuits.composition.transfer import plot_receptive_field
from vitcircuits.composition.weights import COMPOSITION_COLUMNS
from vitcircuits.files import read_json, write_json, write_text
from vitcircuits.heads.atlas import HeadAtlas
from vitcircuits.inputs import ImageSet
from vitcircuits.layout import LAYOUT
from vitcircuits.models.loading import LoadedModel
from vitcircuits.runs import Run


def run_compose(run: Run, loaded: LoadedModel, images: ImageSet, config: ComposeConfig, atlas_from: Path | None = None) -> None:
    """Weight scores, path patching, edge attribution and task-level checks, shuffle control and a
    verdict for every edge, labelled by the atlas of this run (or of the run ``atlas_from``)."""
    atlas = HeadAtlas.load((atlas_from or run.path) / LAYOUT.heads)
    probe = fit_image_probe(loaded, images) if config.task_metric == "probe" else None
    result = run_composition(loaded.model, lambda: (b.images_BCHW for b in images.batches()), atlas, config, probe, progress=True,
                             engine=images.engine)
    cfg = loaded.model.cfg
    figures = write_composition(run.file(LAYOUT.composition), result, cfg.n_layers, cfg.n_heads)
    write_json(run.file(LAYOUT.composition_figures), [(str(p.relative_to(run.path)), c) for p, c in figures])
    counts = {v: sum(row.verdict == v for row in result.candidates) for v in VERDICTS}
    run.write_manifest(composition={"verdicts": counts, "ablation": config.patching.ablation})


@torch.no_grad()
def fit_image_probe(loaded: LoadedModel, images: ImageSet) -> TaskMetric:
    """A linear probe on the model's pooled output over the labelled images (one pass)."""
    features, labels = [], []
    for images_BCHW, labels_B in LabelledBatches(images.batches()):
        features.append(loaded.model(images_BCHW).float().cpu())
        labels.append(labels_B.cpu())
    if not labels:
        raise ValueError(f"--task-metric probe needs labelled images; {images.source.spec} has none")
    labels_B = torch.cat(labels)
    return fit_probe(torch.cat(features), labels_B, int(labels_B.max()) + 1)


def read_circuits(root: Path) -> list[dict]:
    """The circuits of the run at ``root`` (a ``compose`` or ``hunt`` run)."""
    path = root / LAYOUT.circuits
    if not path.is_file():
        raise FileNotFoundError(f"{root}: no {LAYOUT.circuits} (expected a `vitcircuits compose` or `hunt` run)")
    return read_json(path)["circuits"]

EDGE_COLUMNS = (
    "verdict", "composes", "read_at", "patch_metric", "patch_effect", "patch_lo", "patch_hi", "patch_null_q95", "patch_z",
    "prefix_effect", "prefix_lo", "prefix_hi", "prefix_null_q95", "prefix_z", "matters", "task_drop", "task_lo", "task_hi",
    "task_null_q95", "task_z", "task_floor", "attribution", "weight_percentile", "shuffle_effect", "attention_kept", "ablation",
)
"""Columns of ``composition.csv`` beside the weight scores, on the q/k/v rows (empty where not measured)."""


def _edge_columns(row: EdgeRow) -> dict:
    flat = {"verdict": row.verdict, "composes": bool(row.read_at), "read_at": "+".join(row.read_at),
            "patch_metric": EFFECT_OF_KIND[row.kind], "attribution": row.attribution, "weight_percentile": row.weight_percentile,
            "shuffle_effect": row.shuffle_effect, "attention_kept": row.attention_kept, "ablation": row.ablation}
    for prefix, line in (("patch", row.composes_patch), ("prefix", row.composes_prefix), ("task", row.matters)):
        if line is not None:
            flat.update({f"{prefix}_{'drop' if prefix == 'task' else 'effect'}": line["effect"], f"{prefix}_lo": line["lo"],
                         f"{prefix}_hi": line["hi"], f"{prefix}_null_q95": line["null_q95"], f"{prefix}_z": line["z"]})
    if row.matters is not None:
        flat.update(matters=row.matters["beyond"], task_floor=row.matters["floor"])
    return flat


def write_composition(folder: Path, result: CompositionResult, n_layers: int, n_heads: int) -> list[tuple[Path, str]]:
    """Write the tables and figures into ``folder``; return (figure path, caption) pairs."""
    edges = {edge_key(row): row for row in result.candidates}
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COMPOSITION_COLUMNS + EDGE_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for row in result.scores.rows():
        key = (row["sender_layer"], row["sender_head"], row["receiver_layer"], row["receiver_head"], row["kind"])
        if key in edges:
            row = {**row, **_edge_columns(edges[key])}
        writer.writerow({k: _cell(v) for k, v in row.items()})
    write_text(folder / Path(LAYOUT.composition_csv).name, buf.getvalue())
    counts = {v: sum(row.verdict == v for row in result.candidates) for v in VERDICTS}
    write_json(folder / Path(LAYOUT.circuits).name, {
        "senders": [{"layer": layer, "head": head, "kind": kind} for layer, head, kind in result.senders],
        "ablation": result.candidates[0].ablation if result.candidates else None,
        "n_edges": len(result.candidates),
        "verdicts": counts,
        "rule": "supported = composes (receiver reads the sender beyond its null, at patch or prefix queries) and matters "
                "(ablating the edge lowers the task metric beyond its null); weights corroborate only",
        "circuits": result.circuits,
        "task_metric": result.task_metric,
        "attribution": result.attribution_agreement,
        "task_patching": _task_summary(result),
        "direct": _direct_summary(result),
        "transfer": {name: {"layers": r.layer_names, "offsets": [list(o) for o in r.offsets], "r2": r.r2_LO.tolist(),
                            "ring_r2": r.ring_r2_LR().tolist(), "n_test_images": r.n_test_images}
                     for name, r in result.transfer.items()},
        "transfer_skipped": result.transfer_skipped,
    })
    figures = [(plot_weight_heatmaps(result, folder / "weight_heatmaps.png"),
                "Weight-based composition z-scores (sender rows × receiver columns) per kind, against random heads.")]
    if result.candidates:
        figures.append((plot_patch_heatmaps(result, folder / "patch_heatmaps.png"),
                        f"Path-patching effects of every sender head ({result.candidates[0].ablation} ablation) on every later head, "
                        "at patch queries."))
    if result.circuits:
        figures.append((plot_circuit_graph(result, folder / "circuit_graph.png", n_layers, n_heads),
                        "Circuit graph: supported (solid) and weak (dashed) edges, coloured by kind, width by the drop of the task metric."))
    if result.transfer:
        figures.append((plot_receptive_field(result.transfer, folder / "receptive_field.png"),
                        "Neighbour → centre transfer: held-out R² of ridge probes predicting a neighbour's patch embedding "
                        "from the centre token's residual, by layer and distance; dashed: with heads ablated."))
    return figures


def _cell(value):
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return ""
    return f"{value:.6g}" if isinstance(value, float) else value


def _task_summary(result: CompositionResult, n_top: int = 10) -> dict:
    """The edges whose ablation lowers the task metric most (``circuits.json["task_patching"]``)."""
    ranked = sorted(result.task_effects.items(), key=lambda item: -item[1])
    return {"n_edges": len(ranked), "metric": "drop of the task metric with the one edge mean-ablated",
            "strongest": [{"sender": [sl, sh], "receiver": [rl, rh], "kind": kind, "drop": drop} for (sl, sh, rl, rh, kind), drop in ranked[:n_top]]}


def _direct_summary(result: CompositionResult, n_top: int = 10) -> list[dict]:
    """The senders whose direct path into the output carries the largest attributed drops."""
    if result.attribution_direct is None:
        return []
    L, H = result.attribution_direct.shape
    ranked = sorted(((float(result.attribution_direct[layer, head]), layer, head) for layer in range(L) for head in range(H)), reverse=True)
    return [{"sender": [layer, head], "attributed_drop": value} for value, layer, head in ranked[:n_top]]
