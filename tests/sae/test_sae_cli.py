"""`vitcircuits sae train` / `sae analyze` on the bundled organism: metrics, fidelity, resume,
features, and one-line errors."""
import json

import pytest
from typer.testing import CliRunner

from vitcircuits.cli import app
from vitcircuits.sae.io import load_sae
from vitcircuits.stages.sae import choose_hook

HOOK = "blocks.2.hook_resid_post"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("sae") / "run"
    args = ["sae", "train", "--model", "bundled:cifar10-vit", "--images", "bundled:cifar10", "--max-images", "60", "--hook", HOOK,
            "--out", str(out), "--epochs", "2", "--sae-batch", "256", "--expansion", "2", "--k", "8", "--views", "2", "--device", "cpu"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return out, args


def test_train_writes_metrics_sae_and_fidelity(trained):
    out, _ = trained
    metrics = json.loads((out / "sae" / "metrics.json").read_text())
    held = metrics["held_out"]
    assert metrics["hook"] == HOOK and metrics["hook_reason"] == "given"
    # 60 images x 2 views x 64 patches; images 0, 10, ..., 50 are held out
    assert metrics["n_rows"] == 60 * 2 * 64 and metrics["n_train_rows"] == 54 * 2 * 64 and held["n_tokens"] == 6 * 2 * 64
    assert held["l0"] == pytest.approx(8.0) and 0.0 < held["explained_variance"] < 1.0
    fidelity = metrics["fidelity"]
    assert fidelity["output_kind"] == "logits" and fidelity["n_images"] == 6 and "clean_accuracy" in fidelity
    assert fidelity["sae"]["kl"] < fidelity["mean_ablation"]["kl"]  # the SAE keeps more than mean ablation does
    sae = load_sae(out / "sae" / "sae")
    assert sae.cfg.hook_name == HOOK and sae.cfg.d_sae == 2 * sae.cfg.d_in
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["command"] == "sae-train" and manifest["model"]["weights_sha256"]


def test_resume_does_not_recompute(trained):
    out, args = trained
    shard = out / "sae" / "activations" / "shard_00000000.safetensors"
    before = shard.stat().st_mtime_ns, (out / "sae" / "sae" / "sae_weights.safetensors").read_bytes()
    result = CliRunner().invoke(app, [*args, "--resume"])
    assert result.exit_code == 0, result.output
    assert shard.stat().st_mtime_ns == before[0]
    assert (out / "sae" / "sae" / "sae_weights.safetensors").read_bytes() == before[1]  # resumed from the final checkpoint


def test_analyze_writes_features(trained):
    out, _ = trained
    result = CliRunner().invoke(app, ["sae", "analyze", str(out), "--n-features", "6", "--n-examples", "3", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "sae" / "features" / "features.json").read_text())
    assert json.loads((out / "sae" / "features" / "manifest.json").read_text())["command"] == "sae-analyze"
    assert summary["n_features_analysed"] == 6 and summary["circuit_heads"] == []
    assert [r["compositional_score"] for r in summary["top"]] == sorted((r["compositional_score"] for r in summary["top"]), reverse=True)
    for row in summary["top"]:
        assert row["circuit_tested"] is False and 0 <= row["drop_centre"] <= 1
    for path, _ in summary["figures"]:
        assert (out / "sae" / path).stat().st_size > 1000


def test_errors_are_one_line(tmp_path):
    result = CliRunner().invoke(app, ["sae", "train", "--model", "bundled:cifar10-vit", "--images", "bundled:cifar10", "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "--hook" in result.output
    result = CliRunner().invoke(app, ["sae", "analyze", str(tmp_path)])
    assert result.exit_code == 2 and "not a `vitcircuits sae train` run" in result.output


def test_choose_hook_follows_the_strongest_supported_receiver():
    circuits = [{"verdict": "supported", "receivers": [[3, 1]]}, {"verdict": "supported", "receivers": [[1, 0]]}, {"verdict": "weak", "receivers": [[5, 0]]}]
    assert choose_hook(circuits, 12) == ("blocks.3.hook_resid_post", "after the strongest supported composition receiver L3H1")
    assert choose_hook(circuits[2:], 12)[0] == "blocks.6.hook_resid_post"
