"""bench/compare_runs.py: two runs are the same answer when their CSV bytes and JSON values match,
apart from timings, versions and the run folder's own path."""
import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "compare_runs.py"


def _module():
    spec = importlib.util.spec_from_file_location("bench_compare_runs", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(folder: Path, accuracy: float, seconds: float, csv: str) -> Path:
    (folder / "heads").mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps({"out": str(folder / "report.html"), "timings_s": {"total": seconds},
                                                      "versions": {"torch": str(seconds)}, "accuracy": accuracy}))
    (folder / "heads" / "heads.csv").write_text(csv)
    return folder


def test_timings_versions_and_own_path_do_not_count(tmp_path):
    compare = _module().compare
    a, b = _run(tmp_path / "a", 0.5, 1.0, "x\n1\n"), _run(tmp_path / "b", 0.5, 2.0, "x\n1\n")
    assert compare(a, b) == []


def test_a_changed_value_a_changed_csv_and_a_missing_file_are_named(tmp_path):
    compare = _module().compare
    a, b = _run(tmp_path / "a", 0.5, 1.0, "x\n1\n"), _run(tmp_path / "b", 0.25, 1.0, "x\n2\n")
    (a / "extra.json").write_text("{}")
    problems = compare(a, b)
    assert any(p.startswith("extra.json: only in") for p in problems)
    assert "heads/heads.csv: CSV differs" in problems
    assert any(p.startswith("manifest.json: /accuracy") for p in problems)
