"""Are two run folders the same answer? Compare every CSV and JSON file of two runs.

    python bench/compare_runs.py RUN_A RUN_B

CSV files must be byte-identical. JSON files must be equal once the fields that record when and
where a run happened are dropped (timings, versions, finish times, the engine, absolute paths of
the run folder itself). Prints one line per differing or missing file and exits 1 if there is any, so a
refactor can be checked to leave the outputs of ``make demo`` unchanged.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

VOLATILE = {"timings_s", "versions", "finished", "seconds", "started", "timings", "engine"}
"""JSON keys that record when and on what machine a run happened, not what it found."""


def _stable(value, roots: tuple[str, ...]):
    """``value`` without volatile keys, with the run folder's own path replaced by a marker."""
    if isinstance(value, dict):
        return {k: _stable(v, roots) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [_stable(v, roots) for v in value]
    if isinstance(value, str):
        for root in roots:
            value = value.replace(root, "<run>")
    return value


def _first_difference(a, b, where: str = "") -> str:
    if type(a) is not type(b):
        return f"{where or '/'}: {type(a).__name__} vs {type(b).__name__}"
    if isinstance(a, dict):
        for key in sorted(set(a) | set(b)):
            if key not in a or key not in b:
                return f"{where}/{key}: only in {'B' if key not in a else 'A'}"
            if a[key] != b[key]:
                return _first_difference(a[key], b[key], f"{where}/{key}")
    if isinstance(a, list):
        if len(a) != len(b):
            return f"{where}: {len(a)} vs {len(b)} items"
        for i, (x, y) in enumerate(zip(a, b)):
            if x != y:
                return _first_difference(x, y, f"{where}[{i}]")
    return f"{where or '/'}: {str(a)[:80]!r} vs {str(b)[:80]!r}"


def compare(run_a: Path, run_b: Path) -> list[str]:
    """One line per CSV or JSON file that differs or exists in one run only."""
    files = lambda run: {p.relative_to(run) for p in run.rglob("*") if p.suffix in (".csv", ".json") and p.is_file()}  # noqa: E731
    in_a, in_b = files(run_a), files(run_b)
    problems = [f"{name}: only in {run_a if name in in_a else run_b}" for name in sorted(in_a ^ in_b)]
    for name in sorted(in_a & in_b):
        a, b = run_a / name, run_b / name
        if name.suffix == ".csv":
            if a.read_bytes() != b.read_bytes():
                problems.append(f"{name}: CSV differs")
            continue
        roots = (str(run_a), str(run_b), str(run_a.resolve()), str(run_b.resolve()))
        data_a, data_b = (_stable(json.loads(p.read_text()), roots) for p in (a, b))
        if data_a != data_b:
            problems.append(f"{name}: {_first_difference(data_a, data_b)}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_a", type=Path)
    parser.add_argument("run_b", type=Path)
    args = parser.parse_args(argv)
    problems = compare(args.run_a, args.run_b)
    print("\n".join(problems) if problems else f"same: every CSV and JSON file of {args.run_a} and {args.run_b}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
