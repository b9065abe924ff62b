"""Weight-based composition scores: factored = dense, planted pairs, random controls, baseline, LN folding."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vitcircuits.composition.weights import (
    COMPOSITION_COLUMNS,
    KIND_FACTORS,
    CompositionConfig,
    _factor,
    _paired_score,
    composition_scores,
    head_weights,
    positional_inputs,
    random_baseline,
)
from vitcircuits.models import HookedViT, ViTConfig
from vitcircuits.models.weights import fold_layer_norm

FAST = CompositionConfig(n_baseline_samples=100)


def small_model(seed=0, **changes) -> HookedViT:
    """Random weights everywhere, LayerNorm and layer-scale included."""
    base = {"d_model": 48, "n_layers": 3, "n_heads": 4, "d_head": 12, "d_mlp": 16, "patch_size": (4, 4), "img_size": (16, 20)}
    model = HookedViT(ViTConfig(**{**base, "layer_scale": True, **changes})).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.3)
    return model


def comp_LHLH(A_LHmD, B_LHDn):
    """Dense ``||A_s B_r|| / (||A_s|| ||B_r||)`` for every (sender, receiver)."""
    AB = torch.einsum("ahmd,bgdn->ahbgmn", A_LHmD, B_LHDn)
    norm_A, norm_B = A_LHmD.flatten(-2).norm(dim=-1), B_LHDn.flatten(-2).norm(dim=-1)
    return AB.flatten(-2).norm(dim=-1) / (norm_A[:, :, None, None] * norm_B[None, None])


def dense_scores(model, center_writes, center_reads):
    """The definitions with every D x D matrix formed, in float64 (independent of the module)."""
    folded, cfg, layout = fold_layer_norm(model), model.cfg, model.layout
    D = cfg.d_model
    eye = torch.eye(D, dtype=torch.float64)
    centring = eye - 1.0 / D
    R = centring if center_reads else eye
    W = centring if center_writes else eye
    W_Q, W_K, W_V, W_O = (w.double() for w in (folded.W_Q, folded.W_K, folded.W_V, folded.W_O))
    OV = R @ W_V @ W_O @ W
    QK = R @ W_Q @ W_K.mT @ R
    pos = model.pos_embed.detach()[0].double()
    x = (pos[layout.patch_start :] if cfg.pos_embed_prefix else pos) + model.embed.proj.bias.detach().double()
    if model.ln_pre is not None:
        x = F.layer_norm(x, (D,), model.ln_pre.weight.detach().double(), model.ln_pre.bias.detach().double(), cfg.ln_eps)
    Pn = (x - x.mean(-1, keepdim=True)) / (x.var(-1, unbiased=False, keepdim=True) + cfg.ln_eps).sqrt()
    Y = Pn @ OV
    scores = {
        "q": comp_LHLH(OV, QK), "k": comp_LHLH(OV, QK.mT), "v": comp_LHLH(OV, OV),
        "pos_q": comp_LHLH(Y, QK @ Pn.T), "pos_k": comp_LHLH(Y, QK.mT @ Pn.T),
    }
    later = torch.arange(cfg.n_layers)[:, None, None, None] < torch.arange(cfg.n_layers)[None, None, :, None]
    return {kind: torch.where(later, s, math.nan).numpy() for kind, s in scores.items()}


@pytest.mark.parametrize("center", [True, False])
@pytest.mark.parametrize("changes", [{}, {"pre_norm": True, "pos_embed_prefix": False, "n_registers": 2}], ids=["vit", "ln_pre_patch_pos"])
def test_factored_scores_equal_dense_definition(center, changes):
    model = small_model(**changes)
    config = CompositionConfig(center_writes=center, center_reads=center, n_baseline_samples=10)
    result = composition_scores(model, config)
    expected = dense_scores(model, center, center)
    for kind in result.kinds:
        got = result.scores(kind)
        assert got.shape == (3, 4, 3, 4)
        assert np.array_equal(np.isnan(got), np.isnan(expected[kind])), kind
        np.testing.assert_allclose(got, expected[kind], atol=1e-5, equal_nan=True, err_msg=kind)


def test_paired_formula_equals_dense_definition():
    """The baseline's single-pair formula, on head i of layer 0 with head i of layer 1."""
    model = small_model(seed=1)
    heads, Pn = head_weights(model), positional_inputs(model)
    expected = dense_scores(model, True, True)
    for kind, (U_A, V_A, U_B, V_B) in KIND_FACTORS.items():
        sender = [_factor(name, heads, Pn)[0:4] for name in (U_A, V_A)]
        receiver = [_factor(name, heads, Pn)[4:8] for name in (U_B, V_B)]
        paired = _paired_score(*sender, *receiver)
        np.testing.assert_allclose(paired.numpy(), np.diagonal(expected[kind][0, :, 1, :]), atol=1e-5, err_msg=kind)


@pytest.mark.parametrize("d_model", [40, 8], ids=["bartlett", "direct"])
@pytest.mark.parametrize("center", [(True, True), (False, True), (True, False), (False, False)])
def test_baseline_matches_brute_force_gaussian_heads(d_model, center):
    """The small-basis samples have the law of Gaussian weights in R^D, centring and Pn included."""
    d_head, n = 4, 4000
    config = CompositionConfig(center_writes=center[0], center_reads=center[1], n_baseline_samples=n)
    g = torch.Generator().manual_seed(1)
    Pn = F.layer_norm(torch.randn(6, d_model, generator=g, dtype=torch.float64), (d_model,))
    fast = random_baseline(d_model, d_head, config, Pn)
    centring = torch.eye(d_model, dtype=torch.float64) - 1.0 / d_model
    draw = lambda *shape: torch.randn(n, *shape, generator=g, dtype=torch.float64)
    reads = lambda: centring @ draw(d_model, d_head) if center[1] else draw(d_model, d_head)
    writes_T = lambda: centring @ draw(d_model, d_head) if center[0] else draw(d_model, d_head)
    factors = {"W_Q": reads, "W_K": reads, "W_V": reads, "W_O^T": writes_T}
    for kind, names in KIND_FACTORS.items():
        sampled = [Pn @ factors[name[3:]]() if name.startswith("Pn ") else factors[name]() for name in names]
        brute = _paired_score(*sampled)
        mean, std = fast[kind]
        assert abs(mean - float(brute.mean())) < 4 * float(brute.std()) / math.sqrt(n) * math.sqrt(2), (kind, mean, float(brute.mean()))
        assert abs(std / float(brute.std()) - 1) < 0.1, (kind, std, float(brute.std()))


def test_head_weights_fold_layer_norm_like_fold_layer_norm():
    model = small_model(seed=5)
    folded = fold_layer_norm(model)
    heads = head_weights(model, CompositionConfig(center_reads=False, center_writes=False))
    for name in ("W_Q", "W_K", "W_V", "W_O"):
        torch.testing.assert_close(getattr(heads, name), getattr(folded, name).flatten(0, 1))


def planted_pairs_model() -> HookedViT:
    """Layer-0 head 1 writes only dims 0:8, which layer-1 head 3's W_K alone reads (K-composition);
    layer-0 head 2 writes only dims 8:16, which layer-1 head 0's W_V alone reads (V-composition).
    No other head writes dims 0:16; every other weight is random (so reads everything)."""
    D, H, Dh = 64, 4, 8
    model = HookedViT(ViTConfig(d_model=D, n_layers=2, n_heads=H, d_head=Dh, d_mlp=8, patch_size=(4, 4), img_size=(16, 16)))
    generator = torch.Generator().manual_seed(0)
    model.init_weights(generator=generator)
    block = lambda *shape: torch.randn(*shape, generator=generator) / math.sqrt(shape[-1])
    with torch.no_grad():
        for layer in model.blocks:
            layer.attn.proj.weight[:16] = 0
        W_O_l0 = model.blocks[0].attn.proj.weight  # [D, H*Dh]: head h writes columns h*Dh:(h+1)*Dh
        W_O_l0[:, 1 * Dh : 2 * Dh] = 0
        W_O_l0[0:8, 1 * Dh : 2 * Dh] = block(8, Dh)
        W_O_l0[:, 2 * Dh : 3 * Dh] = 0
        W_O_l0[8:16, 2 * Dh : 3 * Dh] = block(8, Dh)
        qkv = model.blocks[1].attn.qkv.weight.view(3, H, Dh, D)  # (q, k, v), head, Dh, D
        qkv[1, 3] = 0
        qkv[1, 3, :, 0:8] = block(Dh, 8)
        qkv[2, 0] = 0
        qkv[2, 0, :, 8:16] = block(Dh, 8)
    return model.eval()


def test_planted_k_and_v_composition_are_top_ranked():
    result = composition_scores(planted_pairs_model(), CompositionConfig(include_positional=False))
    z = {kind: result.z(kind) for kind in result.kinds}
    for kind, pair, others in (("k", (0, 1, 1, 3), ("q", "v")), ("v", (0, 2, 1, 0), ("q", "k"))):
        top = result.top(kind, 2)
        assert (top[0]["sender_layer"], top[0]["sender_head"], top[0]["receiver_layer"], top[0]["receiver_head"]) == pair
        assert top[0]["weight_z"] > 10 and top[0]["weight_z"] > top[1]["weight_z"] + 5, top
        for other in others:
            assert abs(z[other][pair]) < 3, (kind, other, z[other][pair])


def test_random_model_scores_look_like_the_baseline():
    """HookedViT's random init (i.i.d. weights, unit LayerNorm): z is roughly standard."""
    model = HookedViT(ViTConfig(d_model=64, n_layers=4, n_heads=4, d_head=16, d_mlp=8, patch_size=(4, 4), img_size=(16, 16)))
    model.init_weights(generator=torch.Generator().manual_seed(0))
    result = composition_scores(model, CompositionConfig(n_baseline_samples=200))
    for kind in result.kinds:
        z = result.z(kind)
        z = z[~np.isnan(z)]
        assert z.size == 6 * 16
        assert np.abs(z).max() < 5, kind
        assert abs(z.mean()) < 0.5 and 0.7 < z.std() < 1.4, (kind, z.mean(), z.std())


def test_baseline_mean_for_vit_base_shapes():
    baseline = random_baseline(768, 64, CompositionConfig(n_baseline_samples=200))
    assert set(baseline) == {"q", "k", "v"}
    for kind, (mean, std) in baseline.items():
        assert 0.03 < mean < 0.045 and abs(mean - 768**-0.5) < 0.003, (kind, mean)
        assert 0 < std < 0.01, (kind, std)


def test_layer_norm_is_folded_internally():
    model = small_model(seed=3)  # LN weights and biases are random, far from (1, 0)
    assert (model.blocks[1].ln1.weight - 1).abs().max() > 0.3
    raw, folded = composition_scores(model, FAST), composition_scores(fold_layer_norm(model), FAST)
    unscaled = small_model(seed=3)  # same weights without the ln1 scales: different scores
    with torch.no_grad():
        for block in unscaled.blocks:
            block.ln1.weight.fill_(1.0)
    other = composition_scores(unscaled, FAST)
    for kind in raw.kinds:
        np.testing.assert_allclose(raw.scores(kind), folded.scores(kind), atol=1e-6, equal_nan=True)
        assert np.nanmax(np.abs(raw.scores(kind) - other.scores(kind))) > 0.01, kind


def test_rows_top_and_options():
    model = small_model(seed=4)
    result = composition_scores(model, CompositionConfig(n_baseline_samples=20, include_positional=False))
    assert result.kinds == ("q", "k", "v") and result.pos_q_LHLH is None and result.pos_k_LHLH is None
    rows = list(result.rows())
    assert len(rows) == 3 * 3 * 16 and all(tuple(row) == COMPOSITION_COLUMNS for row in rows)
    assert all(row["receiver_layer"] > row["sender_layer"] for row in rows)
    row = next(r for r in rows if r["kind"] == "k")
    assert row["weight_score"] == result.k_LHLH[row["sender_layer"], row["sender_head"], row["receiver_layer"], row["receiver_head"]]
    assert row["weight_z"] == pytest.approx((row["weight_score"] - row["baseline_mean"]) / row["baseline_std"])
    top = result.top("v", 5)
    assert [r["weight_score"] for r in top] == sorted((r["weight_score"] for r in rows if r["kind"] == "v"), reverse=True)[:5]
    assert len(result.top("q", 1000)) == 48
    with pytest.raises(KeyError):
        result.scores("pos_q")


def test_zero_head_scores_are_zero_and_flagged_silent():
    model = small_model(seed=6)
    with torch.no_grad():
        model.blocks[1].attn.qkv.weight.view(3, 4, 12, 48)[2, 2] = 0  # W_V of head (1, 2): W_OV = 0
    result = composition_scores(model, CompositionConfig(n_baseline_samples=20, include_positional=False))
    for kind in result.kinds:
        assert (result.scores(kind)[1, 2, 2] == 0).all() and result.silent[kind][1, 2, 2].all()
        assert (result.scores(kind)[1, 1, 2] > 0).all() and not result.silent[kind][1, 1, 2].any()
    # as a receiver, a zero W_V silences only its V-composition
    assert (result.v_LHLH[0, :, 1, 2] == 0).all() and result.silent["v"][0, :, 1, 2].all()
    assert (result.q_LHLH[0, :, 1, 2] > 0).all() and not result.silent["q"][0, :, 1, 2].any()
    rows = list(result.rows())
    assert not any(np.isnan(r["weight_score"]) or np.isnan(r["weight_z"]) for r in rows)
    assert sum(r["silent"] for r in rows) == 3 * 4 + 4  # (1, 2) as sender into layer 2 (3 kinds x 4), as V receiver of layer 0
