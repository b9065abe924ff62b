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
    for p, metric in ((2, "d_out_proj"),):
        a = exact[:, p, 1, :, METRICS.index(metric)].ravel()
        b = est[0, :, p, 1, :].ravel()
        assert np.corrcoef(a, b)[0, 1] > 0.9


def test_spearman_matches_definition():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == 1.0
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == -1.0
    assert abs(spearman([1, 2, 2, 3], [1, 2, 3, 4]) - 0.9486832980505138) < 1e-9
    # ties that are not next to each other in input order: ranks (1.5, 1.5, 0) vs (1, 2, 0)
    assert abs(spearman([5, 5, 1], [2, 3, 1]) - 1.5 / np.sqrt(3)) < 1e-12


def test_attribution_equals_path_patching_in_the_linear_regime(monkeypatch):
    """With every head's output scaled down 1e4 the sender deltas are tiny, so the first-order
    estimate must equal exact path patching for every triple (LayerNorm pull-back, output-norm Gram
    trick and image chunking included; d_head * n_heads != d_model here)."""
    import vitcircuits.composition.attribution as attribution
    from vitcircuits.testing.planted import PlantedConfig, random_like

    monkeypatch.setattr(attribution, "CHUNK_FLOATS", 1)  # one image per chunk
    L, H = 3, 6
    model = random_like(PlantedConfig(grid=(5, 5), n_layers=L, n_heads=H, registers=1, seed=3)).model.double()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for block in model.blocks:
            block.attn.proj.weight.mul_(1e-4)
            block.ln1.weight.copy_(torch.rand(block.ln1.weight.shape, generator=generator, dtype=torch.float64) + 0.5)
            block.ln1.bias.copy_(torch.randn(block.ln1.bias.shape, generator=generator, dtype=torch.float64))
    x = torch.randn(5, 3, 20, 20, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    stats = ZStats.empty(model)
    stats.update(model, x)
    sums = AttributionSums(L, H)
    attribution_batch(model, x, sums, stats)
    est = sums.mean().numpy()
    senders = [(layer, h) for layer in range(L - 1) for h in range(H)]
    effects = PatchEffects(senders, L, H)
    path_patch_batch(model, x, senders, effects, stats, PatchingConfig())
    exact = effects.mean().numpy()
    for p, metric in ((0, "d_neighbour"), (1, "d_neighbour"), (2, "d_out_proj")):
        for sl in range(L - 1):
            a = est[sl, :, p, sl + 1 :].ravel()
            b = exact[sl * H : (sl + 1) * H, p, sl + 1 :, :, METRICS.index(metric)].ravel()
            assert np.abs(b).max() > 1e-8
            assert np.abs(a - b).max() < 1e-3 * np.abs(b).max(), (p, sl)
