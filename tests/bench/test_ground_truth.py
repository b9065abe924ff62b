"""Ground-truth benchmark: the scoring functions on hand cases, the planted family's construction,
and the small benchmark run through ``bench/ground_truth.py`` with its goals asserted."""
import importlib.util
import itertools
import json
import math
from dataclasses import replace
from functools import cache
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from vitcircuits.groundtruth.ground_truth import SCORED_KINDS, noise_images, roc_auc, score_edges, score_kinds
from vitcircuits.groundtruth.organism_benchmark import SHAPES_ORGANISMS
from vitcircuits.groundtruth.planted import PlantedConfig
from vitcircuits.groundtruth.planted_circuits import build_planted_circuits
from vitcircuits.groundtruth.planted_family import (
    FILLER,
    OTHER,
    FamilyConfig,
    FamilyMember,
    _rearrange,
    build_family_member,
    family,
)
from vitcircuits.models.loading import bundled_model_folder

BENCH = Path(__file__).resolve().parents[2] / "bench" / "ground_truth.py"
MIN_MASS = 0.95


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: more threads only add overhead on a busy machine
    yield
    torch.set_num_threads(threads)


def brute_force_auc(labels, scores) -> float:
    pos = [s for y, s in zip(labels, scores) if y]
    neg = [s for y, s in zip(labels, scores) if not y]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


@pytest.mark.parametrize("seed", range(5))
def test_roc_auc_matches_pairwise_count_with_ties(seed):
    rng = np.random.default_rng(seed)
    labels = rng.random(40) < 0.3
    labels[:2] = [True, False]
    scores = rng.integers(0, 6, size=40).astype(float)  # many ties
    assert roc_auc(labels, scores) == pytest.approx(brute_force_auc(labels, scores), abs=1e-12)


def test_roc_auc_edge_cases():
    assert roc_auc([1, 1, 0, 0], [3, 2, 1, 0]) == 1.0
    assert roc_auc([0, 0, 1, 1], [3, 2, 1, 0]) == 0.0
    assert roc_auc([1, 0], [5, 5]) == 0.5
    assert roc_auc([1, 0, 0], [float("nan"), -1.0, float("-inf")]) == 0.25  # NaN ranks as -inf: ties the -inf negative
    assert math.isnan(roc_auc([1, 1], [0.0, 1.0])) and math.isnan(roc_auc([], []))


def test_score_edges_hand_case():
    a, b, c, d, e = ((0, h, 1, 0, "k") for h in range(5))
    scores = {a: 0.9, c: 0.9, d: 0.1, e: 0.6}  # b (a positive) was never scored
    out = score_edges([a, b], [b, c, d, e], scores, threshold=0.5)  # b in both lists: it is a positive
    assert (out["n_pos"], out["n_neg"], out["n_unscored_pos"], out["n_unscored_neg"]) == (2, 3, 1, 0)
    assert (out["tp"], out["fp"], out["fn"], out["tn"]) == (1, 2, 1, 1)
    assert out["precision"] == pytest.approx(1 / 3) and out["recall"] == 0.5
    # pairs: a~c tie (0.5), a>d, a>e; b (-inf) loses to all three
    assert out["roc_auc"] == pytest.approx(2.5 / 6)
    assert "precision" not in score_edges([a], [c], scores)
    assert math.isnan(score_edges([a], [c], {c: 0.0}, threshold=0.5)["precision"])  # nothing predicted


def test_score_kinds_hand_case():
    def row(layer, head, kind, modular=0.0, peak=(0, 0), peak_mass=0.0, self_mass=0.0, cls=0.0):
        return SimpleNamespace(layer=layer, head=head, kind=kind, modular_score=modular, peak_dy=peak[0], peak_dx=peak[1],
                               peak_mass=peak_mass, self_mass=self_mass, cls_mass=cls, dist_mass=0.0, register_mass=0.0)
    rows = [row(0, 0, "modular", modular=0.9), row(0, 1, "modular", modular=0.6), row(0, 2, "directional", peak=(0, -1), peak_mass=1.0),
            row(0, 3, "self", self_mass=1.0, peak_mass=1.0), row(0, 4, "modular", modular=0.95)]
    truth = {(0, 0): "modular", (0, 1): "other", (0, 2): "directional", (0, 3): "self", (0, 4): None}  # (0, 4) unscored
    out = score_kinds(truth, rows)
    assert (out["modular"]["tp"], out["modular"]["fp"], out["modular"]["fn"]) == (1, 1, 0)
    assert out["modular"]["precision"] == 0.5 and out["modular"]["roc_auc"] == 1.0
    assert out["modular"]["mislabelled"] == [[0, 1, "other", "modular"]]
    assert out["directional"]["roc_auc"] == 1.0  # the self head's peak is at (0, 0): score 0
    assert out["self"]["recall"] == 1.0 and math.isnan(out["cls/sink"]["recall"])


MEMBERS = {
    "deep": FamilyConfig(grid=(5, 6), n_layers=4, n_heads=8, sender_layer=1, class_token=False, registers=2,
                         inert_decoys=("k", "q", "v"), local_decoys=2, seed=3),
    "narrow": FamilyConfig(grid=(5, 6), n_layers=4, n_heads=8, sender_layer=1, class_token=False, registers=2, edges=("k", "v"),
                           inert_decoys=("k", "q", "v"), local_decoys=2, heads_kept=2, seed=3),
    "cls-silent": FamilyConfig(grid=(4, 5), n_layers=3, n_heads=8, sender_layer=1, cls_edges=("k",), silent_fillers=True, seed=5),
}
"""Members whose construction is checked: deep with every decoy, two heads per layer (the decoys do
not fit), and a class-token edge beside silent sender-layer fillers."""
EXPECTED_EDGES = {"deep": (["k", "q", "v"], ["k", "q", "v"]), "narrow": (["k", "v"], []), "cls-silent": (["k", "k", "q", "v"], ["k"])}
"""Member -> sorted kinds of its causal edges and of its decoy edges."""


@cache
def member_of(name: str) -> FamilyMember:
    return build_family_member(MEMBERS[name])


@pytest.mark.parametrize("name", MEMBERS)
def test_family_positional_heads_hit_their_targets_at_depth(name):
    member = member_of(name)
    images = torch.cat([noise_images(member, 8), 3 * noise_images(member, 8, seed=1)])
    _, cache_ = member.model.run_with_cache(images, names_filter=lambda n: n.endswith("hook_pattern"))
    patches = slice(member.layout.patch_start, None)
    assert {layer for layer, _ in member.target_masks} == {member.sender_layer, member.receiver_layer}
    assert set(member.truth_heads) <= set(member.target_masks)
    for (layer, head), mask_NN in member.target_masks.items():
        mass = (cache_[f"blocks.{layer}.attn.hook_pattern"][:, head, patches] * mask_NN[patches]).sum(-1).min()
        assert mass >= MIN_MASS, (layer, head, member.head_roles[(layer, head)], float(mass))
    for (layer, head), role in member.head_roles.items():  # fillers attend almost uniformly
        if role == FILLER:
            assert cache_[f"blocks.{layer}.attn.hook_pattern"][:, head].amax() < 0.2, (layer, head)


@pytest.mark.parametrize("name", MEMBERS)
def test_family_receivers_read_exactly_their_edges_and_fillers_read_no_head(name):
    member = member_of(name)
    model, H = member.model, member.model.cfg.n_heads
    expected = {**member.edges, **member.decoy_edges}
    assert (sorted(member.edges.values()), sorted(member.decoy_edges.values())) == EXPECTED_EDGES[name]
    weights = {"q": model.W_Q, "k": model.W_K, "v": model.W_V}
    for (layer, head), role in member.head_roles.items():
        for kind, W_LHDd in weights.items():
            read = {(sl, sh) for sl in range(layer) for sh in range(H) if W_LHDd[layer, head, member.out_slice(sl, sh)].abs().amax() > 0}
            want = {(sl, sh) for (sl, sh, rl, rh), k in expected.items() if (rl, rh, k) == (layer, head, kind)}
            assert read == want, (layer, head, role, kind)
    for (layer, head), role in member.head_roles.items():  # every head writes its own slice only
        W_O_dD = model.W_O[layer, head]
        assert W_O_dD[:, member.out_slice(layer, head)].abs().amax() > 0
        others = torch.ones(model.cfg.d_model, dtype=torch.bool)
        others[member.out_slice(layer, head)] = False
        assert W_O_dD[:, others].abs().amax() == 0, (layer, head, role)


def test_narrow_member_keeps_the_planted_heads_of_the_full_member():
    """Two heads per layer: the planted edges' senders and receivers, the first filler-layer heads;
    each a copy of its full-width head (weights, slice, role, truth) in the seeded head order."""
    narrow = member_of("narrow")
    full = build_family_member(replace(MEMBERS["narrow"], heads_kept=None))
    assert narrow.model.cfg.n_heads == 2 and narrow.model.cfg.d_head == full.model.cfg.d_head
    assert narrow.model.cfg.d_model == full.model.cfg.d_model
    kept = narrow.kept_heads
    assert kept[0] == kept[3] == (0, 1)
    ends = {head for key in full.edges for head in (key[:2], key[2:])}
    assert {(layer, head) for layer in (1, 2) for head in kept[layer]} == ends
    assert all(list(heads) == sorted(heads) for heads in kept)
    new = {(layer, full_head): (layer, head) for layer, heads in enumerate(kept) for head, full_head in enumerate(heads)}
    assert narrow.edges == {(*new[key[:2]], *new[key[2:]]): kind for key, kind in full.edges.items()}
    assert narrow.decoy_edges == {} and narrow.unscored_heads == {new[head] for head in full.unscored_heads}
    for (layer, full_head), (_, head) in new.items():
        assert narrow.out_slice(layer, head) == full.out_slice(layer, full_head)
        assert narrow.head_roles[(layer, head)] == full.head_roles[(layer, full_head)]
        assert narrow.kind_truth(layer, head) == full.kind_truth(layer, full_head)
        for weight in ("W_Q", "W_K", "W_V", "W_O"):
            torch.testing.assert_close(getattr(narrow.model, weight)[layer, head], getattr(full.model, weight)[layer, full_head], rtol=0, atol=0)
    for name, value in full.model.state_dict().items():
        if not name.endswith(("attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight")):
            assert torch.equal(narrow.model.state_dict()[name], value), name


def test_silent_fillers_write_nothing():
    member = member_of("cls-silent")
    layer = member.sender_layer
    fillers = [head for (lay, head), role in member.head_roles.items() if role == FILLER and lay == layer]
    assert len(fillers) == 2
    _, cache_ = member.model.run_with_cache(noise_images(member, 4), names_filter=f"blocks.{layer}.attn.hook_z")
    for head in fillers:
        assert member.model.W_V[layer, head].abs().amax() == 0 and cache_[f"blocks.{layer}.attn.hook_z"][:, :, head].abs().amax() == 0
        assert member.kind_truth(layer, head) == OTHER
    later = [(lay, head) for (lay, head), role in member.head_roles.items() if role == FILLER and lay != layer]
    assert later and all(member.model.W_V[lay, head].abs().amax() > 0 for lay, head in later)


def test_family_varies_with_the_seed():
    members = family(range(4), FamilyConfig(n_heads=8))
    placements = {tuple(sorted(m.head_roles.items())) for m in members}
    offsets = {tuple(sorted(m.offsets.values())) for m in members}
    assert len(placements) == 4 and len(offsets) > 1
    content = [m.model.embed.proj.weight[m.content_slice] for m in members]
    assert not torch.equal(content[0], content[1])
    for m in members:
        assert sorted(m.truth_heads.values()).count("directional") == 3  # two senders and the V receiver
        assert m.unscored_heads == {m.receiver("k_composition"), m.receiver("q_composition")}


def test_head_permutation_preserves_function():
    built = build_planted_circuits(PlantedConfig(grid=(4, 5), n_heads=6, content_scale=0.01))
    images = torch.randn(4, 3, 16, 20, generator=torch.Generator().manual_seed(0))
    _, before = built.model.run_with_cache(images, names_filter=lambda n: n.endswith("hook_pattern"))
    perms = [[3, 0, 5, 1, 4, 2], [1, 2, 0, 5, 3, 4]]
    _rearrange(built.model, built.planted.out_slice, [0, 1], perms)
    _, after = built.model.run_with_cache(images, names_filter=lambda n: n.endswith("hook_pattern"))
    for layer, perm in enumerate(perms):
        torch.testing.assert_close(after[f"blocks.{layer}.attn.hook_pattern"], before[f"blocks.{layer}.attn.hook_pattern"][:, perm])


@pytest.mark.parametrize("changes", [{"grid": (3, 8)}, {"sender_layer": 1}, {"edges": ("k", "k")}, {"n_heads": 5},
                                     {"class_token": False}, {"registers": 16, "grid": (4, 4)}, {"inert_decoys": ("x",)},
                                     {"cls_edges": ("q",)}, {"cls_edges": ("k",), "class_token": False, "registers": 1},
                                     {"silent_fillers": True}, {"n_heads": 8, "heads_kept": 6, "silent_fillers": True}, {"heads_kept": 7}])
def test_bad_family_configs_are_rejected(changes):
    with pytest.raises(ValueError):
        FamilyConfig(**changes)


@pytest.mark.parametrize("changes", [{"heads_kept": 2}, {"edges": ("k",), "cls_edges": ("k",), "heads_kept": 1}])
def test_too_few_kept_heads_for_the_planted_edges_are_rejected(changes):
    with pytest.raises(ValueError, match="the planted edges .* need"):
        FamilyConfig(**changes)


def _bench():
    spec = importlib.util.spec_from_file_location("bench_ground_truth", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


@pytest.mark.slow
def test_small_organism_benchmark(capsys):
    """On every shapes organism, re-measured on 240 fresh images: the strongest causal edge is the
    bundled truth's; the stage's attribution and exact task-level checks rank the causal edges
    (ROC-AUC goal 0.95); and what the verdict supports is causal (precision goal 0.9). Recall is
    reported, not asserted: it misses the goal of 0.8 on two organisms (docs/findings.md)."""
    summaries = _bench().main(["--organism", "--small"])
    printed = capsys.readouterr().out
    assert "All organisms" in printed and "ROC-AUC by causal threshold" in printed
    assert sorted(summaries) == sorted(SHAPES_ORGANISMS)
    for name, summary in summaries.items():
        bundled = json.loads((bundled_model_folder(name.removeprefix("bundled:")) / "truth.json").read_text())
        assert summary["true_edges"][0][:5] == bundled["edges"][0]["edge"], name
        detectors = summary["detectors"]
        assert detectors["task_effect"]["n_pos"] >= 3 and detectors["task_effect"]["roc_auc"] >= 0.95, (name, detectors["task_effect"])
        assert detectors["attribution"]["roc_auc"] >= 0.95, (name, detectors["attribution"])
        assert detectors["verdict"]["tp"] >= 2 and detectors["verdict"]["precision"] >= 0.9, (name, detectors["verdict"])


def test_small_benchmark_recovers_the_planted_truth(capsys):
    summary = _bench().main(["--small"])
    printed = capsys.readouterr().out
    assert "Head kinds" in printed and '"edges"' in printed
    assert summary["n_models"] == 3
    for kind in SCORED_KINDS:
        k = summary["kinds"][kind]
        assert k["n_pos"] > 0 and (k["precision"], k["recall"]) == (1.0, 1.0), (kind, k)
        assert k["auc_min"] == 1.0, (kind, k)
    verdict = summary["edges"]["verdict"]
    assert verdict["n_pos"] == 8 and (verdict["precision"], verdict["recall"]) == (1.0, 1.0), verdict
    for name in ("composes", "attribution"):
        assert summary["edges"][name]["auc_min"] >= 0.95, (name, summary["edges"][name])
    for name in ("weight_z", "attribution", "composes"):
        assert summary["edges"][name]["n_unscored_pos"] == 0
    for member in summary["members"]:
        assert member["decoy_verdicts"] and all(d[-1] != "supported" for d in member["decoy_verdicts"]), member["decoy_verdicts"]
    assert [m["n_heads"] for m in summary["members"]] == [6, 2, 8]  # the second member keeps 2 of its 7 heads
