"""The report's first screen: a one-screen summary (verdict counts, the strongest circuit, each claim's
answer and the one figure that shows the circuit on an image) and a short "How to read this report"."""
from __future__ import annotations

import os
from pathlib import Path

from vitcircuits.layout import LAYOUT
from vitcircuits.report import html
from vitcircuits.report.summary import claims, line_text, read, strongest_supported
from vitcircuits.report.truth_section import compare
from vitcircuits.runs import Run

DOCS = Path(__file__).resolve().parents[3] / "docs"
"""The docs folder of a source checkout (absent from an installed wheel)."""
VERDICTS = ("supported", "weak", "none")


def _head(layer_head: list[int]) -> str:
    return f"L{layer_head[0]}H{layer_head[1]}"


def circuit_name(c: dict) -> str:
    """``L0H3 → L3H3 through V``."""
    return f"{_head(c['senders'][0])} → {_head(c['receivers'][0])} through {c['kind'].upper()}"


def key_figure(run: Run) -> tuple[Path, str] | None:
    """The one figure that shows the circuit on an image, with a caption saying what it shows: the
    heads stage's overlay of the strongest supported circuit's sender (else its receiver) on
    images; without such an overlay, an attention-map grid of every head on an image (where the
    circuit's heads can be found); without a supported circuit, the overlay of the most modular
    head. None when the run has none of these figures."""
    heads_figures = read(run, LAYOUT.heads_figures) or []
    overlays = {Path(path).name: path for path, _ in heads_figures if Path(path).name.startswith("overlay_")}
    grids = [path for path, _ in (read(run, LAYOUT.overview_summary) or {}).get("figures", [])]
    circuits = read(run, LAYOUT.circuits)
    c = strongest_supported(circuits) if circuits else None
    if c:
        for role, head in (("sender", c["senders"][0]), ("receiver", c["receivers"][0])):
            if f"overlay_{_head(head)}.png" in overlays:
                return (run.file(overlays[f"overlay_{_head(head)}.png"]),
                        f"The {role} {_head(head)} of the strongest supported circuit ({circuit_name(c)}) on images: "
                        "its attention from the centre patch (outlined), over the image and alone.")
        if grids:
            return (run.file(grids[0]), f"The strongest supported circuit is {circuit_name(c)}: find its sender {_head(c['senders'][0])} and "
                                        f"receiver {_head(c['receivers'][0])} (layer row, head column) in this grid of every head's "
                                        "attention on one image.")
    if overlays:
        path = next(iter(overlays.values()))
        head = Path(path).stem.removeprefix("overlay_")
        return (run.file(path), f"No supported circuit{'' if circuits else ' (composition was not run)'}; the most modular head, "
                                f"{head}, on images: its attention from the centre patch (outlined).")
    if grids:
        return run.file(grids[0]), "No supported circuit; every head's attention from the outlined patch on one image."
    return None


def _counts(circuits: dict) -> str:
    counts = circuits["verdicts"]
    boxes = "".join(f'<div class="count" data-verdict="{v}"><b>{int(counts[v])}</b>{v}</div>' for v in VERDICTS)
    return (f'<div class="counts" id="verdict-counts">{boxes}<div class="count" data-verdict="edges"><b>{int(circuits["n_edges"])}</b>'
            "edges in all</div></div>")


def _strongest(circuits: dict) -> str:
    c = strongest_supported(circuits)
    if c is None:
        why = "" if circuits.get("task_metric") else " (no task images: no edge was checked for mattering)"
        return html.paragraph(f"No edge is supported: none both composes and matters{why}.")
    return html.paragraph(f"Strongest supported circuit: {circuit_name(c)} ({c['shuffle_reading']}). Ablating this one edge lowers the "
                          f"task metric by {line_text(c['evidence']['matters'], floor=True)}.")


def _truth(run: Run, circuits: dict) -> str:
    truth = read(run, LAYOUT.truth)
    if not truth:
        return ""
    r = compare(truth, circuits["circuits"])
    return html.paragraph(f"Against the {r['n_causal']} known causal edges: {r['tp']} supported circuits are causal, {r['fp']} are not, "
                          f"{r['fn']} causal edges are missed (section 'Verdicts against the ground truth').")


def summary_section(run: Run, model_id: str, random_weights: bool) -> html.Section:
    """What the run found, in one screen: the verdict counts over every edge, the strongest circuit,
    each claim's one-word answer and :func:`key_figure`."""
    images = ((read(run, LAYOUT.overview_summary) or {}).get("images")) or {}
    intro = f"{model_id}" + (f" on {images['n_ok']} images from {images['source']}." if images else ".")
    if random_weights:
        intro += " RANDOM weights: nothing here describes a trained model."
    text = html.paragraph(intro)
    circuits = read(run, LAYOUT.circuits)
    if circuits:
        text += "<p>Verdicts over every edge sender → receiver → input (Q, K or V):</p>" + _counts(circuits)
        text += _strongest(circuits) + _truth(run, circuits)
    else:
        text += html.paragraph("The composition stage has not run: no edge has a verdict yet.")
    answers = [(claim, verdict) for claim, verdict, _ in claims(run)]
    if answers:
        text += html.table(answers, ("claim", "verdict"))
    figure = key_figure(run)
    shown = html.figure(*figure, css_class="key-figure") if figure else html.paragraph("This run has no figure of a head on an image.")
    body = f'<div class="summary-grid"><div>{text}</div><div>{shown}</div></div>'
    return html.section("Summary", body, "summary")


def _doc(run: Run, name: str) -> str:
    """A link to ``docs/name`` relative to the report when the docs folder is there, else its name."""
    if (DOCS / name).is_file():
        href = Path(os.path.relpath(DOCS / name, run.path)).as_posix()
        return f'<a href="{html.escape(href)}">docs/{html.escape(name)}</a>'
    return f"<code>docs/{html.escape(name)}</code> (in the vitcircuits source)"


def how_to_read_section(run: Run) -> html.Section:
    """Where to start, the verdict rule in two lines, how to read a line of evidence, and the docs."""
    e = html.escape
    items = [
        e("Start with the Summary and the Verdicts: each claim of the hypothesis gets an answer and its evidence against a baseline. "
          "The Contents jump to each section; grey bars are collapsed galleries (click to open)."),
        e("An edge is sender head → later receiver head → the input (Q, K or V) the receiver reads it through. Supported = it composes "
          "(patching the sender into that input changes the receiver) and matters (ablating the edge lowers the task metric); "
          "weak = exactly one of the two; none = neither. Details: ") + _doc(run, "composition.md") + ".",
        e("A line of evidence reads effect [95 % bootstrap interval over images] vs null q95: an effect counts only beyond the "
          "95th percentile of its null (the same measurement on other heads and random directions) and above its floor."),
        e("Head kinds (modular, directional, self, cls/sink, global, mixed) come from the head atlas: ") + _doc(run, "heads.md")
        + e(". Sparse-autoencoder features: ") + _doc(run, "sae.md") + e(". The shapes organism and its known circuit: ")
        + _doc(run, "shapes.md") + e(". This report, section by section: ") + _doc(run, "report.md") + ".",
    ]
    return html.section("How to read this report", "<ul>" + "".join(f"<li>{item}</li>" for item in items) + "</ul>", "how-to-read")
