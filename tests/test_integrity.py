"""Cached and resumed artefacts are keyed by what produced them: `--force`, `--resume` and other
images never leave a stale answer behind (issue: data integrity)."""
import json
import os
import shutil

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from vitcircuits.cli import app
from vitcircuits.files import write_json
from vitcircuits.runs import Run
from vitcircuits.sae.model import SAEConfig
from vitcircuits.sae.train import TrainConfig, train_sae
from vitcircuits.stages import StageRunner
from vitcircuits.testing.checkpoints import noise_image_folder, tiny_vit_folder


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("integrity")
    model = tiny_vit_folder(root / "m")
    folders = {name: noise_image_folder(root / name, 24, seed, prefix=name) for name, seed in (("a", 0), ("b", 1))}
    first = root / "first"
    _hunt(model, folders["a"], first)
    return model, folders, first


def _hunt(model, images, out, *extra):
    result = CliRunner().invoke(app, ["hunt", "--model", str(model), "--images", str(images), "--out", str(out), "--quick", "--device", "cpu", *extra])
    assert result.exit_code == 0, result.output
    return result


def _bytes(run, name):
    return (run / name).read_bytes()


def _index(run):
    return json.loads((run / "sae" / "activations" / "index.json").read_text())


def test_force_with_other_images_recomputes_every_artefact(setup, tmp_path):
    model, folders, first = setup
    run = tmp_path / "run"
    shutil.copytree(first, run)
    _hunt(model, folders["b"], run, "--force")
    for name in ("sae/activations/shard_00000000.safetensors", "sae/sae/sae_weights.safetensors", "overview/predictions.csv", "heads/atlas.json"):
        assert _bytes(run, name) != _bytes(first, name), f"{name} was reused from the other images"
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["images"]["source"] == str(folders["b"])
    assert _index(run)["made_from"]["image_list_sha256"] == manifest["images"]["image_list_sha256"]
    assert "b00.png" in (run / "overview" / "predictions.csv").read_text()


def test_force_with_fewer_images_rebuilds_the_index(setup, tmp_path):
    model, folders, first = setup
    run = tmp_path / "run"
    shutil.copytree(first, run)
    _hunt(model, folders["a"], run, "--force", "--max-images", "16")
    images = {i for shard in _index(run)["shards"] for i in shard["images"]}
    assert images == set(range(16))
    assert json.loads((run / "manifest.json").read_text())["images"]["n_total"] == 16


def test_resumed_manifest_is_as_complete_as_a_fresh_one(setup, tmp_path):
    model, folders, first = setup
    run = tmp_path / "run"
    shutil.copytree(first, run)
    result = _hunt(model, folders["a"], run, "--resume")
    assert "already done, skipped" in result.output
    fresh, resumed = (json.loads((r / "manifest.json").read_text()) for r in (first, run))
    assert set(fresh) == set(resumed)
    for section in ("images", "heads", "composition", "sae", "model"):
        assert resumed[section] == fresh[section], section
    assert "NaN" not in (run / "manifest.json").read_text()


def test_stage_with_other_inputs_clears_its_outputs_and_manifest_sections(tmp_path):
    run = Run.create(tmp_path, "test", {})

    def write(value):
        (tmp_path / "stage").mkdir(exist_ok=True)
        (tmp_path / "stage" / f"{value}.txt").write_text(value)
        run.write_manifest(section={"value": value})

    assert StageRunner(run).stage("s", {"v": 1}, lambda: write("one"), outputs=["stage"])
    assert not StageRunner(run).stage("s", {"v": 1}, lambda: write("never"), outputs=["stage"])
    assert StageRunner(run).stage("s", {"v": 2}, lambda: None, outputs=["stage"])
    assert not (tmp_path / "stage").exists() and "section" not in run.manifest


def test_a_finished_stage_whose_outputs_were_deleted_runs_again(tmp_path):
    run = Run.create(tmp_path, "test", {})
    write = lambda: (tmp_path / "out.txt").write_text("x")  # noqa: E731
    assert StageRunner(run).stage("s", {"v": 1}, write, outputs=["out.txt"])
    (tmp_path / "out.txt").unlink()
    assert StageRunner(run).stage("s", {"v": 1}, write, outputs=["out.txt"]) and (tmp_path / "out.txt").exists()


def test_unfinished_stage_with_the_same_inputs_resumes_in_place(tmp_path):
    run = Run.create(tmp_path, "test", {})

    def killed():
        (tmp_path / "stage").mkdir()
        (tmp_path / "stage" / "partial.txt").write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        StageRunner(run).stage("s", {"v": 1}, killed, outputs=["stage"])
    seen = []
    StageRunner(run).stage("s", {"v": 1}, lambda: seen.append((tmp_path / "stage" / "partial.txt").read_text()), outputs=["stage"])
    assert seen == ["half"]


def _cache(model, images, out, *extra):
    return CliRunner().invoke(app, ["cache", "--model", str(model), "--images", str(images), "--out", str(out), "--hooks",
                                    "blocks.1.hook_resid_post", "--shard-rows", "256", "--batch-size", "4", "--device", "cpu", *extra])


def test_cache_resume_with_other_images_is_refused(setup, tmp_path):
    model, folders, _ = setup
    out = tmp_path / "cache"
    assert _cache(model, folders["a"], out).exit_code == 0
    index = (out / "activations" / "index.json").read_bytes()
    result = _cache(model, folders["b"], out, "--resume")
    assert result.exit_code == 2 and "made from another model, weights, image list" in result.output
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output
    assert (out / "activations" / "index.json").read_bytes() == index


def test_cache_force_leaves_no_stale_shard(setup, tmp_path):
    model, folders, _ = setup
    out = tmp_path / "cache"
    assert _cache(model, folders["a"], out).exit_code == 0
    shards = out / "activations"
    assert len(list(shards.glob("shard_*.safetensors"))) > 2
    assert _cache(model, folders["b"], out, "--force", "--max-images", "4").exit_code == 0
    index = json.loads((shards / "index.json").read_text())
    assert sorted(p.name for p in shards.glob("shard_*.safetensors")) == sorted(s["file"] for s in index["shards"])


def test_sae_checkpoints_of_other_data_are_refused(tmp_path):
    acts = torch.randn(512, 8)
    sae_config = SAEConfig(d_in=8, d_sae=16, k=2)
    train_config = TrainConfig(total_steps=4, batch_size=64, checkpoint_every=2, init_sample_rows=256)
    train_sae(acts, sae_config, train_config, out_dir=tmp_path, data_key="images-a", progress=False)
    with pytest.raises(ValueError, match="trained on other activations"):
        train_sae(acts, sae_config, train_config, out_dir=tmp_path, resume=True, data_key="images-b", progress=False)


def test_json_is_strict_and_files_follow_the_umask(tmp_path):
    path = write_json(tmp_path / "x.json", {"nan": float("nan"), "inf": np.float32("inf"), "ok": np.float64(1.5)})
    assert json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"non-strict constant {c}")) == {"nan": None, "inf": None, "ok": 1.5}
    old = os.umask(0o022)
    try:
        assert (write_json(tmp_path / "y.json", {}).stat().st_mode & 0o777) == 0o644
        os.umask(0o077)
        assert (write_json(tmp_path / "z.json", {}).stat().st_mode & 0o777) == 0o600
    finally:
        os.umask(old)


def test_class_folders_that_are_not_the_models_classes_are_warned(caplog):
    from types import SimpleNamespace

    from vitcircuits.inputs import check_folder_classes

    model = SimpleNamespace(label_names=["cat", "dog"])
    same = SimpleNamespace(source=SimpleNamespace(labels="folders", classes=("Cat", "dog")))
    other = SimpleNamespace(source=SimpleNamespace(labels="folders", classes=("dog", "fox")))
    with caplog.at_level("WARNING", logger="vitcircuits"):
        check_folder_classes(model, same)
        assert not caplog.records
        check_folder_classes(model, other)
    assert len(caplog.records) == 1 and "not the model's 2 class names" in caplog.records[0].getMessage()
