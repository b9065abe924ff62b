"""Ground-truth benchmark: the scoring functions on hand cases, the planted family's construction,
and the small benchmark run through ``bench/ground_truth.py`` with its goals asserted."""
import importlib.util
import itertools
import json
import math
from functools import cache
from pathlib import Path

import numpy as np
import pytest
import torch

from vitcircuits.models.loading import bundled_model_folder
from vitcircuits.testing.ground_truth import SCORED_KINDS, noise_images, roc_auc, score_edges, score_kinds
from vitcircuits.testing.planted import PlantedConfig
from vitcircuits.testing.planted_circuits import build_planted_circuits
from vitcircuits.testing.planted_family import (
    FILLER,
    FamilyConfig,
    FamilyMember,
    _rearrange,
    build_family_member,
    family,
)

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
        return {"layer": layer, "head": head, "kind": kind, "modular_score": modular, "peak_dy": peak[0], "peak_dx": peak[1],
                "peak_mass": peak_mass, "self_mass": self_mass, "cls_mass": cls, "dist_mass": 0.0, "register_mass": 0.0}
    rows = [row(0, 0, "modular", modular=0.9), row(0, 1, "modular", modular=0.6), row(0, 2, "directional", peak=(0, -1), peak_mass=1.0),
            row(0, 3, "self", self_mass=1.0, peak_mass=1.0), row(0, 4, "modular", modular=0.95)]
    truth = {(0, 0): "modular", (0, 1): "other", (0, 2): "directional", (0, 3): "self", (0, 4): None}  # (0, 4) unscored
    out = score_kinds(truth, rows)
    assert (out["modular"]["tp"], out["modular"]["fp"], out["modular"]["fn"]) == (1, 1, 0)
    assert out["modular"]["precision"] == 0.5 and out["modular"]["roc_auc"] == 1.0
    assert out["modular"]["mislabelled"] == [[0, 1, "other", "modular"]]
    assert out["directional"]["roc_auc"] == 1.0  # the self head's peak is at (0, 0): score 0
    assert out["self"]["recall"] == 1.0 and math.isnan(out["cls/sink"]["recall"])


DEEP = FamilyConfig(grid=(5, 6), n_layers=4, n_heads=8, sender_layer=1, class_token=False, registers=2,
                    inert_decoys=("k", "q", "v"), local_decoys=2, seed=3)


@cache
def deep_member() -> FamilyMember:
    return build_family_member(DEEP)


def test_family_positional_heads_hit_their_targets_at_depth():
    member = deep_member()
    images = torch.cat([noise_images(member, 8), 3 * noise_images(member, 8, seed=1)])
    _, cache_ = member.model.run_with_cache(images, names_filter=lambda n: n.endswith("hook_pattern"))
    patches = slice(member.layout.patch_start, None)
    assert {layer for layer, _ in member.target_masks} == {1, 2}
    assert set(member.truth_heads) <= set(member.target_masks)
    for (layer, head), mask_NN in member.target_masks.items():
        mass = (cache_[f"blocks.{layer}.attn.hook_pattern"][:, head, patches] * mask_NN[patches]).sum(-1).min()
        assert mass >= MIN_MASS, (layer, head, member.head_roles[(layer, head)], float(mass))
    for (layer, head), role in member.head_roles.items():  # fillers attend almost uniformly
        if role == FILLER:
            assert cache_[f"blocks.{layer}.attn.hook_pattern"][:, head].amax() < 0.2, (layer, head)


def test_family_receivers_read_exactly_their_edges_and_fillers_read_no_head():
    member = deep_member()
    model, H = member.model, DEEP.n_heads
    expected = {**member.edges, **member.decoy_edges}
    assert len(member.edges) == 3 and sorted(member.decoy_edges.values()) == ["k", "q", "v"]
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
                                     {"class_token": False}, {"registers": 16, "grid": (4, 4)}, {"inert_decoys": ("x",)}])
def test_bad_family_configs_are_rejected(changes):
    with pytest.raises(ValueError):
        FamilyConfig(**changes)


def _bench():
    spec = importlib.util.spec_from_file_location("bench_ground_truth", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


@pytest.mark.slow
def test_small_organism_benchmark_meets_the_goal(capsys):
    """The organism's causal edges, re-measured on 240 fresh images, agree with the bundled truth,
    and the composition stage's task-level patching ranks them (ROC-AUC goal 0.95)."""
    summary = _bench().main(["--organism", "--small"])
    assert "ROC-AUC by causal threshold" in capsys.readouterr().out
    task = summary["detectors"]["task_effect"]
    assert task["n_pos"] >= 3 and task["n_neg"] > 200 and task["roc_auc"] >= 0.95, task
    bundled = json.loads((bundled_model_folder("shapes-vit") / "truth.json").read_text())
    assert summary["true_edges"][0][:5] == bundled["edges"][0]["edge"], "the strongest edge should be the bundled truth's"
    assert all(aucs["task_effect"] >= 0.95 for aucs in summary["auc_by_threshold"].values())


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
    assert verdict["n_pos"] == 9 and (verdict["precision"], verdict["recall"]) == (1.0, 1.0), verdict
    assert summary["edges"]["patch_z"]["auc_min"] >= 0.95
    for name in ("weight_z", "attribution", "patch_z"):
        assert summary["edges"][name]["n_unscored_pos"] == 0
    for member in summary["members"]:
        assert member["decoy_verdicts"] and all(d[-1] != "supported" for d in member["decoy_verdicts"]), member["decoy_verdicts"]
        assert member["sender_layers"][0] == member["sender_layer"]
