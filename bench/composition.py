"""Composition costs and agreement, measured in one run.

    python bench/composition.py [--model ../shared/models/dinov2-small-imgfocus] [--img-size 224]
                                [--images ../shared/data/imagenet-samples] [--batch-size 16] [--top 40]

1. All-pairs weight scores (q, k, v and positional) on the reference architecture
   (``vit_base_patch32_224``, random weights: the cost does not depend on their values).
2. On a real model and real images, per batch: the clean forward time, the attribution-patching
   scan (every sender → receiver → path) in forward-equivalents, and the Spearman correlation
   between its estimates and exact path patching over the ``--top`` pairs it ranks highest
   (plus the same number of random pairs, so the correlation is not only among large effects).
   Attribution estimates ``d_neighbour`` for Q/K and ``d_out_proj`` for V; the correlation with the
   V path's exact relative norm change ``d_out_norm`` (whose curvature it does not model) is also printed.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import timm
import torch

from vitcircuits.composition.ablation import ZStats
from vitcircuits.composition.attribution import AttributionSums, attribution_batch, spearman
from vitcircuits.composition.patching import METRICS, PatchEffects, PatchingConfig, path_patch_batch
from vitcircuits.composition.weights import CompositionConfig, composition_scores
from vitcircuits.inputs import ImageOptions
from vitcircuits.models.families.timm_vit import config_from_timm, convert_state_dict
from vitcircuits.models.hooked_vit import HookedViT
from vitcircuits.models.loading import load_into, load_model

PATH_METRIC = {0: "d_neighbour", 1: "d_neighbour", 2: "d_out_proj"}


def weight_scores_time(repeats: int = 3) -> dict:
    ref = timm.create_model("vit_base_patch32_224", pretrained=False)
    model = HookedViT(config_from_timm(ref))
    load_into(model, convert_state_dict(ref.state_dict(), model.cfg), "vit_base_patch32_224")
    out = {}
    for positional in (False, True):
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            composition_scores(model, CompositionConfig(include_positional=positional))
            times.append(time.perf_counter() - start)
        out["all_pairs_s_with_positional" if positional else "all_pairs_s_qkv"] = round(min(times), 3)
    return out


def causal(args) -> dict:
    loaded = load_model(args.model, img_size=args.img_size, device="cpu")
    model = loaded.model
    batch = next(iter(ImageOptions(args.images, batch_size=args.batch_size, max_images=args.batch_size).batches(loaded, progress=False)))
    x = batch.images_BCHW
    stats = ZStats.empty(model)
    stats.update(model, x)
    with torch.no_grad():
        model(x)
        start = time.perf_counter()
        model(x)
        forward_s = time.perf_counter() - start
    sums = AttributionSums(model.cfg.n_layers, model.cfg.n_heads)
    start = time.perf_counter()
    attribution_batch(model, x, sums, stats)
    attribution_s = time.perf_counter() - start
    est = sums.mean().numpy()
    L, H = model.cfg.n_layers, model.cfg.n_heads
    pairs = [(sl, sh, p, rl, rh) for sl in range(L - 1) for sh in range(H) for p in range(3) for rl in range(sl + 1, L) for rh in range(H)]
    values = np.array([abs(est[pair]) for pair in pairs])
    top = [pairs[i] for i in np.argsort(-values)[: args.top]]
    rng = np.random.default_rng(0)
    rest = [pairs[i] for i in rng.choice(len(pairs), size=args.top, replace=False)]
    chosen = list(dict.fromkeys(top + rest))
    senders = sorted({(sl, sh) for sl, sh, *_ in chosen})
    effects = PatchEffects(senders, L, H)
    start = time.perf_counter()
    path_patch_batch(model, x, senders, effects, stats, PatchingConfig())
    exact_s = time.perf_counter() - start
    mean = effects.mean().numpy()
    index = {s: i for i, s in enumerate(senders)}
    def exact_of(metric_of_path):
        return {pair: mean[index[pair[:2]], pair[2], pair[3], pair[4], METRICS.index(metric_of_path[pair[2]])] for pair in chosen}
    exact, exact_norm = exact_of(PATH_METRIC), exact_of({**PATH_METRIC, 2: "d_out_norm"})
    def rho(subset, truth=exact):
        return round(spearman([est[p] for p in subset], [truth[p] for p in subset]), 3)
    return {
        "model": args.model, "img_size": args.img_size, "batch_size": args.batch_size, "threads": torch.get_num_threads(),
        "forward_s": round(forward_s, 3), "attribution_all_pairs_s": round(attribution_s, 3),
        "attribution_forward_equivalents": round(attribution_s / forward_s, 2), "n_pairs": len(pairs),
        "exact_patching_s": round(exact_s, 2), "exact_senders": len(senders),
        "spearman_top_pairs": rho(top), "spearman_top_and_random_pairs": rho(chosen),
        "spearman_top_pairs_against_v_norm_change": rho(top, exact_norm),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="../shared/models/dinov2-small-imgfocus")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--images", default="../shared/data/imagenet-samples")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--top", type=int, default=40)
    args = parser.parse_args()
    print(json.dumps({"weights": weight_scores_time(), "causal": causal(args)}, indent=2))


if __name__ == "__main__":
    main()
