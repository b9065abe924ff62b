"""``vitcircuits dynamics`` over a tiny organism's checkpoint series: the outputs, the group
metrics against timm, resuming by key, the explorer's step slider, and one-line failures."""
import json
import shutil

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from vitcircuits.cli import app
from vitcircuits.data.images import resolve_source
from vitcircuits.layout import LAYOUT
from vitcircuits.models.loading import load_model
from vitcircuits.organisms.series import SERIES, read_series
from vitcircuits.organisms.shapes import ShapesOrganismConfig, train_shapes_organism
from vitcircuits.plotting.attention import patch_attention
from vitcircuits.serve.state import RunState

TINY = dict(epochs=3, batch_size=16, embed_dim=16, depth=2, num_heads=2, n_train=320, n_test=60, threads=1, checkpoints=6)


@pytest.fixture(scope="module")
def organism(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    train_shapes_organism(ShapesOrganismConfig(**TINY), folder, progress=False)
    return folder


def _run(organism, out, *extra):
    args = ["dynamics", "--checkpoints", str(organism), "--images", "bundled:shapes", "--out", str(out),
            "--device", "cpu", "--quick", *extra]
    return CliRunner().invoke(app, args)


@pytest.fixture(scope="module")
def run(organism, tmp_path_factory):
    out = tmp_path_factory.mktemp("dyn") / "run"
    result = _run(organism, out)
    assert result.exit_code == 0, result.output
    return out


def test_outputs_and_report(run, organism):
    data = json.loads((run / LAYOUT.formation_json).read_text())
    steps = [s for s, _ in read_series(organism)]
    assert data["steps"] == steps and len(steps) >= 5
    kinds = {m["kind"] for m in data["metrics"]}
    assert {"head", "edge", "group"} <= kinds
    heads = [m for m in data["metrics"] if m["kind"] == "head"]
    assert len(heads) == 2 * 2 * 2  # 2 layers × 2 heads × (modular score, neighbour mass)
    for m in data["metrics"]:
        assert len(m["curve"]) == len(steps) and all(np.isfinite(m["curve"]))
        assert m["step"] is None or (m["step_lo"] <= m["step"] <= m["step_hi"] or m["crossed_share"] < 1)
    by_step = (run / LAYOUT.atlas_by_step_csv).read_text().splitlines()
    assert by_step[0].startswith("step,layer,head,kind,modular_score") and len(by_step) == 1 + len(steps) * 4
    text = (run / LAYOUT.formation_csv).read_text()
    assert "nan" not in text.lower() and text.count("\n") == len(data["metrics"]) + 1
    report = (run / LAYOUT.report).read_text()
    assert 'id="formation"' in report and "Heads are matched across checkpoints by (layer, head)" in report
    manifest = json.loads((run / LAYOUT.manifest).read_text())
    assert manifest["series"]["steps"] == steps and manifest["config"]["model"]["model"].endswith(f"step_{steps[-1]:08d}")


def test_group_metrics_equal_timm_on_the_same_images(run, organism):
    data = json.loads((run / LAYOUT.formation_json).read_text())
    source = resolve_source("bundled:shapes")
    from PIL import Image
    from timm.data import create_transform, resolve_data_config

    labels = torch.tensor([item.label for item in source.items])
    compositional = torch.tensor([c in (0, 1, 2, 3) for c in labels.tolist()])
    for g, (step, folder) in enumerate(read_series(organism)):
        model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
        transform = create_transform(**resolve_data_config({}, model=model))
        images = torch.stack([transform(Image.open(item.path).convert("RGB")) for item in source.items])
        with torch.no_grad():
            logits = model(images)
        loss = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
        correct = (logits.argmax(-1) == labels).double()
        find = lambda subject, name: next(m for m in data["metrics"] if (m["kind"], m["subject"], m["metric"]) == ("group", subject, name))  # noqa: E731
        assert find("compositional", "loss")["curve"][g] == pytest.approx(float(loss[compositional].mean()), rel=1e-4, abs=1e-6)
        assert find("single_patch", "accuracy")["curve"][g] == pytest.approx(float(correct[~compositional].mean()), abs=1e-9)


def test_resume_reuses_measured_checkpoints_by_key(run, organism, tmp_path):
    copy = tmp_path / "organism"
    shutil.copytree(organism, copy)
    out = tmp_path / "run"
    shutil.copytree(run, out)
    before = (out / LAYOUT.formation_csv).read_text()
    # Nothing changed: every stage is skipped.
    result = _run(organism, out, "--resume")
    assert result.exit_code == 0, result.output
    assert all(f"stage {name}: already done, skipped" in result.output for name in ("overview", "heads", "composition", "dynamics"))
    assert (out / LAYOUT.formation_csv).read_text() == before
    # Other weights under the same step: only that checkpoint is measured again.
    step, folder = read_series(copy)[2]
    weights = load_file(str(folder / "model.safetensors"))
    weights = {k: v + 0.05 * torch.randn_like(v.float()).to(v.dtype) for k, v in weights.items()}
    save_file(weights, str(folder / "model.safetensors"))
    moved = tmp_path / "moved"
    assert _run(copy, moved).exit_code == 0
    a = json.loads((moved / LAYOUT.dynamics_steps / f"step_{step:08d}" / "key.json").read_text())
    b = json.loads((run / LAYOUT.dynamics_steps / f"step_{step:08d}" / "key.json").read_text())
    assert a["weights_sha256"] != b["weights_sha256"] and a["image_list_sha256"] == b["image_list_sha256"]
    result = _run(copy, out, "--resume")
    assert result.exit_code == 0, result.output
    assert "5 of 6 checkpoints already measured" in " ".join(result.output.split())
    assert (out / LAYOUT.formation_csv).read_text() == (moved / LAYOUT.formation_csv).read_text()


def test_the_explorer_steps_through_the_checkpoints(run, organism):
    state = RunState(run, device="cpu")
    steps = [s for s, _ in read_series(organism)]
    assert state.summary["steps"] == steps and state.live
    first, last = state.atlas_at(steps[0]), state.atlas_at(steps[-1])
    assert len(first["atlas"]) == 4 and first["atlas"] != last["atlas"]
    early, final = state.attention(0, 2, 2, step=steps[0]), state.attention(0, 2, 2)
    folder = read_series(organism)[0][1]
    direct = patch_attention(load_model(str(folder), device="cpu").model, state._image(0), (2, 2))
    assert np.allclose(early["attention"], direct.reshape(*direct.shape[:2], -1), atol=1e-7)
    assert np.abs(np.array(early["attention"]) - np.array(final["attention"])).max() > 1e-5
    assert np.allclose(state.attention(0, 2, 2, step=steps[-1])["attention"], final["attention"], atol=1e-6)


def test_bad_checkpoints_fail_in_one_line(tmp_path, organism):
    result = _run(tmp_path / "nowhere", tmp_path / "a")
    assert result.exit_code != 0 and "--checkpoints" in result.output and "Traceback" not in result.output
    broken = tmp_path / "broken"
    shutil.copytree(organism, broken)
    (broken / SERIES / f"step_{read_series(organism)[1][0]:08d}" / "model.safetensors").unlink()
    result = _run(broken, tmp_path / "b")
    assert result.exit_code != 0 and "not a checkpoint" in result.output and "Traceback" not in result.output


def test_a_series_of_different_models_fails_in_one_line(tmp_path, organism):
    other = tmp_path / "other"
    train_shapes_organism(ShapesOrganismConfig(**{**TINY, "num_heads": 4, "checkpoints": 0}), other, progress=False)
    first = read_series(organism)[0][1]
    listing = tmp_path / "list.txt"
    shutil.copytree(other, tmp_path / "step_00099999")
    listing.write_text(f"{first}\n{tmp_path / 'step_00099999'}\n")
    result = _run(listing, tmp_path / "run")
    assert result.exit_code != 0 and "differ from the last checkpoint's" in result.output and "Traceback" not in result.output
