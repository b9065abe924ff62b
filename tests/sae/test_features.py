"""SAE feature statistics, circuit dependence on a planted model, image edits and figures."""

import pytest
import torch

from vitcircuits.cache import token_positions
from vitcircuits.composition.ablation import ZStats
from vitcircuits.groundtruth.planted_circuits import CIRCUIT_CONFIG, K_RECEIVER, build_planted_circuits
from vitcircuits.sae.dependence import (
    DependenceConfig,
    circuit_dependence,
    circuit_heads_from,
    control_head_sets,
    neighbour_positions,
    occlude_patches,
    shuffle_neighbours,
)
from vitcircuits.sae.features import FeatureStats, FeatureStatsConfig, feature_stats
from vitcircuits.sae.gallery import plot_dependence, plot_feature_gallery, plot_mean_maps, sae_feature_maps
from vitcircuits.sae.model import SAE, SAEConfig

HOOK = "blocks.1.hook_resid_post"


def relu_sae(W_enc_DF, b_enc_F):
    """A ReLU SAE computing exactly ``relu(x @ W_enc + b_enc)``."""
    D, F = W_enc_DF.shape
    sae = SAE(SAEConfig(d_in=D, d_sae=F, architecture="relu", normalize_activations=False))
    with torch.no_grad():
        sae.W_enc.copy_(W_enc_DF)
        sae.b_enc.copy_(b_enc_F)
        sae.b_dec.zero_()
    return sae


# ------------------------------------------------------------------------------------ feature_stats
def test_feature_stats_streams_exact_topk_density_and_mean_map(tmp_path):
    g = torch.Generator().manual_seed(0)
    grid, n_images, D = (3, 4), 10, 5
    N = n_images * 12
    acts_ND = torch.randn(N, D, generator=g)
    image_N = torch.arange(n_images).repeat_interleave(12)
    row_N, col_N = torch.arange(12).repeat(n_images) // 4, torch.arange(12).repeat(n_images) % 4
    # feature 0..4 read one coordinate each with bias -0.3; feature 5 fires on only a few rows
    W_DF = torch.cat([torch.eye(D), torch.ones(D, 1)], dim=1)
    b_F = torch.tensor([-0.3] * D + [-5.0])
    sae = relu_sae(W_DF, b_F)
    k = 6
    chunks = [(acts_ND[i : i + 17], image_N[i : i + 17], row_N[i : i + 17], col_N[i : i + 17]) for i in range(0, N, 17)]
    stats = feature_stats(sae, chunks, grid, FeatureStatsConfig(top_k=k))
    one_shot = feature_stats(sae, [(acts_ND, image_N, row_N, col_N)], grid, FeatureStatsConfig(top_k=k))

    feats_NF = torch.relu(acts_ND @ W_DF + b_F)
    assert stats.n_rows == N and stats.grid == grid
    torch.testing.assert_close(stats.density_F, (feats_NF > 0).float().mean(0))
    torch.testing.assert_close(stats.mean_act_F, feats_NF.mean(0))
    for f in range(feats_NF.shape[1]):
        for r in range(3):
            for c in range(4):
                at = (row_N == r) & (col_N == c)
                assert stats.mean_map_FYX[f, r, c].item() == pytest.approx(feats_NF[at, f].mean().item(), abs=1e-6)
        values, idx = feats_NF[:, f].topk(k)
        fired = values > 0
        expected = [(int(image_N[i]), int(row_N[i]), int(col_N[i])) for i in idx[fired]]
        assert [(i, r, c) for i, r, c, _ in stats.examples(f)] == expected
        torch.testing.assert_close(stats.top_value_FT[f, : int(fired.sum())], values[fired])
    n_fired = int((feats_NF[:, 5] > 0).sum())
    assert 0 < n_fired < k, "feature 5 should fire on fewer than k rows"
    assert (stats.top_image_FT[5, n_fired:] == -1).all() and (stats.top_row_FT[5, n_fired:] == -1).all()
    assert (stats.top_value_FT[5, n_fired:] == 0).all()
    for name in ("density_F", "mean_act_F", "mean_map_FYX", "top_value_FT", "top_image_FT", "top_row_FT", "top_col_FT"):
        torch.testing.assert_close(getattr(stats, name), getattr(one_shot, name))

    loaded = FeatureStats.load(stats.save(tmp_path / "stats"))
    assert loaded.n_rows == N and loaded.grid == grid
    for name in ("density_F", "mean_map_FYX", "top_value_FT", "top_image_FT", "top_col_FT"):
        assert torch.equal(getattr(loaded, name), getattr(stats, name))
    assert not [p for p in (tmp_path / "stats").iterdir() if p.name.endswith(".tmp")]

    with pytest.raises(ValueError, match="prefix"):
        feature_stats(sae, [(acts_ND[:2], image_N[:2], torch.tensor([-1, 0]), torch.tensor([-1, 0]))], grid)


# --------------------------------------------------------------------------------- image editing
def test_neighbour_occlusion_and_shuffle_edit_only_the_neighbours():
    grid, patch = (6, 7), (2, 3)
    image = torch.randn(3, 12, 21, generator=torch.Generator().manual_seed(0))
    patches = lambda x: {(r, c): x[:, r * 2 : r * 2 + 2, c * 3 : c * 3 + 3] for r in range(6) for c in range(7)}
    assert len(neighbour_positions(0, 0, grid, 1)) == 3 and len(neighbour_positions(3, 3, grid, 1)) == 8
    assert len(neighbour_positions(3, 3, grid, 2)) == 24
    for (r, c), radius in (((0, 0), 1), ((3, 3), 1), ((2, 4), 2)):
        nbrs = set(neighbour_positions(r, c, grid, radius))
        occluded = patches(occlude_patches(image, nbrs, patch))
        shuffled = patches(shuffle_neighbours(image, r, c, grid, patch, radius, torch.Generator().manual_seed(1)))
        original = patches(image)
        for pos in original:
            if pos in nbrs:
                assert (occluded[pos] == 0).all()
                sources = [q for q, p in original.items() if torch.equal(p, shuffled[pos])]
                assert len(sources) == 1 and max(abs(sources[0][0] - r), abs(sources[0][1] - c)) > radius + 1
            else:  # the centre and everything outside the neighbourhood are untouched
                assert torch.equal(occluded[pos], original[pos]) and torch.equal(shuffled[pos], original[pos])
    centre = patches(occlude_patches(image, [(3, 3)], patch))
    assert (centre[(3, 3)] == 0).all() and all(torch.equal(centre[p], patches(image)[p]) for p in centre if p != (3, 3))
    again = lambda seed: shuffle_neighbours(image, 3, 3, grid, patch, 1, torch.Generator().manual_seed(seed))
    assert torch.equal(again(5), again(5)) and not torch.equal(again(5), again(6))
    with pytest.raises(ValueError, match="farther"):
        shuffle_neighbours(torch.zeros(3, 10, 10), 2, 2, (5, 5), (2, 2), 1, torch.Generator())


def test_control_heads_come_from_the_circuit_layers_outside_the_circuit():
    circuit = [(0, 0), (0, 3), (1, 0)]
    draws = control_head_sets(circuit, 6, 5, torch.Generator().manual_seed(0))
    assert draws == control_head_sets(circuit, 6, 5, torch.Generator().manual_seed(0))
    for heads in draws:
        assert sorted(layer for layer, _ in heads) == [0, 0, 1] and not set(heads) & set(circuit) and len(set(heads)) == 3
    assert len({tuple(h) for h in draws}) > 1


def test_circuit_heads_from_filters_verdicts_and_layers():
    circuits = [
        {"senders": [[0, 0]], "receivers": [[1, 0]], "kind": "k", "verdict": "supported"},
        {"senders": [[0, 3]], "receivers": [[1, 2]], "kind": "v", "verdict": "supported"},
        {"senders": [[0, 4]], "receivers": [[1, 4]], "kind": "k", "verdict": "weak"},
        {"senders": [[1, 1]], "receivers": [[3, 0]], "kind": "q", "verdict": "supported"},
    ]
    assert circuit_heads_from(circuits, max_layer=1) == [(0, 0), (0, 3), (1, 0), (1, 1), (1, 2)]
    assert circuit_heads_from(circuits, max_layer=0, verdicts=("supported", "weak")) == [(0, 0), (0, 3), (0, 4)]


# ------------------------------------------------------------------------- planted ground truth
@pytest.fixture(scope="module")
def planted_features():
    """The planted-circuit model, random images and a hand-built SAE on ``blocks.1.hook_resid_post``.

    Features (each ``relu(100 * w . slice)`` with one random direction ``w`` on the ``+`` dims of the
    ``+/-`` pairs, so it is positive on about half of the tokens):

    0 ``composed``: the K receiver's output slice plus twice the modular sender's slice. The K receiver
      alone is a noisy composed feature: its logits carry image noise as large as the neighbour bonus
      (planted_circuits docstring), so only ~30 % of its attention lands on the 8 neighbours and its top
      activations are often carried by one far key whose content happens to align with ``w`` (its
      neighbour drop ranges from 0.2 to 0.75 over seeds). The modular slice (the exact mean of the 8
      neighbours, read by the K receiver's keys) makes the neighbour dependence robust; the K slice keeps
      the query's own content in play (occluding the centre zeroes the query: uniform attention).
    1 ``k_only``: the K receiver's slice alone (only its robust properties are asserted).
    2 ``local``: the token's own content dims: a single-patch feature untouched by any head.
    3 ``self_slice``: the self head's slice, i.e. again the token's own content but written by a circuit
      sender (the V edge's): circuit-dependent, yet not compositional.
    """
    planted = build_planted_circuits(CIRCUIT_CONFIG)
    model, slices = planted.model, planted.planted
    x = torch.randn(32, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    zstats = ZStats.empty(model)
    zstats.update(model, x)
    C, D = CIRCUIT_CONFIG.content_dims, model.cfg.d_model
    w = torch.zeros(C)
    w[0::2] = torch.randn(C // 2, generator=torch.Generator().manual_seed(10))
    k_slice = slices.out_slice(*planted.receiver(K_RECEIVER))
    W_DF = torch.zeros(D, 4)
    W_DF[k_slice, 0], W_DF[slices.out_slice(0, 0), 0] = 100 * w, 200 * w
    W_DF[k_slice, 1] = 100 * w
    W_DF[slices.content_slice, 2] = 100 * w
    W_DF[slices.out_slice(0, CIRCUIT_CONFIG.planted_kinds.index("self")), 3] = 100 * w
    sae = relu_sae(W_DF, torch.zeros(4))
    _, cache = model.run_with_cache(x, names_filter=[HOOK])
    token, row, col = token_positions(model, include_prefix=False)
    B, T = len(x), len(token)
    rows = [(cache[HOOK][i : i + 8, token].reshape(-1, D), torch.arange(i, i + 8).repeat_interleave(T), row.repeat(8), col.repeat(8))
            for i in range(0, B, 8)]
    stats = feature_stats(sae, rows, (8, 8), FeatureStatsConfig(top_k=8))
    circuits = [{"senders": [list(e[:2])], "receivers": [list(e[2:])], "kind": kind, "verdict": "supported"} for e, kind in planted.edges.items()]
    return planted, x, zstats, sae, stats, circuit_heads_from(circuits, max_layer=1)


def test_planted_composed_feature_needs_neighbours_and_circuit(planted_features):
    planted, x, zstats, sae, stats, heads = planted_features
    assert heads == sorted({e[:2] for e in planted.edges} | {e[2:] for e in planted.edges})
    config = DependenceConfig(n_features=4, n_examples=8, n_control_draws=2)
    rows = circuit_dependence(planted.model, sae, HOOK, lambda idx: x[idx], stats, heads, zstats, config)
    by = {r["feature"]: r for r in rows}
    composed, k_only, local, self_slice = by[0], by[1], by[2], by[3]
    assert rows[0]["feature"] == 0 and all(r["circuit_tested"] and r["n_examples"] == 8 for r in rows)
    assert composed["circuit_excess"] > 0.8 and abs(composed["drop_control"]) < 0.05
    assert composed["drop_neighbours_occluded"] > 0.6 and composed["drop_neighbours_shuffled"] > 0.6
    assert composed["compositional"] and composed["compositional_score"] > 0.6
    # the K receiver needs its own query content (centre) and the circuit; its neighbour share is noisy
    assert k_only["circuit_excess"] > 0.8 and k_only["drop_centre"] > 0.9 and k_only["neighbour_drop"] > 0.1
    for single in (local, self_slice):  # single-patch features: neighbours do nothing, the centre is everything
        assert abs(single["drop_neighbours_occluded"]) < 0.01 and abs(single["drop_neighbours_shuffled"]) < 0.01
        assert single["drop_centre"] > 0.99 and single["compositional_score"] < 0.01 and not single["compositional"]
    assert abs(local["circuit_excess"]) < 0.05  # no head writes the content dims
    assert self_slice["circuit_excess"] > 0.9  # circuit-dependent, but not through the neighbours
    order = [r["feature"] for r in rows]
    assert order.index(0) < order.index(1) < min(order.index(2), order.index(3))

    untested = circuit_dependence(planted.model, sae, HOOK, lambda idx: x[idx], stats, [], None, config, features=[2, 0])
    assert [r["feature"] for r in untested] == [0, 2]
    assert all(not r["circuit_tested"] and r["drop_circuit"] is None and r["circuit_excess"] is None for r in untested)
    assert untested[0]["compositional"] and untested[0]["drop_neighbours_occluded"] == pytest.approx(composed["drop_neighbours_occluded"])


def test_figures_are_written(planted_features, tmp_path):
    planted, x, _, sae, stats, _ = planted_features
    rows = [{"feature": 0, "density": 0.5, "neighbour_drop": 0.8, "circuit_excess": 0.9, "drop_centre": 0.4, "compositional_score": 0.8,
             "compositional": True, "circuit_tested": True},
            {"feature": 2, "density": 0.5, "neighbour_drop": 0.0, "circuit_excess": None, "drop_centre": 1.0, "compositional_score": 0.0,
             "compositional": False, "circuit_tested": False}]
    maps = sae_feature_maps(planted.model, sae, HOOK)
    paths = [
        plot_feature_gallery(lambda idx: x[idx], stats, [0, 2], tmp_path / "gallery.png", (4, 4), maps, (0.5,) * 3, (0.25,) * 3,
                             n_examples=3, dependence_rows=rows),
        plot_mean_maps(stats, [0, 1, 2, 3], tmp_path / "maps.png", n_cols=3),
        plot_dependence(rows, tmp_path / "dependence.png"),
    ]
    for path in paths:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 2000
    # the map callable agrees with the statistics: the top example's patch carries the top value
    image, r, c, value = stats.examples(0, 1)[0]
    assert maps(x[[image]], [0])[0, r, c].item() == pytest.approx(value, rel=1e-4)
