"""Run folders: refusal of non-empty folders, atomic writes, manifest contents."""
import json
import os

import pytest

from vitcircuits.files import atomic_path, write_json
from vitcircuits.runs import Run, RunFolderError


def test_non_empty_folder_needs_force_or_resume(tmp_path):
    out = tmp_path / "run"
    Run.create(out, "x", {}).write_manifest(seed=1)
    with pytest.raises(RunFolderError, match="--force"):
        Run.create(out, "x", {})
    Run.create(out, "x", {}, force=True)
    Run.create(out, "x", {}, resume=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunFolderError, match="not a folder"):
        Run.create(tmp_path / "file", "x", {})


def test_force_never_reuses_a_folder_that_is_not_a_run(tmp_path):
    (tmp_path / "heads").mkdir()
    (tmp_path / "heads" / "my_notes.txt").write_text("keep me")
    for flags in ({"force": True}, {"resume": True}):
        with pytest.raises(RunFolderError, match="not a run folder"):
            Run.create(tmp_path, "x", {}, **flags)
    assert (tmp_path / "heads" / "my_notes.txt").read_text() == "keep me"


def test_manifest_has_versions_config_seed_and_timings(tmp_path):
    run = Run.create(tmp_path / "r", "info", {"a": 1})
    with run.timed("stage"):
        pass
    run.write_manifest(seed=7, model={"model_id": "m"})
    run.write_manifest(images={"n_total": 3})
    manifest = json.loads((tmp_path / "r" / "manifest.json").read_text())
    assert manifest["command"] == "info" and manifest["config"] == {"a": 1} and manifest["seed"] == 7
    assert manifest["model"] == {"model_id": "m"} and manifest["images"] == {"n_total": 3}
    assert "torch" in manifest["versions"] and "vitcircuits" in manifest["versions"]
    assert "stage" in manifest["timings_s"] and "total" in manifest["timings_s"]


def test_atomic_write_leaves_old_file_when_writer_fails(tmp_path):
    target = tmp_path / "out.json"
    write_json(target, {"v": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("partial")
            raise RuntimeError("killed")
    assert json.loads(target.read_text()) == {"v": 1}
    assert [p for p in os.listdir(tmp_path) if p != "out.json"] == []
