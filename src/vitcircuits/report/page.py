"""``report.html`` of a hunt run, built only from the files the stages wrote."""
from __future__ import annotations

from vitcircuits.files import read_json, write_text
from vitcircuits.layout import LAYOUT
from vitcircuits.models.loading import LoadedModel
from vitcircuits.report import html
from vitcircuits.report.first_screen import how_to_read_section, summary_section
from vitcircuits.report.formation_section import formation_section
from vitcircuits.report.sae_section import sae_section
from vitcircuits.report.summary import caveats_section, line_text, number, task_metric_text, verdict_section
from vitcircuits.report.truth_section import truth_section
from vitcircuits.runs import Run


def model_card(loaded: LoadedModel) -> list[tuple[str, str]]:
    cfg, layout = loaded.model.cfg, loaded.model.layout
    n_params = sum(p.numel() for p in loaded.model.parameters())
    return [
        ("model", loaded.model_id),
        ("family / architecture", f"{loaded.family} / {loaded.arch}"),
        ("weights sha256", loaded.weights_sha256 or "RANDOM WEIGHTS"),
        ("parameters", f"{n_params:,}"),
        ("layers × heads × head width", f"{cfg.n_layers} × {cfg.n_heads} × {cfg.d_head}"),
        ("residual width / MLP width", f"{cfg.d_model} / {cfg.d_mlp}"),
        ("input / patch", f"{cfg.img_size[0]}×{cfg.img_size[1]} px / {cfg.patch_size[0]}×{cfg.patch_size[1]} px"),
        ("token layout", f"CLS={layout.cls_index}, DIST={layout.dist_index}, registers={layout.n_registers}, "
                         f"patches {layout.rows}×{layout.cols} from token {layout.patch_start}"),
        ("pooling / final norm / head", f"{cfg.pooling} / {cfg.final_norm} / {cfg.n_classes or 'none'}"),
    ]


def _figures(run: Run, figures: list) -> str:
    return "".join(html.figure(run.file(path), caption) for path, caption in figures)


def _gallery(run: Run, figures: list, title: str) -> str:
    return html.gallery(title, [(run.file(path), caption) for path, caption in figures])


def _ci(row: dict, name: str) -> str:
    return f"{number(row[name])} [{number(row[name + '_lo'])}, {number(row[name + '_hi'])}]"


def _total(*values: float | None) -> float | None:
    return None if any(v is None for v in values) else sum(values)


def heads_section(run: Run) -> str:
    atlas = read_json(run.file(LAYOUT.atlas))
    rows, baselines = atlas["rows"], atlas["baselines"]
    modular = sorted((r for r in rows if r["kind"] == "modular"), key=lambda r: -r["modular_score"])
    top = sorted(rows, key=lambda r: -r["modular_score"])[:8]
    counts = {}
    for r in rows:
        counts[r["kind"]] = counts.get(r["kind"], 0) + 1
    verdict = (f"{len(modular)} of {len(rows)} heads are modular (local and multi-directional): "
               + ", ".join(f"L{r['layer']}H{r['head']}" for r in modular) if modular
               else f"No head of {len(rows)} meets the modular criteria.")
    table = html.table(
        [(f"L{r['layer']}H{r['head']}", r["kind"], _ci(r, "modular_score"), _ci(r, "neighbour_mass"), number(r["self_mass"]),
          number(_total(r["cls_mass"], r["dist_mass"], r["register_mass"])), r["direction_coverage"], number(r["mean_distance_px"], 1),
          number(r["content_dependence"]), number(r["positional_agreement"])) for r in top],
        ("head", "kind", "modular_score [95% CI]", "neighbour mass [95% CI]", "self", "CLS/reg", "directions", "mean dist px",
         "content dep.", "positional agreement"),
    )
    base = html.table([(name, number(b["modular_score"]), number(b["neighbour_mass"]), number(b["mean_distance_px"], 1))
                       for name, b in baselines.items()], ("baseline head on this grid", "modular_score", "neighbour mass", "mean dist px"))
    figures = read_json(run.file(LAYOUT.heads_figures))
    overlays = [f for f in figures if f[0].rsplit("/", 1)[-1].startswith("overlay_")]
    kinds = "Kinds: " + ", ".join(f"{kind} {n}" for kind, n in sorted(counts.items(), key=lambda kv: -kv[1])) + "."
    return html.section("Head atlas", html.paragraph(verdict) + html.paragraph(kinds)
                        + "<h3>Most modular heads</h3>" + table + "<h3>Baselines</h3>" + base
                        + _figures(run, [f for f in figures if f not in overlays])
                        + _gallery(run, overlays, "The most modular heads' attention on images"), "heads")


def _circuit_row(c: dict) -> tuple:
    e = c["evidence"]
    weights, shuffle = e["weights"], e["shuffle"]
    percentile = "" if weights["percentile_earlier"] is None else f" (percentile {number(100 * weights['percentile_earlier'], 0)} among earlier heads)"
    return (
        ", ".join(f"L{layer}H{head}" for layer, head in c["senders"]) + f" ({', '.join(c['sender_kinds'])})",
        ", ".join(f"L{layer}H{head}" for layer, head in c["receivers"]), c["kind"].upper(), c["verdict"] + (" (silent)" if c["silent"] else ""),
        "+".join(c["read_at"]) or "—", f"{e['composes']['metric']} {line_text(e['composes']['patch'])}",
        "—" if e["composes"]["prefix"] is None else line_text(e["composes"]["prefix"]), line_text(e["matters"], floor=True),
        number(e["attribution"], 4), number(weights["z"], 1) + percentile,
        f"{c['shuffle_reading']} (kept {number(shuffle['attention_kept'], 2)}; effect {number(shuffle['effect'], 4)})",
    )


def composition_section(run: Run, n_rows: int = 15) -> str:
    data = read_json(run.file(LAYOUT.circuits))
    circuits, counts, task = data["circuits"], data["verdicts"], data.get("task_metric") or {}
    ablation = f" ({data['ablation']} ablation of the sender)" if data["ablation"] else ""
    summary = (f"Every edge sender → later receiver → Q/K/V gets a verdict{ablation}: of {data['n_edges']} edges, {counts['supported']} are "
               f"supported, {counts['weak']} weak and {counts['none']} none. Supported = the edge composes and matters. Composes: path "
               "patching the sender into the receiver's one input changes the receiver (Q/K: Jensen–Shannon divergence of its attention, "
               "patch_js; V: relative change of its output, patch_rel_out) beyond a null built from the other earlier heads into the same "
               "receiver input and random-direction controls, at patch queries or at prefix queries (class token, registers). Matters: "
               f"ablating that one edge lowers the task metric ({task_metric_text(task)}) beyond a null built the same way and above its floor. "
               "Weak = exactly one of the two; weight scores only corroborate. Each line: effect [95% bootstrap interval over images] "
               "against the null's 95th percentile.")
    if task:
        summary += (f" Task metric on {task['n_images']} images (target: {task['target']}): clean mean {number(task['clean_mean'])}, "
                    f"floor {number(task['floor'])}; {task['n_checked']} of {task['n_edges']} edges checked exactly, their nulls drawn from "
                    f"{task['n_null_edges']} other-sender edges.")
    else:
        summary += " No task images: no edge was checked for mattering, so none can be supported."
    table = html.table([_circuit_row(c) for c in circuits[:n_rows]],
                       ("senders", "receiver", "kind", "verdict", "read at", "composes at patch queries", "composes at prefix queries",
                        "matters: task-metric drop", "attribution (EAP-IG)", "weight z (corroboration)", "shuffle reading"))
    listed = (f"The table shows {min(n_rows, len(circuits))} of the {len(circuits)} edges that are supported, weak or were checked "
              "exactly, supported first, by drop.")
    reading = ("Shuffle reading: 'positional' = the receiver attends the same way when the patches are shuffled (attention "
               "follows position, so on shuffled images it moves unrelated content); 'content-matching' = its attention changes.")
    figures = read_json(run.file(LAYOUT.composition_figures))
    named = [f"L{c['senders'][0][0]}H{c['senders'][0][1]} → L{c['receivers'][0][0]}H{c['receivers'][0][1]} "
             f"({c['kind'].upper()}, {c['shuffle_reading']})" for c in circuits if c["verdict"] == "supported"][:8]
    verdict_line = "Supported: " + "; ".join(named) if named else "No edge is supported."
    return html.section("Composition", html.paragraph(summary) + html.paragraph(verdict_line) + html.paragraph(listed) + table
                        + html.paragraph(reading) + _attribution_paragraph(data) + _figures(run, figures), "composition")


def _attribution_paragraph(data: dict) -> str:
    agreement, task = data.get("attribution") or {}, data.get("task_metric") or {}
    if not agreement.get("n_checked"):
        return ""
    text = (f"Task-grounded edge attribution (EAP-IG, {task.get('attribution_steps', 'n/a')} integration steps) estimated the drop of the "
            f"task metric for every edge ({task.get('n_edges', data['n_edges'])}); the edges checked exactly were picked by it. Its Spearman "
            f"rank correlation with exact task-level path patching is {number(agreement['spearman_checked'], 2)} over the {agreement['n_checked']} "
            f"checked edges and {number(agreement['spearman_top'], 2)} over the {agreement['n_top']} with the largest exact drops.")
    direct = data.get("direct") or []
    if direct:
        text += " Largest attributed drops of direct paths sender → output: " + "; ".join(
            f"L{d['sender'][0]}H{d['sender'][1]} ({number(d['attributed_drop'])})" for d in direct[:5]) + "."
    return html.paragraph(text)


def necessity_section(data: dict) -> str:
    """Accuracy per class group: clean, with the circuit's heads ablated, with random same-layer heads."""
    if "skipped" in data:
        return html.section("Necessity", html.paragraph(f"Not measured: {data['skipped']}."), "necessity")
    keys = ["overall", *data["groups"]]
    rows = [("clean", *(f"{data['clean'][k]:.3f}" for k in keys)),
            ("circuit heads ablated", *(f"{data['circuit'][k]:.3f}" for k in keys))]
    if data["random"]["n_draws"]:
        rows.append((f"random heads ({data['random']['n_draws']} draws): mean [5–95%]",
                     *(f"{data['random'][k]['mean']:.3f} [{data['random'][k]['p05']:.3f}, {data['random'][k]['p95']:.3f}]" for k in keys)))
    heads = ", ".join(f"L{layer}H{head}" for layer, head in data["circuit"]["heads"])
    text = (f"Top-1 accuracy on {data['n_images']} labelled images with the {data['ablation']}-ablated heads of the supported circuits ({heads}), "
            "against as many random heads from the same layers. " + "; ".join(f"{name}: classes {classes}" for name, classes in data["groups"].items()))
    return html.section("Necessity", html.paragraph(text) + html.table(rows, ("condition", *keys)), "necessity")


def write_report(run: Run, loaded: LoadedModel) -> None:
    overview = read_json(run.file(LAYOUT.overview_summary))
    images = overview["images"]
    data_rows = [
        ("source", images["source"]),
        ("images used / skipped", f"{images['n_ok']} / {images['n_skipped']}"),
        ("image list sha256", images["image_list_sha256"]),
        ("labels", images.get("labels") or "none"),
    ]
    ignored = images.get("ignored")
    if ignored:
        extensions = ", ".join(f"{ext} ×{n}" for ext, n in ignored["extensions"].items()) or "none"
        data_rows.append(("files not listed", f"{ignored['n']} (hidden {ignored['hidden']}; other extensions: {extensions}; symlinked "
                                              f"folders not followed {ignored['repeated_folders']}; unreadable folders {ignored['unreadable_folders']})"))
    if overview["accuracy"] is not None:
        data_rows.append(("top-1 accuracy", f"{overview['accuracy']:.3f} on {overview['n_labelled']} labelled images"))
    sections = [
        summary_section(run, loaded.model_id, loaded.random_weights),
        how_to_read_section(run),
        verdict_section(run),
        html.section("Model", html.table(model_card(loaded)), "model"),
        html.section("Data", html.table(data_rows), "data"),
    ]
    if run.file(LAYOUT.atlas).exists():
        sections.append(heads_section(run))
    if run.file(LAYOUT.circuits).exists():
        sections.append(composition_section(run))
        if run.file(LAYOUT.truth).exists():
            sections.append(truth_section(run))
    if run.file(LAYOUT.necessity_json).exists():
        sections.append(necessity_section(read_json(run.file(LAYOUT.necessity_json))))
    if run.file(LAYOUT.sae_metrics).exists():
        sections.append(sae_section(run))
    if run.file(LAYOUT.formation_json).exists():
        sections.append(formation_section(run))
    sections.append(html.section(
        "Attention maps",
        html.paragraph("Each cell: one head's attention from the outlined query patch to every patch "
                       "(prefix tokens omitted, scaled to the cell's maximum).")
        + _gallery(run, overview["figures"], "Attention maps of every layer and head"),
        "attention",
    ))
    sections.append(caveats_section(run, loaded))
    if loaded.random_weights:
        sections.insert(0, html.paragraph("This model has RANDOM weights: nothing here describes a trained model.", "note"))
    write_text(run.file(LAYOUT.report), html.page(f"vitcircuits report: {loaded.model_id}", sections))
