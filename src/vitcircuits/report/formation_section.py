"""The report's Formation section: when the circuit and the class groups form over a training
series (a ``vitcircuits dynamics`` run, :mod:`vitcircuits.dynamics.formation`)."""
from __future__ import annotations

from vitcircuits.files import read_json
from vitcircuits.layout import LAYOUT
from vitcircuits.report import html
from vitcircuits.runs import Run


def _step(value: float | None) -> str:
    return "none" if value is None else f"{value:,.0f}"


def _window(m: dict) -> str:
    if m["step"] is None:
        return "no crossing"
    return f"{_step(m['step'])} [{_step(m['step_lo'])}, {_step(m['step_hi'])}]" + \
        ("" if m["crossed_share"] == 1 else f" ({100 * m['crossed_share']:.0f} % of resamples cross)")


def _ratio(lag: dict) -> str:
    if lag["ratio"] is None:
        return "n/a"
    return f"{lag['ratio']:.2f} [{lag['ratio_lo']:.2f}, {lag['ratio_hi']:.2f}]" if lag["ratio_lo"] is not None else f"{lag['ratio']:.2f}"


def _lag_sentence(lag: dict) -> str:
    where = {True: "inside the circuit's window", False: "outside the circuit's window", None: "(no window)"}[lag["in_window"]]
    return f"{lag['then']}: crosses at step {_step(lag['then_step'])}, {where}; ratio to the circuit's step {_ratio(lag)}"


def formation_section(run: Run) -> str:
    data = read_json(run.file(LAYOUT.formation_json))
    metrics = data["metrics"]
    steps = data["steps"]
    circuit = next((m for m in metrics if m["kind"] == "circuit"), None)
    intro = (f"{len(steps)} checkpoints from step {steps[0]:,.0f} to {steps[-1]:,.0f}. A metric forms where it crosses half of its change "
             "from the first checkpoint to the last (interpolated on a log step axis); intervals are 95 % bootstraps over the images, "
             "the same resamples for every metric. Heads are matched across checkpoints by (layer, head).")
    if circuit is None:
        summary = "No supported edge and no modular head in the final checkpoint: there is no circuit to time."
    else:
        summary = (f"The circuit ({circuit['parts']} {circuit['of']}) forms at step {_window(circuit)}. "
                   + " ".join(_lag_sentence(lag) + "." for lag in data["lags"]))
    key = [m for m in metrics if m["key"]]
    table = html.table([(m["kind"], m["subject"], m["metric"], f"{m['initial']:.3g} → {m['final']:.3g}", _window(m)) for m in key],
                       ("kind", "subject", "metric", "first → last", "formation step [95% CI]"))
    figures = "".join(html.figure(run.file(path), caption) for path, caption in read_json(run.file(LAYOUT.dynamics_figures)))
    return html.section("Formation", html.paragraph(intro) + html.paragraph(summary) + table + figures
                        + html.paragraph(f"Every head and followed edge: {LAYOUT.formation_csv}; lags: {LAYOUT.lags_csv}."), "formation")
