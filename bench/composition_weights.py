"""Cost of all-pairs weight composition scores on the reference architecture, against the naive
dense method measured on a few pairs and extrapolated, in one run.

    python bench/composition_weights.py [--arch vit_base_patch32_224] [--repeats 3] [--dense-pairs 8] [--threads 2]

Times :func:`composition_scores` (every sender/later-receiver pair, q/k/v, with and without the
positional kinds, baseline included) and the dense method: form ``W_OV``/``W_QK`` as ``D x D``
matrices per head (timed once for all heads), then one ``D x D`` product and three Frobenius
norms per pair and kind (timed on ``--dense-pairs`` pairs, extrapolated to all pairs).
Weights are random: cost does not depend on their values. On a shared machine, compare
``cpu_s_of_best`` with ``--threads 1``: the CPU time of a single thread is what the wall time
would be without other load (``load_average_1min`` is printed for context).
"""
from __future__ import annotations

import argparse
import json
import os
import time

import timm
import torch

from vitcircuits.composition.weights import (
    CompositionConfig,
    composition_scores,
    head_weights,
)
from vitcircuits.models.families.timm_vit import config_from_timm, convert_state_dict
from vitcircuits.models.hooked_vit import HookedViT
from vitcircuits.models.loading import load_into


def best_of(fn, repeats: int) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of the fastest of ``repeats`` calls."""
    runs = []
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        runs.append((time.perf_counter() - wall, time.process_time() - cpu))
    return min(runs)


def dense_seconds(model: HookedViT, n_pairs: int) -> tuple[float, int]:
    """Extrapolated seconds of the dense method for all pairs and q/k/v, and the pair count."""
    L, H = model.cfg.n_layers, model.cfg.n_heads
    heads = head_weights(model, CompositionConfig())
    start = time.perf_counter()
    OV_SDD = heads.W_V @ heads.W_O
    QK_SDD = heads.W_Q @ heads.W_K.mT
    form_s = time.perf_counter() - start
    pairs = [(s, r) for s in range(L * H) for r in range((s // H + 1) * H, L * H)]
    start = time.perf_counter()
    for s, r in pairs[:: max(1, len(pairs) // n_pairs)][:n_pairs]:
        A = OV_SDD[s]
        for B in (QK_SDD[r], QK_SDD[r].T, OV_SDD[r]):
            float((A @ B).norm() / (A.norm() * B.norm()))
    per_pair_s = (time.perf_counter() - start) / n_pairs
    return form_s + per_pair_s * len(pairs), len(pairs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="vit_base_patch32_224")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dense-pairs", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    ref = timm.create_model(args.arch, pretrained=False)
    model = HookedViT(config_from_timm(ref))
    load_into(model, convert_state_dict(ref.state_dict(), model.cfg), args.arch)
    model.eval()
    del ref

    variants = {
        "qkv": CompositionConfig(include_positional=False),
        "qkv_positional": CompositionConfig(include_positional=True),
    }
    best = {}
    for name, config in variants.items():
        composition_scores(model, config)  # warm-up
        best[name] = best_of(lambda config=config: composition_scores(model, config), args.repeats)
    dense_s, n_pairs = dense_seconds(model, args.dense_pairs)
    cfg = model.cfg
    result = {
        "arch": args.arch,
        "d_model": cfg.d_model,
        "d_head": cfg.d_head,
        "n_layers": cfg.n_layers,
        "n_heads": cfg.n_heads,
        "pairs_per_kind": n_pairs,
        "threads": torch.get_num_threads(),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "best_s": {name: round(wall, 3) for name, (wall, _) in best.items()},
        "cpu_s_of_best": {name: round(cpu, 3) for name, (_, cpu) in best.items()},
        "dense_qkv_s_extrapolated": round(dense_s, 1),
        "dense_pairs_timed": args.dense_pairs,
        "speedup_qkv_vs_dense": round(dense_s / best["qkv"][0], 1),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
