"""`vitcircuits serve` on a damaged run folder: refused at start with one line naming the file and
the reason (never a traceback, never an explorer that quietly leaves a panel empty)."""
from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

from tests.serve.demo_run import demo_run
from vitcircuits.serve import RunState
from vitcircuits.serve.state import DamagedRunFolder

RUN_FILES = ("manifest.json", "heads/atlas.json", "heads/kernels.npz", "heads/figures.json", "composition/circuits.json",
             "composition/figures.json", "sae/features/features.json", "overview/predictions.csv", "overview/summary.json")
NO_MODEL = "bundled:no-such-organism"  # fails at once: the tests need the run's files only


def truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def edit_json(change):
    def edit(path):
        data = json.loads(path.read_text())
        path.write_text(json.dumps(change(data)))
    return edit


def put(data, *keys_value):
    *keys, last, value = keys_value
    node = data
    for key in keys:
        node = node[key]
    node[last] = value
    return data


def replace_in_csv(column, value):
    def edit(path):
        lines = path.read_text().splitlines()
        at = lines[0].split(",").index(column)
        cells = lines[1].split(",")
        cells[at] = value
        path.write_text("\n".join([lines[0], ",".join(cells), *lines[2:]]) + "\n")
    return edit


DAMAGE = {
    "manifest truncated": ("manifest.json", truncate, "not valid JSON"),
    "manifest not UTF-8": ("manifest.json", lambda p: p.write_bytes(b'{"config": "\x80\x81"}'), "not UTF-8"),
    "manifest is an array": ("manifest.json", lambda p: p.write_text("[]"), "expected an object, got an array"),
    "manifest config.model is a string": ("manifest.json", edit_json(lambda d: put(d, "config", "model", "vit")),
                                          "config.model is a string, expected an object"),
    "manifest model is a number": ("manifest.json", edit_json(lambda d: put(d, "model", 3)), "model is a number, expected an object"),
    "atlas is an array": ("heads/atlas.json", lambda p: p.write_text("[1, 2]"), "expected an object, got an array"),
    "atlas truncated": ("heads/atlas.json", truncate, "not valid JSON"),
    "atlas without layout": ("heads/atlas.json", edit_json(lambda d: {k: v for k, v in d.items() if k != "layout"}), "missing key 'layout'"),
    "atlas layout rows NaN": ("heads/atlas.json", edit_json(lambda d: put(d, "layout", "rows", float("nan"))), "rows and cols must be positive"),
    "kernels truncated": ("heads/kernels.npz", truncate, ""),
    "kernels missing": ("heads/kernels.npz", lambda p: p.unlink(), "no such file"),
    "kernels a folder": ("heads/kernels.npz", lambda p: (p.unlink(), p.mkdir()), "no such file"),
    "circuits truncated": ("composition/circuits.json", truncate, "not valid JSON"),
    "circuits is a number": ("composition/circuits.json", edit_json(lambda d: put(d, "circuits", 7)), "unexpected content"),
    "circuit senders a string": ("composition/circuits.json", edit_json(lambda d: put(d, "circuits", 0, "senders", "L0H1")),
                                 "circuit 0: senders is a string, expected an array"),
    "circuit evidence an array": ("composition/circuits.json", edit_json(lambda d: put(d, "circuits", 0, "evidence", [])), "unexpected content"),
    "features top rows numbers": ("sae/features/features.json", edit_json(lambda d: put(d, "top", [1, 2])), "unexpected content"),
    "features figure without caption": ("sae/features/features.json", edit_json(lambda d: put(d, "figures", [["mean_maps.png"]])), "not enough values"),
    "figure listing a string": ("heads/figures.json", lambda p: p.write_text('"atlas.png"'), "expected an object or an array, got a string"),
    "predictions label NaN": ("overview/predictions.csv", replace_in_csv("label", "NaN"), "invalid literal"),
    "predictions without index": ("overview/predictions.csv", lambda p: p.write_text("image,label\na.png,1\n"), "missing key 'image_index'"),
}


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return demo_run(tmp_path_factory)


@pytest.fixture
def run(source, tmp_path):
    """A copy of the demo run's files that the explorer reads (no model, no activations)."""
    out = tmp_path / "run"
    for name in RUN_FILES:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source / name, out / name)
    return out


def test_the_copy_is_a_healthy_run(run):
    summary = RunState(run, model=NO_MODEL, device="cpu").summary
    assert summary["atlas"] and summary["circuits"] and summary["features"]["top"] and summary["images"] and summary["files"]


@pytest.mark.parametrize("name", DAMAGE)
def test_a_damaged_run_is_refused_with_one_line_naming_the_file(run, name):
    rel, damage, reason = DAMAGE[name]
    damage(run / rel)
    with pytest.raises(DamagedRunFolder) as err:
        RunState(run, model=NO_MODEL, device="cpu")
    message = str(err.value)
    assert isinstance(err.value, ValueError) and "\n" not in message
    assert message.startswith(f"{run.resolve() / rel}: ") and reason in message, message


def test_nan_and_infinity_in_run_files_are_read_and_served_as_null(run):
    edit_json(lambda d: put(d, "circuits", 0, "evidence", "attribution", float("inf")))(run / "composition/circuits.json")
    edit_json(lambda d: put(d, "top", 0, "density", float("nan")))(run / "sae/features/features.json")
    summary = RunState(run, model=NO_MODEL, device="cpu").summary
    assert summary["circuits"][0]["attribution"] is None and summary["features"]["top"][0]["density"] is None
    json.dumps(summary, allow_nan=False)


def test_listings_never_name_files_outside_the_run(run):
    (run.parent / "secret.txt").write_text("secret")
    (run / "heads/figures.json").write_text(json.dumps([["../secret.txt", "escape"], [str(run.parent / "secret.txt"), "absolute"]]))
    summary = RunState(run, model=NO_MODEL, device="cpu").summary
    assert not [f for f in summary["files"] if "secret" in f["path"]]


def test_the_serve_command_prints_one_line_and_exits_2(run, monkeypatch):
    from vitcircuits.cli import app
    from vitcircuits.serve.server import ExplorerServer

    def serve_forever(self, *args):
        raise AssertionError("the damaged run was served")

    monkeypatch.setattr(ExplorerServer, "serve_forever", serve_forever)
    (run / "heads/atlas.json").write_text("[]")
    result = CliRunner().invoke(app, ["serve", str(run), "--no-browser", "--port", "0", "--model", NO_MODEL])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert str(run.resolve() / "heads" / "atlas.json") in lines[0] and "Traceback" not in result.output
