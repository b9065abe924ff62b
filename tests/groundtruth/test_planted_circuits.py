"""Planted composition circuits: mean-ablation path patching finds each real edge through its
documented input only, the decoys show no effect although one of them composes by weights, the
class-token receiver composes at the class token's query only, the receivers read exactly the
slices the truth tables say, and layer 0 is untouched."""
from functools import cache

import pytest
import torch

from vitcircuits.composition.ablation import ZStats
from vitcircuits.composition.patching import (
    METRICS,
    PATHS,
    PatchEffects,
    PatchingConfig,
    path_patch_batch,
)
from vitcircuits.groundtruth.planted import PlantedConfig, build_planted_heads
from vitcircuits.groundtruth.planted_circuits import (
    CIRCUIT_CONFIG,
    CLS_K_RECEIVER,
    INERT_DECOY,
    K_RECEIVER,
    LOCAL_DECOY,
    V_RECEIVER,
    PlantedCircuitModel,
    build_planted_circuits,
)

CONFIGS = {
    "8x8-cls": CIRCUIT_CONFIG,
    "6x9-registers-no-cls": PlantedConfig(grid=(6, 9), class_token=False, registers=2, n_heads=7, offsets=((0, -1), (1, 1)),
                                          content_scale=0.01),
}
MIN_MASS = 0.95
N_IMAGES = 16
INERT = {"js": 1e-5, "rel_out": 1e-2}
"""Largest effect of any kind at patch queries that counts as none (the ablation still moves every
``ln1`` normalisation by a relative ``O(|c|^2)``). The planted roles are defined at patch queries;
what a planted head does at the class token's query is left to chance."""


def noise_images(planted: PlantedCircuitModel, scale: float = 1.0) -> torch.Tensor:
    """``[N_IMAGES, 3, H, W]`` seeded Gaussian pixels of standard deviation ``scale``."""
    return scale * torch.randn(N_IMAGES, 3, *planted.model.cfg.img_size, generator=torch.Generator().manual_seed(0))


@cache
def circuits(name: str) -> PlantedCircuitModel:
    return build_planted_circuits(CONFIGS[name])


CLS_CONFIG = PlantedConfig(grid=(5, 6), content_scale=0.01)
CLS_ROLES = (K_RECEIVER, CLS_K_RECEIVER, V_RECEIVER)


@cache
def patched(with_cls: bool = False) -> tuple[PlantedCircuitModel, torch.Tensor]:
    """The default circuits model (or a smaller one with a class-token receiver) and its mean-ablation
    path-patching effects ``[sender head, path, receiver head, metric]`` from every layer-0 head into
    layer 1 (patching is the slow part of this file)."""
    planted = build_planted_circuits(CLS_CONFIG, roles=CLS_ROLES) if with_cls else circuits("8x8-cls")
    model, images_BCHW = planted.model, noise_images(planted)
    stats = ZStats.empty(model)
    stats.update(model, images_BCHW)
    senders = [(0, head) for head in range(model.cfg.n_heads)]
    effects = PatchEffects(senders, model.cfg.n_layers, model.cfg.n_heads)
    path_patch_batch(model, images_BCHW, senders, effects, stats, PatchingConfig(ablation="mean"))
    return planted, effects.mean()[:, :, 1]


def effect(effects_SPHM: torch.Tensor, sender: int, path: str, receiver: int, metric: str) -> float:
    return float(effects_SPHM[sender, PATHS.index(path), receiver, METRICS.index(metric)])


def comp(A: torch.Tensor, B: torch.Tensor) -> float:
    """``||A B||_F / (||A||_F ||B||_F)``."""
    return float((A @ B).norm() / (A.norm() * B.norm()))


def test_attention_edges_act_through_their_input_only():
    planted, effects_SPHM = patched()
    attention_edges = {key: kind for key, kind in planted.edges.items() if kind in ("q", "k")}
    assert sorted(attention_edges.values()) == ["k", "q"]
    for (_, sender, _, receiver), kind in attention_edges.items():
        for metric in ("js", "rel_out"):
            via_edge = effect(effects_SPHM, sender, kind, receiver, metric)
            others = [effect(effects_SPHM, s, path, receiver, metric)
                      for s in range(effects_SPHM.shape[0]) for path in PATHS if (s, path) != (sender, kind)]
            assert via_edge > 10 * max(others), (kind, metric, via_edge, max(others))
        assert effect(effects_SPHM, sender, kind, receiver, "js") > 0.2
        assert effect(effects_SPHM, sender, kind, receiver, "rel_out") > 0.5


def test_v_edge_moves_the_sender_output_without_touching_the_pattern():
    planted, effects_SPHM = patched()
    ((_, sender, _, receiver),) = [key for key, kind in planted.edges.items() if kind == "v"]
    assert effect(effects_SPHM, sender, "v", receiver, "rel_out") > 0.5
    for path in ("q", "k"):
        assert effect(effects_SPHM, sender, path, receiver, "js") < INERT["js"]
    for other in range(effects_SPHM.shape[0]):
        if other != sender:
            assert effect(effects_SPHM, other, "v", receiver, "rel_out") < INERT["rel_out"]


def test_decoys_have_no_path_patching_effect():
    planted, effects_SPHM = patched()
    for role in (LOCAL_DECOY, INERT_DECOY):
        _, receiver = planted.receiver(role)
        for metric, largest in INERT.items():
            assert effects_SPHM[:, :, receiver, METRICS.index(metric)].abs().max() < largest, (role, metric)


def test_class_token_receiver_composes_at_the_class_query_only():
    """Mean-ablating the modular head makes the class query's attention uniform (large
    ``js_prefix`` through K) and leaves every patch query exactly as it was; no other path moves it."""
    planted, effects_SPHM = patched(with_cls=True)
    _, receiver = planted.receiver(CLS_K_RECEIVER)
    ((sender, kind),) = [(s, k) for (_, s, _, r), k in planted.edges.items() if r == receiver]
    assert kind == "k" and planted.truth_heads[(0, sender)] == "modular"
    assert effect(effects_SPHM, sender, "k", receiver, "js_prefix") > 0.2
    assert effect(effects_SPHM, sender, "k", receiver, "rel_out_prefix") > 0.5
    for metric, largest in INERT.items():  # patch queries attend uniformly whatever the keys hold
        assert effects_SPHM[:, :, receiver, METRICS.index(metric)].abs().max() < largest, metric
    others = [effect(effects_SPHM, s, path, receiver, "js_prefix") for s in range(effects_SPHM.shape[0]) for path in PATHS if (s, path) != (sender, "k")]
    assert max(others) < INERT["js"]
    images_BCHW = noise_images(planted)
    _, cache_ = planted.model.run_with_cache(images_BCHW, names_filter="blocks.1.attn.hook_pattern")
    pattern_BQK = cache_["blocks.1.attn.hook_pattern"][:, receiver]
    uniform = torch.full_like(pattern_BQK[:, 1:], 1 / pattern_BQK.shape[-1])
    torch.testing.assert_close(pattern_BQK[:, 1:], uniform, rtol=1e-3, atol=0)  # patch queries: up to ln1's O(|c|^2)
    assert pattern_BQK[:, 0].amax(-1).min() > 0.2  # the class query concentrates on a few keys


def test_class_token_receiver_needs_a_class_token():
    with pytest.raises(ValueError, match="class_token"):
        build_planted_circuits(PlantedConfig(class_token=False, registers=1), roles=CLS_ROLES)


@pytest.mark.parametrize("name", CONFIGS)
def test_inert_decoy_composes_by_weights_like_the_real_k_edge(name):
    planted = circuits(name)
    model = planted.model
    W_OV_HDD = model.W_V[0] @ model.W_O[0]
    W_QK_HDD = model.W_Q[1] @ model.W_K[1].transpose(-1, -2)
    (((_, sink, _, decoy), decoy_kind),) = planted.decoy_edges.items()
    ((_, sender, _, receiver),) = [key for key, kind in planted.edges.items() if kind == "k"]
    assert decoy_kind == "k"
    decoy_score = comp(W_OV_HDD[sink], W_QK_HDD[decoy].T)
    assert decoy_score == pytest.approx(comp(W_OV_HDD[sender], W_QK_HDD[receiver].T), rel=1e-4)
    assert comp(W_OV_HDD[sink], W_QK_HDD[decoy]) < 1e-6  # no Q-composition
    assert comp(W_OV_HDD[sink], model.W_V[1, decoy] @ model.W_O[1, decoy]) < 1e-6  # no V-composition
    D, Dh = model.cfg.d_model, model.cfg.d_head
    generator = torch.Generator().manual_seed(0)
    random_W_QK = [torch.randn(D, Dh, generator=generator) @ torch.randn(D, Dh, generator=generator).T for _ in range(20)]
    baseline = max(comp(W_OV_HDD[sink], W_QK.T) for W_QK in random_W_QK)
    assert decoy_score > 3 * baseline, (decoy_score, baseline)


@pytest.mark.parametrize("name", CONFIGS)
def test_receivers_read_exactly_the_slices_of_their_edges(name):
    planted = circuits(name)
    model, H = planted.model, planted.config.n_heads
    assert planted.receivers == sorted(planted.roles) and len(planted.receivers) == 5
    assert set(planted.truth_heads) == {(0, head) for head in range(len(planted.config.planted_kinds))}
    expected = {**planted.edges, **planted.decoy_edges}
    weights = {"q": model.W_Q[1], "k": model.W_K[1], "v": model.W_V[1]}
    for _, receiver in planted.receivers:
        for kind, W_HDd in weights.items():
            read = {sender for sender in range(H) if W_HDd[receiver, planted.planted.out_slice(0, sender)].abs().amax() > 0}
            assert read == {s for (_, s, _, r), k in expected.items() if (r, k) == (receiver, kind)}, (receiver, kind)


@pytest.mark.parametrize("name", CONFIGS)
def test_layer0_is_the_planted_model_and_positional_receivers_hit_their_targets(name):
    planted = circuits(name)
    heads_only = build_planted_heads(planted.config)
    images_BCHW = torch.cat([noise_images(planted), noise_images(planted, scale=3.0)])
    _, cache_ = planted.model.run_with_cache(images_BCHW, names_filter=lambda n: n.endswith("hook_pattern"))
    _, reference = heads_only.model.run_with_cache(images_BCHW, names_filter="blocks.0.attn.hook_pattern")
    torch.testing.assert_close(cache_["blocks.0.attn.hook_pattern"], reference["blocks.0.attn.hook_pattern"], rtol=0, atol=0)
    patches = slice(planted.model.layout.patch_start, None)
    for (layer, head), mask_NN in {**planted.planted.target_masks, **planted.receiver_masks}.items():
        pattern_BNN = cache_[f"blocks.{layer}.attn.hook_pattern"][:, head, patches]
        mass = (pattern_BNN * mask_NN[patches]).sum(-1).min()
        assert mass >= MIN_MASS, (layer, head, float(mass))


@pytest.mark.parametrize("changes", [{"n_layers": 1}, {"offsets": (), "n_heads": 4}])
def test_too_small_configs_are_rejected(changes):
    with pytest.raises(ValueError, match="planted circuits need"):
        build_planted_circuits(PlantedConfig(**changes))
