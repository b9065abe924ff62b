"""Setting a run's verdicts against known causal edges: the truth file, the comparison, the CLI check."""
import json
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from vitcircuits.cli import app
from vitcircuits.hunt import copy_truth
from vitcircuits.report.truth_section import compare
from vitcircuits.runs import Run


def _truth(edges):
    return {"source": "hand-made", "images": "none", "threshold": 0.1,
            "edges": [{"edge": list(edge), "margin_drop": drop, "causal": drop >= 0.1} for edge, drop in edges]}


def _line(effect, floor=0.05):
    """A ``matters`` line of ``circuits.json``; below the floor no null is drawn."""
    drawn = effect >= floor
    return {"effect": effect, "lo": effect - 0.1, "hi": effect + 0.1, "null_mean": 0.0 if drawn else None, "null_std": 0.02 if drawn else None,
            "null_q95": 0.04 if drawn else None, "n_null": 20 if drawn else 0, "z": effect / 0.02 if drawn else None, "null_degenerate": False,
            "floor": floor, "beyond": drawn and effect > 0.04}


def _circuit(edge, verdict, run_effect=None):
    sl, sh, rl, rh, kind = edge
    matters = None if run_effect is None else _line(run_effect)
    return {"senders": [[sl, sh]], "receivers": [[rl, rh]], "kind": kind, "verdict": verdict, "evidence": {"matters": matters}}


def test_compare_counts_supported_verdicts_against_causal_edges():
    a, b, c, d, e = (0, 1, 2, 0, "k"), (0, 2, 1, 0, "q"), (1, 0, 3, 3, "v"), (0, 0, 3, 1, "k"), (1, 1, 2, 2, "q")
    truth = _truth([(a, 1.5), (b, 0.3), (c, 0.02), (d, 0.0)])
    circuits = [_circuit(a, "supported", 1.2), _circuit(c, "supported", 0.01), _circuit(d, "none", 0.0), _circuit(e, "weak")]
    result = compare(truth, circuits)
    assert (result["tp"], result["fp"], result["fn"], result["n_causal"]) == (1, 1, 1, 2)
    rows = {tuple(r["edge"]): r for r in result["rows"]}
    assert set(rows) == {a, b, c, e}, "causal edges and supported/weak edges only"
    assert rows[b]["verdict"] == "none (not checked)" and rows[b]["causal"] and rows[b]["run_effect"] is None
    assert rows[e]["verdict"] == "weak" and rows[e]["run_effect"] is None, "an edge not checked exactly has no task effect"
    assert rows[a]["run_effect"] == 1.2 and rows[c]["run_effect"] == 0.01
    assert [tuple(r["edge"]) for r in result["rows"]][:3] == [a, b, c], "sorted by the true effect"


def test_copy_truth_validates_and_records(tmp_path):
    run = Run.create(tmp_path / "run", "hunt", {})
    loaded = SimpleNamespace(model=SimpleNamespace(cfg=SimpleNamespace(n_layers=3, n_heads=4)))
    good = tmp_path / "truth.json"
    good.write_text(json.dumps(_truth([((0, 1, 2, 0, "k"), 1.0), ((0, 2, 1, 0, "q"), 0.0)])))
    copy_truth(run, good, loaded)
    assert json.loads(run.file("truth.json").read_text()) == json.loads(good.read_text()) and run.manifest["truth"]["n_causal"] == 1
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"edges": []}))
    with pytest.raises(ValueError, match=r"bad.json: not a truth file for this model \(missing source, images, threshold\)"):
        copy_truth(run, bad, loaded)
    with pytest.raises(FileNotFoundError, match="missing.json: not found"):
        copy_truth(run, tmp_path / "missing.json", loaded)
    for edge, drop in (((7, 9, 11, 3, "k"), 1.0), ((0, 1, 2, 0, "x"), 1.0), ((2, 1, 1, 0, "q"), 1.0), ((0, 1, 2, 0, "k"), "lots")):
        document = _truth([((0, 1, 2, 0, "k"), 1.0)])
        document["edges"].append({"edge": list(edge), "margin_drop": drop, "causal": True})
        bad.write_text(json.dumps(document))
        with pytest.raises(ValueError, match="edge 1 is not .* of this 3-layer, 4-head model"):
            copy_truth(run, bad, loaded)


def test_hunt_rejects_a_bad_truth_file_before_any_stage(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("[not json")
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["hunt", "--model", "bundled:shapes-vit", "--images", "bundled:shapes", "--out", str(out), "--truth", str(bad)])
    assert result.exit_code == 2 and "bad.json: not valid JSON" in result.output
    assert not (out / "stages.json").exists()
