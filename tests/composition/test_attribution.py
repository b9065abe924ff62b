"""Attribution patching ranks the planted edges first and agrees with exact path patching."""
import numpy as np
import torch

from vitcircuits.composition.ablation import ZStats
from vitcircuits.composition.attribution import AttributionSums, attribution_batch, spearman
from vitcircuits.composition.patching import METRICS, PatchEffects, PatchingConfig, path_patch_batch
from vitcircuits.testing.planted_circuits import CIRCUIT_CONFIG, build_planted_circuits


def test_attribution_finds_planted_edges_and_tracks_exact_patching():
    planted = build_planted_circuits(CIRCUIT_CONFIG)
    model = planted.model
    x = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    stats = ZStats.empty(model)
    stats.update(model, x)
    sums = AttributionSums(2, CIRCUIT_CONFIG.n_heads)
    attribution_batch(model, x, sums, stats)
    est = sums.mean().numpy()  # [sender L, sender H, path, receiver L, receiver H]
    for (sl, sh, rl, rh), kind in planted.edges.items():
        p = "qkv".index(kind)
        column = np.abs(est[0, :, :, rl, rh])  # every layer-0 sender, every path, into this receiver
        assert np.unravel_index(column.argmax(), column.shape) == (sh, p), (kind, column)
    senders = [(0, h) for h in range(CIRCUIT_CONFIG.n_heads)]
    effects = PatchEffects(senders, 2, CIRCUIT_CONFIG.n_heads)
    path_patch_batch(model, x, senders, effects, stats, PatchingConfig())
    exact = effects.mean().numpy()
    for p, metric in ((2, "d_out_norm"),):
        a = exact[:, p, 1, :, METRICS.index(metric)].ravel()
        b = est[0, :, p, 1, :].ravel()
        assert np.corrcoef(a, b)[0, 1] > 0.9


def test_spearman_matches_definition():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == 1.0
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == -1.0
    assert abs(spearman([1, 2, 2, 3], [1, 2, 3, 4]) - 0.9486832980505138) < 1e-9
    # ties that are not next to each other in input order: ranks (1.5, 1.5, 0) vs (1, 2, 0)
    assert abs(spearman([5, 5, 1], [2, 3, 1]) - 1.5 / np.sqrt(3)) < 1e-12
