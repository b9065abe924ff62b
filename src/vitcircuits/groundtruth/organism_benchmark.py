"""The detector benchmark on the trained shapes organisms, whose causal edges are measured, not planted.

Truth (:mod:`vitcircuits.composition.task_patching`): every ``sender → receiver → q/k/v`` edge of the
organism is path-ablated alone on ``truth_images`` freshly generated images of the compositional
classes (a generator stream the model never saw, ``truth_seed``); an edge is **causal** when the
true class's logit margin (its logit minus the mean other logit) drops by at least ``threshold``
on average.

Detectors: the head atlas and the composition stage run on the bundled ``bundled:shapes`` images,
exactly as ``vitcircuits hunt`` runs them, and are scored on every edge of the organism
(:func:`~vitcircuits.groundtruth.ground_truth.edge_scores`): the ``supported`` verdict, the composes
line, ``weight_z``, ``attribution`` (the stage's EAP-IG estimate of the drop of the margin of the
model's own prediction, on 64 bundled images) and ``task_effect`` (the stage's exact task-level
path patching on those images). ``attribution`` and ``task_effect`` measure what the truth
measures, on other images, with all six classes and without labels, so they test whether the
stage's estimates from a few images hold on fresh ones; the verdict tests whether composition
*and* use, each beyond its null, pick out the edges the task uses.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch

from vitcircuits.composition.ablation import ZStats
from vitcircuits.composition.circuits import edge_key
from vitcircuits.composition.config import ComposeConfig
from vitcircuits.composition.scan import run_composition
from vitcircuits.composition.task_patching import EdgeKey, all_edges, task_edge_effects
from vitcircuits.groundtruth.ground_truth import edge_scores, score_edges
from vitcircuits.heads.atlas import AtlasConfig
from vitcircuits.heads.scan import scan_heads
from vitcircuits.inputs import ImageOptions
from vitcircuits.models.loading import load_model
from vitcircuits.organisms import shapes_task
from vitcircuits.organisms.cifar import normalize_images

SENSITIVITY_THRESHOLDS = (0.05, 0.1, 0.2, 0.5)
SHAPES_ORGANISMS = ("bundled:shapes-vit", "bundled:shapes-vit-3x2", "bundled:shapes-vit-2x8")
"""The organisms trained on the shapes task (:mod:`vitcircuits.organisms.shapes`): 4 layers
x 4 heads (seed 0), 3 x 2 (seed 1), 2 x 8 (seed 2)."""


@dataclass(frozen=True)
class OrganismBenchConfig:
    """What the organism benchmark measures on."""

    model: str = "bundled:shapes-vit"
    """The organism (its ``config.json`` declares the class groups)."""
    images: str = "bundled:shapes"
    """Images the detectors run on, as ``hunt`` would."""
    detector_images: int | None = None
    """Use the first N of ``images`` (None: all)."""
    truth_images: int = 1200
    """Generated images of the compositional classes for the task effect of each edge."""
    truth_seed: int = 4
    """Generator stream of those images (training used 1, testing 2, the bundled images 3)."""
    threshold: float = 0.1
    """Mean drop of the logit margin from which an edge counts as causal (the ROC-AUC at other
    thresholds, :data:`SENSITIVITY_THRESHOLDS`, is reported too)."""
    batch_size: int = 100
    """Images per forward pass of the detectors."""


def truth_inputs(config: OrganismBenchConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Preprocessed images and labels of the compositional classes from stream ``truth_seed``."""
    n_classes = len(shapes_task.CLASSES)
    per_class = -(-config.truth_images // len(shapes_task.COMPOSITIONAL))
    images, labels = shapes_task.dataset(config.truth_seed, per_class * n_classes)
    keep = torch.isin(labels, torch.tensor(sorted(shapes_task.COMPOSITIONAL)))
    return normalize_images(images[keep][: config.truth_images]), labels[keep][: config.truth_images]


def measure_truth(model, images: torch.Tensor, labels: torch.Tensor, config: OrganismBenchConfig) -> dict:
    """Every edge's task effects (``margin_drop``, ``logprob_drop``, ``accuracy_drop``) on the truth images."""
    stats = ZStats.empty(model)
    for start in range(0, len(images), config.batch_size):
        stats.update(model, images[start : start + config.batch_size])
    return task_edge_effects(model, images, labels, all_edges(model), stats)


def run_detectors(loaded, config: OrganismBenchConfig, compose: ComposeConfig = ComposeConfig()):
    """The atlas and the composition result on the detector images, as ``hunt`` computes them."""
    batches = list(ImageOptions(images=config.images, batch_size=config.batch_size, max_images=config.detector_images).open(loaded).batches(progress=False))
    atlas, _ = scan_heads(loaded.model, batches, AtlasConfig(), loaded.model_id)
    images = [b.images_BCHW for b in batches]
    return atlas, run_composition(loaded.model, lambda: iter(images), atlas, compose)


def run_organism(config: OrganismBenchConfig = OrganismBenchConfig()) -> dict:
    """Truth, detectors and their scores (see the module docstring)."""
    t0 = time.perf_counter()
    loaded = load_model(config.model, device="cpu")
    images, labels = truth_inputs(config)
    effects = measure_truth(loaded.model, images, labels, config)
    t1 = time.perf_counter()
    atlas, result = run_detectors(loaded, config)
    t2 = time.perf_counter()
    true_edges = {edge for edge, e in effects.items() if e["margin_drop"] >= config.threshold}
    detectors = edge_scores(result)
    scores = {name: score_edges(true_edges & population.keys(), population.keys(), population, threshold=0.5 if name == "verdict" else None)
              for name, population in detectors.items()}
    sensitivity = {str(threshold): {name: score_edges({e for e, v in effects.items() if v["margin_drop"] >= threshold} & population.keys(),
                                                      population.keys(), population)["roc_auc"]
                                    for name, population in detectors.items()}
                   for threshold in SENSITIVITY_THRESHOLDS}
    ranked = sorted(effects.items(), key=lambda item: -item[1]["margin_drop"])
    verdicts = {edge_key(row): row.verdict for row in result.candidates}
    cfg = loaded.model.cfg
    return {
        "config": asdict(config),
        "shape": {"n_layers": cfg.n_layers, "n_heads": cfg.n_heads, "d_model": cfg.d_model},
        "n_edges": len(effects),
        "true_edges": [[*edge, round(effects[edge]["margin_drop"], 4), verdicts[edge]] for edge, _ in ranked if edge in true_edges],
        "top_edges": [{"edge": list(edge), **{k: round(v, 4) for k, v in e.items()}, "verdict": verdicts[edge]} for edge, e in ranked[:15]],
        "atlas_kinds": {f"L{r.layer}H{r.head}": r.kind for r in atlas.rows},
        "supported": [list(edge_key(row)) for row in result.candidates if row.verdict == "supported"],
        "detectors": scores,
        "attribution_agreement": result.attribution_agreement,
        "task_metric": result.task_metric,
        "auc_by_threshold": sensitivity,
        "seconds": {"truth": t1 - t0, "detectors": t2 - t1},
        "truth": truth_document(effects, config.threshold, f"{config.model}, measured by bench/ground_truth.py --organism",
                                f"{len(labels)} generated images of the compositional classes, stream {config.truth_seed}"),
    }


def format_organism(summary: dict) -> str:
    """Plain-text tables of a :func:`run_organism` summary."""
    shape = summary["shape"]
    lines = [f"Organism {summary['config']['model']} ({shape['n_layers']} layers x {shape['n_heads']} heads): {summary['n_edges']} edges, "
             f"{len(summary['true_edges'])} causal (margin drop ≥ {summary['config']['threshold']})",
             f"{'detector':<14}{'population':<12}{'pos':>5}{'neg':>6}{'prec':>7}{'recall':>7}{'AUC':>7}"]
    for name, d in summary["detectors"].items():
        population = "all edges" if name != "task_effect" else f"{d['n_pos'] + d['n_neg']} checked"
        prec, rec = (f"{d[k]:7.3f}" if k in d else f"{'':>7}" for k in ("precision", "recall"))
        lines.append(f"{name:<14}{population:<12}{d['n_pos']:>5}{d['n_neg']:>6}{prec}{rec}{d['roc_auc']:7.3f}")
    agreement = summary["attribution_agreement"]
    rho = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    lines += [f"attribution against the stage's exact checks: Spearman {rho(agreement.get('spearman_checked'))} over "
              f"{agreement.get('n_checked')} edges, {rho(agreement.get('spearman_top'))} over the top {agreement.get('n_top')}"]
    lines += ["", "ROC-AUC by causal threshold (margin drop): " + "; ".join(
        f"≥{threshold}: " + ", ".join(f"{name} {auc:.3f}" for name, auc in aucs.items()) for threshold, aucs in summary["auc_by_threshold"].items())]
    lines += ["", f"{'strongest edges':<24}{'margin drop':>12}{'log-prob drop':>14}{'acc drop':>10}  verdict"]
    for row in summary["top_edges"]:
        sl, sh, rl, rh, kind = row["edge"]
        edge = f"L{sl}H{sh} -> L{rl}H{rh} {kind}"
        lines.append(f"{edge:<24}{row['margin_drop']:>12.4f}{row['logprob_drop']:>14.4f}{row['accuracy_drop']:>10.3f}  {row['verdict']}")
    return "\n".join(lines)


def format_organisms(summaries: list[dict]) -> str:
    """One table of the goals over several :func:`run_organism` summaries."""
    f = lambda v: "  n/a" if v is None else f"{v:5.3f}"  # noqa: E731
    lines = ["All organisms (goals: supported AUC ≥ 0.95, precision ≥ 0.9, recall ≥ 0.8; attribution AUC ≥ 0.95)",
             f"{'organism':<26}{'LxH':>6}{'causal':>7}{'supp':>6}{'prec':>7}{'recall':>7}{'AUC':>7}{'attrAUC':>8}{'taskAUC':>8}{'rho40':>7}"]
    for s in summaries:
        v, d = s["detectors"]["verdict"], s["detectors"]
        shape = f"{s['shape']['n_layers']}x{s['shape']['n_heads']}"
        lines.append(f"{s['config']['model']:<26}{shape:>6}{len(s['true_edges']):>7}{len(s['supported']):>6}{f(v.get('precision')):>7}"
                     f"{f(v.get('recall')):>7}{f(v['roc_auc']):>7}{f(d['attribution']['roc_auc']):>8}{f(d['task_effect']['roc_auc']):>8}"
                     f"{f(s['attribution_agreement'].get('spearman_top')):>7}")
    return "\n".join(lines)


def truth_document(effects: dict[EdgeKey, dict[str, float]], threshold: float, source: str, images: str) -> dict:
    """``truth.json`` for ``vitcircuits hunt --truth``: every edge with its task effects, sorted by
    the margin drop, and ``causal`` when that drop reaches ``threshold`` (logits)."""
    ranked = sorted(effects.items(), key=lambda item: -item[1]["margin_drop"])
    return {
        "source": source,
        "images": images,
        "metric": "mean drop of the true class's logit margin (minus the mean other logit) with the one path mean-ablated",
        "threshold": threshold,
        "edges": [{"edge": list(edge), **{k: round(v, 6) for k, v in e.items()}, "causal": e["margin_drop"] >= threshold} for edge, e in ranked],
    }
