"""The composition stage recovers planted circuits with the right kinds and verdicts, rejects
decoys, and finds nothing supported in a random model."""
import csv
import io
import json

import numpy as np
import torch

from vitcircuits.composition.outputs import write_composition
from vitcircuits.composition.scan import ComposeConfig, run_composition
from vitcircuits.composition.shuffle import shuffle_patches
from vitcircuits.heads.atlas import AtlasConfig, accumulate, build_atlas, new_accumulator
from vitcircuits.testing.planted import PlantedConfig, random_like
from vitcircuits.testing.planted_circuits import CIRCUIT_CONFIG, build_planted_circuits


def images(n=16, seed=0, size=32):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def compose(model, x):
    acc = new_accumulator(model, AtlasConfig(n_boot=10))
    accumulate(model, acc, x, list(range(len(x))))
    atlas = build_atlas(model, acc, AtlasConfig(n_boot=10), "test")
    return run_composition(model, lambda: (x[i : i + 8] for i in range(0, len(x), 8)), atlas, ComposeConfig())


def test_planted_circuits_recovered_with_kinds_and_shuffle_reading(tmp_path):
    planted = build_planted_circuits(CIRCUIT_CONFIG)
    result = compose(planted.model, images())
    by_edge = {(*c["senders"][0], *c["receivers"][0], c["kind"]): c for c in result.circuits}
    for (sl, sh, rl, rh), kind in planted.edges.items():
        circuit = by_edge[(sl, sh, rl, rh, kind)]
        assert circuit["verdict"] == "supported", circuit
        reading = "positional" if kind == "v" else "content-matching"  # the V receiver attends by position
        assert circuit["shuffle_reading"] == reading
    (sl, sh, rl, rh), = [e for e, kind in planted.edges.items() if kind == "k"]
    k_scores = result.scores.scores("k")
    # top-ranked among all K pairs; only the inert decoy, built with the same weights, may tie it
    (dl, dh, drl, drh), = planted.decoy_edges
    others = k_scores.copy()
    others[sl, sh, rl, rh] = others[dl, dh, drl, drh] = np.nan
    assert k_scores[sl, sh, rl, rh] > np.nanmax(others)
    k_rows = [c for c in result.candidates if (c["receiver_layer"], c["receiver_head"]) == (rl, rh)]
    top = max(k_rows, key=lambda c: c["patch_effect"] if c["kind"] != "v" else 0)
    assert (top["sender_layer"], top["sender_head"], top["kind"]) == (sl, sh, "k")
    for (sl, sh, rl, rh), kind in planted.decoy_edges.items():
        decoy = by_edge.get((sl, sh, rl, rh, kind))
        assert decoy is None or decoy["verdict"] != "supported"
        assert decoy is None or decoy["evidence"]["weight_score"]["z"] > 3  # composition-looking weights
    supported = {(*c["senders"][0], *c["receivers"][0], c["kind"]) for c in result.circuits if c["verdict"] == "supported"}
    assert supported == {(*e, k) for e, k in planted.edges.items()}
    write_composition(tmp_path, result, 2, CIRCUIT_CONFIG.n_heads)
    data = json.loads((tmp_path / "circuits.json").read_text())
    assert data["ablation"] == "mean" and data["circuits"][0]["verdict"] == "supported"
    header = (tmp_path / "composition.csv").read_text().splitlines()[0]
    for column in ("weight_score", "baseline_mean", "baseline_std", "weight_z", "attribution", "patch_effect", "shuffle_effect"):
        assert column in header
    # attribution ranks the patched triples like exact patching does, and points at nothing outside them
    assert data["attribution"]["spearman_top"] > 0.95 and data["attribution"]["n_patched_triples"] == 3 * 6 * 6
    rows = list(csv.DictReader(io.StringIO((tmp_path / "composition.csv").read_text())))
    k_rows = [r for r in rows if r["kind"] == "k" and r["receiver_layer"] == "1" and r["receiver_head"] == "0"]
    assert max(k_rows, key=lambda r: abs(float(r["attribution"])))["sender_head"] == "0"  # the planted K edge L0H0 → L1H0


def test_random_weight_model_has_no_supported_circuit():
    model = random_like(PlantedConfig(n_layers=3)).model
    result = compose(model, images(seed=1))
    assert result.circuits, "the fallback senders should still be tested"
    assert not [c for c in result.circuits if c["verdict"] == "supported"]


def test_shuffle_keeps_patches_and_moves_them():
    x = images(2, size=32)
    y = shuffle_patches(x, (4, 4), torch.Generator().manual_seed(0))
    patches = lambda t: t.unfold(2, 4, 4).unfold(3, 4, 4).reshape(2, 3, 64, 16).permute(0, 2, 1, 3).reshape(2, 64, -1)  # noqa: E731
    a, b = patches(x), patches(y)
    for i in range(2):
        assert sorted(map(tuple, a[i].tolist())) == sorted(map(tuple, b[i].tolist()))
    assert not torch.equal(x, y)
