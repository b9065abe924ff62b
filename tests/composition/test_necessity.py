"""Circuit necessity: head selection, random same-layer baselines, accuracy per class group."""
import json
from types import SimpleNamespace

import numpy as np
import pytest
import timm
import torch

from vitcircuits.cli.necessity import parse_groups, parse_heads
from vitcircuits.composition.necessity import (
    LabelledBatches,
    NecessityConfig,
    circuit_heads,
    group_accuracy,
    necessity_report,
    random_heads_like,
)
from vitcircuits.models.loading import load_model
from vitcircuits.testing.checkpoints import save_timm_folder


def _circuit(senders, receivers, verdict):
    return {"senders": senders, "receivers": receivers, "verdict": verdict}


def test_circuit_heads_take_senders_and_receivers_of_supported_circuits_only():
    circuits = [_circuit([[0, 1]], [[2, 3]], "supported"), _circuit([[0, 2]], [[2, 3]], "supported"),
                _circuit([[1, 0]], [[3, 0]], "weak"), _circuit([[1, 1]], [[3, 1]], "none")]
    assert circuit_heads(circuits) == [(0, 1), (0, 2), (2, 3)]
    assert circuit_heads(circuits, ("supported", "weak")) == [(0, 1), (0, 2), (1, 0), (2, 3), (3, 0)]
    assert circuit_heads([]) == []


def test_random_heads_match_the_layers_and_avoid_the_circuit():
    circuit = [(0, 1), (0, 2), (3, 0)]
    for seed in range(20):
        heads = random_heads_like(circuit, 6, np.random.default_rng(seed))
        assert sorted(layer for layer, _ in heads) == [0, 0, 3] and not set(heads) & set(circuit) and len(set(heads)) == 3
    full_layer = [(1, h) for h in range(3)] + [(2, 0), (2, 1)]
    heads = random_heads_like(full_layer, 4, np.random.default_rng(0))
    layer1 = [h for h in heads if h[0] == 1]
    assert (1, 3) in layer1 and len(set(layer1)) == 3, "the one other head first, then circuit heads to make up the count"


def test_group_accuracy_counts_only_the_true_class():
    labels = torch.tensor([0, 0, 1, 2, 3, 3])
    predictions = torch.tensor([0, 1, 1, 2, 2, 3])
    report = group_accuracy(predictions, labels, {"a": [0, 1], "b": [2, 3]})
    assert report["overall"] == pytest.approx(4 / 6) and report["a"] == pytest.approx(2 / 3) and report["b"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="'empty' has no labelled image"):
        group_accuracy(predictions, labels, {"empty": [7]})


def test_a_group_without_images_is_left_out_with_its_reason(tmp_path):
    args = {"img_size": 16, "patch_size": 4, "embed_dim": 16, "depth": 2, "num_heads": 2, "num_classes": 4}
    folder = save_timm_folder(timm.create_model("vit_tiny_patch16_224", pretrained=False, **args), tmp_path, "vit_tiny_patch16_224", args)
    model = load_model(str(folder), device="cpu").model
    batches = [(torch.randn(6, 3, 16, 16), torch.tensor([0, 0, 1, 1, 2, 2]))]
    report = necessity_report(model, batches, [(0, 1)], {"present": [0, 1], "absent": [3]}, NecessityConfig(draws=3))
    assert list(report["groups"]) == ["present"] and "no labelled image" in report["groups_left_out"]["absent"]
    assert "absent" not in report["clean"] and json.loads(json.dumps(report, allow_nan=False)) == report


def test_labelled_batches_drop_unlabelled_images_and_reiterate():
    batch = lambda n, labels: SimpleNamespace(images_BCHW=torch.arange(n).float()[:, None], labels_B=labels)  # noqa: E731
    source = [batch(3, torch.tensor([3, -1, 2])), batch(2, None), batch(1, torch.tensor([-1]))]
    pairs = LabelledBatches(source)
    for _ in range(2):
        ((images, labels),) = list(pairs)
        assert images[:, 0].tolist() == [0.0, 2.0] and labels.tolist() == [3, 2]


def test_cli_parsers():
    assert parse_heads("1.2, 3.0") == [(1, 2), (3, 0)]
    with pytest.raises(ValueError, match="LAYER.HEAD"):
        parse_heads("1-2")
    assert parse_groups(["shape=0,cat", "x=2"], ["dog", "cat"]) == {"shape": [0, 1], "x": [2]}
    with pytest.raises(ValueError, match="unknown class"):
        parse_groups(["g=bird"], ["dog"])
    with pytest.raises(ValueError, match="NAME=CLASS"):
        parse_groups(["g"], None)


def test_necessity_command_on_the_shapes_organism(tmp_path):
    """The two layer-0 shift heads carry the compositional classes; the only other layer-0 pair does not."""
    import json

    from typer.testing import CliRunner

    from vitcircuits.cli import app

    torch.set_num_threads(1)
    out = tmp_path / "n"
    result = CliRunner().invoke(app, ["necessity", "--model", "bundled:shapes-vit", "--images", "bundled:shapes", "--heads", "0.2,0.3",
                                      "--draws", "2", "--out", str(out), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "necessity" / "necessity.json").read_text())
    assert report["groups"] == {"compositional": [0, 1, 2, 3], "single_patch": [4, 5]} and report["n_images"] == 300
    assert report["circuit"]["compositional"] < 0.5 and report["circuit"]["single_patch"] > 0.95
    assert all(draw["heads"] == [[0, 0], [0, 1]] for draw in report["random"]["draws"])
    assert report["random"]["compositional"]["mean"] > 0.85
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["images"]["n_ok"] == 300 and manifest["config"]["heads"] == [[0, 2], [0, 3]]
    both = CliRunner().invoke(app, ["necessity", "--model", "bundled:shapes-vit", "--images", "bundled:shapes", "--out", str(tmp_path / "m")])
    assert both.exit_code == 2 and "exactly one of --circuits" in both.output
