"""The report's composition parts from a hand-written ``composition/circuits.json``: every part of
each verdict is shown, and null fields print as "n/a" (never NaN)."""
from __future__ import annotations

import copy
import json
from types import SimpleNamespace

from vitcircuits.files import write_json
from vitcircuits.report.page import composition_section
from vitcircuits.report.summary import caveats_section, verdict_section
from vitcircuits.report.truth_section import truth_section
from vitcircuits.runs import Run


def _line(effect: float, q95: float | None, floor: float, beyond: bool, degenerate: bool = False) -> dict:
    """One line of evidence; ``q95`` None: below the floor, no null drawn."""
    drawn = q95 is not None
    return {"effect": effect, "lo": effect - 0.01, "hi": effect + 0.01, "null_mean": q95 / 2 if drawn else None,
            "null_std": (0.0 if degenerate else q95 / 4) if drawn else None, "null_q95": q95, "n_null": 20 if drawn else 0,
            "z": None if degenerate or not drawn else (effect - q95 / 2) / (q95 / 4), "null_degenerate": degenerate, "floor": floor,
            "beyond": beyond}


def _circuit(sender, kind_of_sender, receiver, kind, verdict, read_at, patch, prefix, matters, attribution, weight_z, percentile,
             silent=False) -> dict:
    return {"senders": [sender], "sender_kinds": [kind_of_sender], "receivers": [receiver], "kind": kind, "verdict": verdict,
            "silent": silent, "read_at": read_at, "shuffle_reading": "content-matching",
            "evidence": {"composes": {"metric": "patch_rel_out" if kind == "v" else "patch_js", "patch": patch, "prefix": prefix, "ablation": "mean"},
                         "matters": matters, "attribution": attribution,
                         "weights": {"value": 0.1, "baseline_mean": 0.08, "baseline_std": 0.01, "z": weight_z, "percentile_earlier": percentile},
                         "shuffle": {"effect": 0.002, "attention_kept": 0.41}},
            "criteria": {"min_js": 0.005, "min_rel_out": 0.05, "attention_kept": 0.8}}


def circuits_document() -> dict:
    """A ``circuits.json`` of the current schema: a supported edge read at prefix queries, a silent
    weak edge not checked for mattering (null attribution, weight z and percentile), and a checked
    edge below every floor (no null drawn, a null without spread)."""
    circuits = [
        _circuit([0, 1], "modular", [1, 2], "k", "supported", ["prefix"], _line(0.004, 0.006, 0.005, False), _line(0.0312, 0.0121, 0.005, True),
                 _line(0.25, 0.031, 0.046, True), 0.2, 4.1, 0.9),
        _circuit([0, 2], "global", [2, 0], "v", "weak", ["patch"], _line(0.42, 0.2, 0.05, True), None, None, None, None, None, silent=True),
        _circuit([1, 3], "mixed", [3, 1], "q", "none", [], _line(0.001, 0.0, 0.005, False, degenerate=True),
                 _line(0.0, 0.0, 0.005, False, degenerate=True), _line(0.01, None, 0.046, False), -0.003, 0.5, 0.25),
    ]
    return {
        "senders": [{"layer": 0, "head": 1, "kind": "modular"}], "ablation": "mean", "n_edges": 288,
        "verdicts": {"supported": 1, "weak": 40, "none": 247}, "rule": "supported = composes and matters", "circuits": circuits,
        "task_metric": {"kind": "margin", "probe": False, "n_images": 40, "target": "the clean prediction", "clean_mean": 4.6,
                        "floor": 0.046, "attribution_steps": 3, "n_edges": 288, "n_checked": 24, "n_null_edges": 55},
        "attribution": {"n_checked": 24, "spearman_checked": 0.81, "n_top": 24, "spearman_top": None},
        "task_patching": {"n_edges": 24, "metric": "drop", "strongest": [{"sender": [0, 1], "receiver": [1, 2], "kind": "k", "drop": 0.25}]},
        "direct": [{"sender": [3, 1], "attributed_drop": 0.16}], "transfer": {},
    }


def _run(tmp_path, document: dict) -> Run:
    run = Run.create(tmp_path / "run", "hunt", {})
    write_json(run.file("composition/circuits.json"), document)
    write_json(run.file("composition/figures.json"), [])
    return run


def test_composition_section_shows_every_part_of_the_verdicts(tmp_path):
    text = composition_section(_run(tmp_path, circuits_document()))
    assert "of 288 edges, 1 are supported, 40 weak and 247 none" in text, "counts over all edges, from data['verdicts']"
    assert "Supported = the edge composes and matters" in text and "other earlier heads" in text and "random-direction controls" in text
    assert "0.0312 [0.0212, 0.0412] vs null q95 0.0121 (20 members, z" in text, "composes at prefix queries"
    assert "0.2500 [0.2400, 0.2600] vs null q95 0.0310 (20 members, z" in text and "floor 0.0460; beyond" in text, "matters"
    assert "no spread" in text and "below its floor 0.0460 (no null drawn)" in text
    assert "not checked" in text and "weak (silent)" in text and "n/a" in text and "—" in text, "null fields"
    assert "Spearman rank correlation with exact task-level path patching is 0.81 over the 24 checked edges and n/a over the 24" in text
    assert "Supported: L0H1 → L1H2 (K, content-matching)" in text and "L3H1 (0.160)" in text
    assert "nan" not in text.lower()


def test_verdict_and_caveats_state_the_rule(tmp_path):
    run = _run(tmp_path, circuits_document())
    text = verdict_section(run)
    assert "1 of 288 edges supported (1 from modular or directional senders), 40 weak" in text
    assert "Strongest: L0H1 → L1H2 through K: composes at prefix queries patch_js 0.0312 [0.0212, 0.0412] vs null q95 0.0121" in text
    assert "matters: drop of the logit margin of the model&#x27;s prediction 0.2500 [0.2400, 0.2600] vs null q95 0.0310" in text
    assert "weight score z 4.1 against random heads, percentile 90 among the earlier heads into the receiver (corroboration only)" in text
    assert "Spearman 0.81" in text and "nan" not in text.lower()
    caveats = caveats_section(run, SimpleNamespace(random_weights=False))
    assert "layer-mates" not in caveats and "compose (the receiver reads the sender beyond a null" in caveats


def test_without_task_images_nothing_is_supported(tmp_path):
    document = copy.deepcopy(circuits_document())
    document.update(task_metric={}, attribution={}, direct=[], verdicts={"supported": 0, "weak": 2, "none": 286})
    document["circuits"] = document["circuits"][1:2]
    run = _run(tmp_path, document)
    text = composition_section(run)
    assert "No task images: no edge was checked for mattering" in text and "No edge is supported." in text and "Task-grounded edge attribution" not in text
    assert "None of 288 edges both composes and matters (no task images" in verdict_section(run)


def test_truth_section_reads_the_matters_line(tmp_path):
    run = _run(tmp_path, circuits_document())
    truth = {"source": "hand-made", "images": "none", "threshold": 0.1,
             "edges": [{"edge": [0, 1, 1, 2, "k"], "margin_drop": 0.3, "causal": True}, {"edge": [0, 2, 2, 0, "v"], "margin_drop": 0.0, "causal": False}]}
    run.file("truth.json").write_text(json.dumps(truth))
    text = truth_section(run)
    assert "<td>L0H1 → L1H2 K</td><td>supported</td><td>causal</td><td>0.300</td><td>0.250</td>" in text
    assert "<td>L0H2 → L2H0 V</td><td>weak</td><td>not causal</td><td>0.000</td><td>n/a</td>" in text


def _png(path) -> str:
    """A tiny real PNG at ``path``; returns its name relative to the run (``path``'s last two parts)."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), (200, 30, 30)).save(path)
    return f"{path.parent.name}/{path.name}"


def _figure_run(tmp_path, document: dict, overlays=("L0H1", "L2H3"), grid=True) -> Run:
    """A run with ``circuits.json``, heads figures (atlas plus overlays of ``overlays``) and one
    attention-map grid."""
    run = _run(tmp_path, document)
    heads = [(_png(run.file("heads/atlas.png")), "atlas")]
    heads += [(_png(run.file(f"heads/overlay_{h}.png")), f"overlay {h}") for h in overlays]
    write_json(run.file("heads/figures.json"), heads)
    figures = [(_png(run.file("overview/attention_img0_q1-1.png")), "grid")] if grid else []
    write_json(run.file("overview/summary.json"), {"figures": figures, "images": {"n_ok": 40, "source": "bundled:shapes"}})
    return run


def test_summary_shows_the_verdict_counts_the_strongest_circuit_and_its_figure(tmp_path):
    from vitcircuits.report.first_screen import summary_section

    run = _figure_run(tmp_path, circuits_document())
    text = summary_section(run, "bundled:shapes-vit", random_weights=False)
    assert text.anchor == "summary" and text.startswith('<section id="summary"><h2>Summary</h2>')
    for verdict, count in (("supported", 1), ("weak", 40), ("none", 247), ("edges", 288)):
        assert f'<div class="count" data-verdict="{verdict}"><b>{count}</b>' in text, verdict
    assert "bundled:shapes-vit on 40 images from bundled:shapes." in text and "RANDOM" not in text
    assert "Strongest supported circuit: L0H1 → L1H2 through K (content-matching)" in text
    assert "lowers the task metric by 0.2500 [0.2400, 0.2600]" in text
    assert "<td>2. Later heads read what those heads wrote (composition)</td><td>yes</td>" in text, "each claim's answer"
    assert text.count("<figure") == 1 and 'class="key-figure"' in text and "data:image/png;base64," in text
    assert "The sender L0H1 of the strongest supported circuit (L0H1 → L1H2 through K) on images" in text
    assert "nan" not in text.lower()


def test_the_key_figure_falls_back_from_sender_to_receiver_to_grid_to_none(tmp_path):
    from vitcircuits.report.first_screen import key_figure, summary_section

    document = circuits_document()
    pick = lambda run: (key_figure(run)[0].name, key_figure(run)[1])  # noqa: E731
    name, caption = pick(_figure_run(tmp_path / "a", document, overlays=("L1H2", "L2H3")))
    assert name == "overlay_L1H2.png" and caption.startswith("The receiver L1H2 of the strongest supported circuit")
    name, caption = pick(_figure_run(tmp_path / "b", document, overlays=("L2H3",)))
    assert name == "attention_img0_q1-1.png" and "find its sender L0H1 and receiver L1H2" in caption
    unsupported = copy.deepcopy(document)
    unsupported["circuits"] = document["circuits"][1:]
    unsupported["verdicts"] = {"supported": 0, "weak": 41, "none": 247}
    name, caption = pick(_figure_run(tmp_path / "c", unsupported, overlays=("L2H3", "L0H1")))
    assert name == "overlay_L2H3.png" and caption.startswith("No supported circuit; the most modular head, L2H3")
    bare = _figure_run(tmp_path / "d", unsupported, overlays=(), grid=False)
    assert key_figure(bare) is None
    text = summary_section(bare, "m", random_weights=True)
    assert "This run has no figure of a head on an image." in text and "<figure" not in text
    assert "No edge is supported" in text and "RANDOM weights" in text and '<b>0</b>supported' in text


def test_summary_without_composition_says_so(tmp_path):
    from vitcircuits.report.first_screen import summary_section

    run = Run.create(tmp_path / "run", "hunt", {})
    text = summary_section(run, "m", random_weights=False)
    assert "The composition stage has not run" in text and 'id="verdict-counts"' not in text and "<figure" not in text


def test_how_to_read_links_into_the_docs(tmp_path, monkeypatch):
    import re

    from vitcircuits.report import first_screen

    run = _run(tmp_path, circuits_document())
    text = first_screen.how_to_read_section(run)
    assert text.anchor == "how-to-read" and "Supported = it composes" in text and "effect [95 % bootstrap interval over images] vs null q95" in text
    hrefs = re.findall(r'<a href="([^"]+)">docs/([a-z]+\.md)</a>', text)
    assert {doc for _, doc in hrefs} == {"composition.md", "heads.md", "sae.md", "shapes.md", "report.md"}
    for href, doc in hrefs:
        assert not href.startswith("/") and (run.path / href).resolve() == (first_screen.DOCS / doc).resolve() and (run.path / href).is_file()
    monkeypatch.setattr(first_screen, "DOCS", tmp_path / "no-docs")  # an installed wheel has no docs folder
    text = first_screen.how_to_read_section(run)
    assert "<a " not in text and "<code>docs/heads.md</code> (in the vitcircuits source)" in text


def test_page_has_a_table_of_contents_of_every_section_and_collapsed_galleries(tmp_path):
    import re

    from vitcircuits.report import html

    png = tmp_path / "figures" / "a.png"
    _png(png)
    sections = [html.paragraph("a note before the sections", "note"),
                html.section("First <one>", html.figure(png, "kept open"), "first"),
                html.section("Gallery", html.gallery("Attention maps", [(png, "one"), (png, "two")]), "gallery"),
                html.section("Empty gallery", html.gallery("nothing", []), "empty")]
    page = html.page("title", sections)
    toc = re.search(r'<nav id="toc"[^>]*>(.*?)</nav>', page).group(1)
    assert re.findall(r'href="#([^"]+)"', toc) == re.findall(r'<section id="([^"]+)"', page) == ["first", "gallery", "empty"]
    assert "First &lt;one&gt;" in toc and "note" not in toc
    assert "<details><summary>Attention maps (2 figures)</summary><figure>" in page and page.count("<details>") == 1
    details = re.search(r"<details>.*?</details>", page).group(0)
    assert details.count("<figure>") == 2 and "kept open" not in details
    assert "<script" not in page and "http://" not in page and "https://" not in page and "<link" not in page
    assert all(src.startswith("data:image/png;base64,") for src in re.findall(r'src="([^"]+)"', page))
