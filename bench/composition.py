"""Composition costs and agreement, measured in one run.

    python bench/composition.py [--model ../shared/models/dinov2-small-imgfocus] [--img-size 224]
                                [--images ../shared/data/imagenet-samples] [--n-images 64] [--batch-size 16]
                                [--top 40] [--probe-images 1000]

1. All-pairs weight scores (q, k, v and positional) on the reference architecture
   (``vit_base_patch32_224``, random weights: the cost does not depend on their values).
2. The all-edge attribution (:mod:`vitcircuits.composition.edge_attribution`) on the reference
   architecture: time per batch of ``--batch-size`` images against one clean forward of the same
   batch measured in the same run (forward-equivalents), the number of edges, and the growth of
   the process's peak resident memory.
3. On a real backbone and real labelled images: a linear probe fitted on ``--probe-images`` of
   them (:func:`~vitcircuits.composition.task_metric.fit_probe`) defines the task metric; the
   attribution estimates every edge's drop of the probe's margin on ``--n-images`` images, and
   exact task-level path patching checks the ``2 * --top`` edges it ranks highest. Printed: the
   Spearman correlation of estimate and exact drop over the ``--top`` edges the attribution ranks
   highest, and over the ``--top`` of the checked edges with the largest exact drops.
"""
from __future__ import annotations

import argparse
import json
import resource
import time

import timm
import torch

from vitcircuits.composition.ablation import ZStats
from vitcircuits.composition.edge_attribution import EdgeAttribution, edge_attribution_batch, spearman
from vitcircuits.composition.patching import PATHS
from vitcircuits.composition.task_metric import TaskMetric, fit_probe
from vitcircuits.composition.task_patching import all_edges, edge_drops
from vitcircuits.composition.weights import CompositionConfig, composition_scores
from vitcircuits.inputs import ImageOptions
from vitcircuits.models.families.timm_vit import config_from_timm, convert_state_dict
from vitcircuits.models.hooked_vit import HookedViT
from vitcircuits.models.loading import load_into, load_model


def reference_model() -> HookedViT:
    ref = timm.create_model("vit_base_patch32_224", pretrained=False)
    model = HookedViT(config_from_timm(ref))
    load_into(model, convert_state_dict(ref.state_dict(), model.cfg), "vit_base_patch32_224")
    return model.eval()


def weight_scores_time(model: HookedViT, repeats: int = 3) -> dict:
    out = {}
    for positional in (False, True):
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            composition_scores(model, CompositionConfig(include_positional=positional))
            times.append(time.perf_counter() - start)
        out["all_pairs_s_with_positional" if positional else "all_pairs_s_qkv"] = round(min(times), 3)
    return out


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def attribution_cost(model: HookedViT, batch_size: int) -> dict:
    """Edge attribution on one batch of noise images against a clean forward of the same batch."""
    x = torch.randn(batch_size, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    stats = ZStats.empty(model)
    stats.update(model, x)
    metric = TaskMetric("margin")
    with torch.no_grad():
        targets = metric.targets(metric.output(model, x))
        model(x)
        start = time.perf_counter()
        model(x)
        forward_s = time.perf_counter() - start
    before = _peak_mib()
    sums = EdgeAttribution(model.cfg.n_layers, model.cfg.n_heads)
    start = time.perf_counter()
    edge_attribution_batch(model, x, targets, metric, stats, sums)
    attribution_s = time.perf_counter() - start
    return {"model": "vit_base_patch32_224 (random weights)", "batch_size": batch_size, "n_edges": len(all_edges(model)),
            "forward_s": round(forward_s, 3), "attribution_s": round(attribution_s, 2),
            "forward_equivalents": round(attribution_s / forward_s, 2), "peak_rss_growth_mib": round(_peak_mib() - before, 1)}


def agreement(args) -> dict:
    loaded = load_model(args.model, img_size=args.img_size, device="cpu")
    model = loaded.model
    batches = list(ImageOptions(images=args.images, batch_size=args.batch_size, max_images=args.probe_images).open(loaded).batches(progress=False))
    images = torch.cat([b.images_BCHW for b in batches])
    labels = torch.cat([b.labels_B for b in batches])
    start = time.perf_counter()
    with torch.no_grad():
        features = torch.cat([model(x) for x in images.split(args.batch_size)])
    metric = fit_probe(features, labels, int(labels.max()) + 1)
    probe_s = time.perf_counter() - start
    pick = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))[: args.n_images].sort().values
    x = images[pick]
    stats = ZStats.empty(model)
    stats.update(model, x)
    with torch.no_grad():
        targets = metric.targets(metric.output(model, x), labels[pick])
    sums = EdgeAttribution(model.cfg.n_layers, model.cfg.n_heads)
    start = time.perf_counter()
    for s in range(0, len(x), args.batch_size):
        edge_attribution_batch(model, x[s : s + args.batch_size], targets[s : s + args.batch_size], metric, stats, sums)
    attribution_s = time.perf_counter() - start
    est_LHJLH = sums.mean()[0].numpy()
    edges = all_edges(model)
    estimate = {e: float(est_LHJLH[e[0], e[1], PATHS.index(e[4]), e[2], e[3]]) for e in edges}
    checked = sorted(edges, key=lambda e: -estimate[e])[: 2 * args.top]
    start = time.perf_counter()
    drops = edge_drops(model, x, targets, checked, stats, metric)
    exact_s = time.perf_counter() - start
    exact = {e: drops.mean(e) for e in checked}
    by_estimate, by_exact = checked[: args.top], sorted(checked, key=lambda e: -exact[e])[: args.top]
    rho = lambda subset: round(spearman([estimate[e] for e in subset], [exact[e] for e in subset]), 3)  # noqa: E731
    return {"model": args.model, "img_size": args.img_size, "n_images": len(x), "probe_images": len(images), "threads": torch.get_num_threads(),
            "probe_fit_s": round(probe_s, 1), "clean_margin": round(float(drops.clean_I.mean()), 3), "n_edges": len(edges),
            "attribution_s": round(attribution_s, 1), "exact_checks_s": round(exact_s, 1), "n_checked": len(checked),
            "spearman_top_by_attribution": rho(by_estimate), "spearman_top_by_exact": rho(by_exact),
            "top_edges": [[*e, round(estimate[e], 4), round(exact[e], 4)] for e in by_exact[:10]]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="../shared/models/dinov2-small-imgfocus")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--images", default="../shared/data/imagenet-samples")
    parser.add_argument("--probe-images", type=int, default=1000)
    parser.add_argument("--n-images", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--skip-agreement", action="store_true", help="only the costs on the reference architecture")
    args = parser.parse_args()
    reference = reference_model()
    out = {"weights": weight_scores_time(reference), "attribution_cost": attribution_cost(reference, args.batch_size)}
    print(json.dumps(out, indent=2), flush=True)
    if not args.skip_agreement:
        print(json.dumps({"agreement": agreement(args)}, indent=2))


if __name__ == "__main__":
    main()
