"""`vitcircuits demo`/`hunt` on the bundled organism: offline run folder, report, resume."""
import json

import pytest
import torch
from typer.testing import CliRunner

from vitcircuits.cli import app
from vitcircuits.models.checkpoints import sha256_file
from vitcircuits.models.loading import bundled_model_folder, bundled_model_names

pytestmark = pytest.mark.skipif("cifar10-vit" not in bundled_model_names(), reason="bundled organism checkpoint missing")


def test_demo_writes_run_folder_and_report(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "demo"
    result = CliRunner().invoke(app, ["demo", "--organism", "cifar10", "--out", str(out), "--max-images", "120", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "report:" in result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"]["weights_sha256"] == sha256_file(bundled_model_folder("cifar10-vit") / "model.safetensors")
    assert manifest["model"]["random_weights"] is False and manifest["model"]["model_id"] == "bundled:cifar10-vit"
    assert manifest["images"]["n_total"] == 120 and manifest["images"]["n_skipped"] == 0
    assert len(manifest["images"]["image_list_sha256"]) == 64 and manifest["seed"] == 0
    assert {"torch", "timm", "vitcircuits"} <= set(manifest["versions"])
    summary = json.loads((out / "overview" / "summary.json").read_text())
    assert summary["n_labelled"] == 120 and summary["accuracy"] > 0.4
    report = (out / "report.html").read_text()
    assert report.index('id="verdicts"') < report.index('id="model"') and 'id="caveats"' in report
    for section in ('id="model"', 'id="data"', 'id="heads"', 'id="attention"', 'id="composition"', 'id="sae"', 'Spearman rank correlation',
                    'compositional features'):
        assert section in report
    assert "data:image/png;base64," in report and "http://" not in report and "https://" not in report
    heads_csv = (out / "heads" / "heads.csv").read_text().splitlines()
    assert len(heads_csv) == 1 + 4 * 4  # the organism has 4 layers x 4 heads


def test_hunt_resumes_without_recomputing_finished_stages(tmp_path):
    out = tmp_path / "run"
    args = ["hunt", "--model", "bundled:cifar10-vit", "--images", "bundled:cifar10", "--max-images", "40", "--out", str(out), "--device", "cpu"]
    assert CliRunner().invoke(app, args).exit_code == 0
    stages = json.loads((out / "stages.json").read_text())
    heads_mtime = (out / "heads" / "heads.csv").stat().st_mtime_ns
    (out / "report.html").unlink()
    stages.pop("report")
    (out / "stages.json").write_text(json.dumps(stages))  # as if killed before the report
    result = CliRunner().invoke(app, args + ["--resume"])
    assert result.exit_code == 0, result.output
    assert "stage heads: already done, skipped" in result.output
    assert (out / "heads" / "heads.csv").stat().st_mtime_ns == heads_mtime
    assert (out / "report.html").exists()
    changed = CliRunner().invoke(app, args[:-2] + ["--max-images", "41", "--out", str(out), "--device", "cpu", "--resume"])
    assert changed.exit_code == 0 and "stage overview: running" in changed.output  # changed inputs re-run


@pytest.mark.slow
def test_demo_shapes_shows_necessity_and_the_truth(tmp_path, monkeypatch):
    """The shapes organism's found circuit is necessary for the compositional classes only, and the
    report sets the verdicts beside the bundled truth."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)
    out = tmp_path / "shapes"
    result = CliRunner().invoke(app, ["demo", "--organism", "shapes", "--out", str(out), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    necessity = json.loads((out / "necessity" / "necessity.json").read_text())
    assert necessity["groups"] == {"compositional": [0, 1, 2, 3], "single_patch": [4, 5]} and necessity["n_images"] == 300
    assert necessity["clean"]["compositional"] >= 0.95 and necessity["clean"]["single_patch"] >= 0.95
    assert necessity["circuit"]["compositional"] <= 0.45, "ablating the found circuit should leave the compositional classes near chance"
    assert necessity["circuit"]["single_patch"] >= 0.95, "and leave the single-patch classes intact"
    assert necessity["random"]["compositional"]["mean"] >= necessity["circuit"]["compositional"] + 0.3
    assert necessity["random"]["compositional"]["fraction_at_or_below_circuit"] == 0
    truth = json.loads((out / "truth.json").read_text())
    assert truth == json.loads((bundled_model_folder("shapes-vit") / "truth.json").read_text())
    report = (out / "report.html").read_text()
    assert 'id="truth"' in report and 'id="necessity"' in report and "2c. The model needs the circuit" in report
    circuits = json.loads((out / "composition" / "circuits.json").read_text())
    run_top = [[*s["sender"], *s["receiver"], s["kind"]] for s in circuits["task_patching"]["strongest"]]
    causal = [row["edge"] for row in truth["edges"] if row["causal"]]
    assert truth["edges"][0]["edge"] in run_top[:3] and sum(edge in causal for edge in run_top[:5]) >= 4, (run_top, causal)


def test_demo_rejects_an_unknown_organism(tmp_path):
    result = CliRunner().invoke(app, ["demo", "--organism", "mnist", "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "choose one of cifar10, shapes" in result.output
