"""Commands with ``--engine ray`` write the same run as the local engine, and fail in one line
when the workers cannot be had."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from vitcircuits.cli import app
from vitcircuits.engine import EngineOptions
from vitcircuits.inputs import ModelOptions
from vitcircuits.testing.checkpoints import noise_image_folder

pytest.importorskip("ray", reason="the ray engine needs the ray extra (pip install 'vitcircuits[ray]')")

MODEL = ModelOptions(model="bundled:shapes-vit", device="cpu")
HOOK = "blocks.1.hook_resid_post"


def test_a_worker_with_other_weights_is_refused_in_one_line(cluster):
    other = ModelOptions(model="bundled:shapes-vit-3x2", device="cpu").load()
    with pytest.raises(RuntimeError, match="a worker loaded other weights than the driver"):
        EngineOptions(engine="ray", workers=1).start(MODEL, other)


def test_more_workers_than_the_cluster_has_is_one_line(cluster):
    with pytest.raises(RuntimeError, match="--workers 3: they need 3 CPUs"):
        EngineOptions(engine="ray", workers=3).start(MODEL, MODEL.load())


def _cli(args):
    return CliRunner().invoke(app, args)


def _compare(a, b) -> list[str]:
    spec = importlib.util.spec_from_file_location("bench_compare_runs", Path(__file__).resolve().parents[2] / "bench" / "compare_runs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.compare(a, b)


def test_commands_give_the_same_run_on_ray(tmp_path, cluster):
    common = ["--model", "bundled:shapes-vit", "--images", "bundled:shapes", "--max-images", "120", "--device", "cpu", "--batch-size", "40"]
    for command, extra in (("cache", ["--hooks", HOOK, "--shard-rows", "900"]), ("heads", [])):
        local = _cli([command, *common, *extra, "--out", str(tmp_path / f"{command}-local")])
        spread = _cli([command, *common, *extra, "--out", str(tmp_path / f"{command}-ray"), "--engine", "ray", "--workers", "2"])
        assert local.exit_code == spread.exit_code == 0, (local.output, spread.output)
        assert _compare(tmp_path / f"{command}-local", tmp_path / f"{command}-ray") == []
    manifest = json.loads((tmp_path / "heads-ray" / "manifest.json").read_text())
    assert manifest["engine"]["engine"] == "ray" and manifest["engine"]["workers"] == 2


def test_an_unknown_engine_is_one_line(tmp_path):
    result = _cli(["heads", "--model", "bundled:shapes-vit", "--images", "bundled:shapes", "--out", str(tmp_path / "r"), "--engine", "spark"])
    assert result.exit_code == 2 and "--engine" in result.output and "Traceback" not in result.output


@pytest.mark.slow
def test_hunt_is_the_same_answer_on_ray(tmp_path, cluster):
    """Byte for byte, with the driver at the workers' one torch thread in both runs: the edge
    attribution's backward passes and the transfer probes reduce in an order that depends on the
    thread count (measured with other thread counts: attribution 1e-7 relative apart, R² 1e-14)."""
    common = ["hunt", "--model", "bundled:shapes-vit", "--images", "bundled:shapes", "--device", "cpu", "--quick", "--max-images", "120"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert _cli([*common, "--out", str(tmp_path / "local")]).exit_code == 0
        assert _cli([*common, "--out", str(tmp_path / "ray"), "--engine", "ray"]).exit_code == 0
    finally:
        torch.set_num_threads(threads)
    assert _compare(tmp_path / "local", tmp_path / "ray") == []


def test_skipped_images_are_counted_and_warned_as_locally(tmp_path, cluster, caplog):
    folder = noise_image_folder(tmp_path / "images", 12)
    (folder / "05.png").write_bytes(b"not an image")
    common = ["heads", "--model", "bundled:shapes-vit", "--images", str(folder), "--device", "cpu", "--batch-size", "4"]
    assert _cli([*common, "--out", str(tmp_path / "ray"), "--engine", "ray"]).exit_code == 0
    assert any("skipped 1 of 12 images" in r.getMessage() for r in caplog.records)  # the driver warns, not only the worker
    assert _cli([*common, "--out", str(tmp_path / "local")]).exit_code == 0
    assert _compare(tmp_path / "local", tmp_path / "ray") == []
    images = json.loads((tmp_path / "ray" / "manifest.json").read_text())["images"]
    assert images["n_ok"] == 11 and [s["id"] for s in images["skipped"]] == ["05.png"]


def test_dynamics_measures_checkpoints_on_the_workers_with_the_same_answer(tmp_path, cluster):
    """One checkpoint per work item on two replicas; at one torch thread in driver and workers the
    step folders and the formation tables are byte-identical to a local run."""
    from vitcircuits.organisms.shapes import ShapesOrganismConfig, train_shapes_organism

    organism = tmp_path / "organism"
    train_shapes_organism(ShapesOrganismConfig(epochs=2, batch_size=16, embed_dim=16, depth=2, num_heads=2, n_train=160, n_test=30,
                                               threads=1, checkpoints=5), organism, progress=False)
    common = ["dynamics", "--checkpoints", str(organism), "--images", "bundled:shapes", "--max-images", "60", "--device", "cpu", "--quick"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert _cli([*common, "--out", str(tmp_path / "local")]).exit_code == 0
        spread = _cli([*common, "--out", str(tmp_path / "ray"), "--engine", "ray", "--workers", "2"])
        assert spread.exit_code == 0, spread.output
    finally:
        torch.set_num_threads(threads)
    assert _compare(tmp_path / "local", tmp_path / "ray") == []
    steps = sorted((tmp_path / "local" / "dynamics" / "steps").glob("step_*/measures.safetensors"))
    assert len(steps) >= 4
    for path in steps:
        assert path.read_bytes() == (tmp_path / "ray" / path.relative_to(tmp_path / "local")).read_bytes()
