"""The report's first and last sections: one verdict per claim of the hypothesis, each with its
baseline and interval, and the caveats that bound what the run shows."""
from __future__ import annotations

import math

from vitcircuits.files import read_json
from vitcircuits.layout import LAYOUT
from vitcircuits.models.loading import LoadedModel
from vitcircuits.report import html
from vitcircuits.runs import Run


def read(run: Run, name: str) -> dict | list | None:
    """The JSON file ``name`` of the run, or None when the stage did not write it."""
    path = run.file(name)
    return read_json(path) if path.exists() else None


def _heads_claim(atlas: dict) -> tuple:
    rows, uniform = atlas["rows"], atlas["baselines"]["uniform"]
    best = max(rows, key=lambda r: r["modular_score"])
    modular = [r for r in rows if r["kind"] == "modular"]
    directional = [r for r in rows if r["kind"] == "directional"]
    answer = "yes" if modular else ("partly: directional heads only" if directional else "no")
    evidence = (f"{len(modular)} modular and {len(directional)} directional of {len(rows)} heads. Most modular: L{best['layer']}H{best['head']} "
                f"modular_score {best['modular_score']:.3f} [95% CI {best['modular_score_lo']:.3f}, {best['modular_score_hi']:.3f}] "
                f"against {uniform['modular_score']:.3f} for uniform attention on this grid.")
    return ("1. Early heads attend to the patches around the query, in several directions (modular heads)", answer, evidence)


def number(value: float | None, digits: int = 3) -> str:
    """``value`` to ``digits`` decimals; "n/a" for None and non-finite values."""
    return f"{value:.{digits}f}" if value is not None and math.isfinite(value) else "n/a"


def line_text(line: dict | None, digits: int = 4, floor: bool = False) -> str:
    """One line of evidence: effect [95% interval] against its null's 95th percentile (and its
    floor); "not checked" for None."""
    if line is None:
        return "not checked"
    text = f"{number(line['effect'], digits)} [{number(line['lo'], digits)}, {number(line['hi'], digits)}]"
    if line["null_q95"] is None:
        text += f", below its floor {number(line['floor'], digits)} (no null drawn)"
    else:
        text += f" vs null q95 {number(line['null_q95'], digits)} ({line['n_null']} members"
        text += ", no spread: the interval must clear it)" if line["null_degenerate"] else f", z {number(line['z'], 1)})"
        if floor:
            text += f", floor {number(line['floor'], digits)}"
    return text + ("; beyond" if line["beyond"] else "; not beyond")


def task_metric_text(task: dict) -> str:
    """What the task metric is, in words."""
    if task.get("kind") == "embedding":
        return "the move of the embedding"
    return "a linear probe's margin" if task.get("probe") else "the logit margin of the model's prediction"


def strongest_supported(data: dict) -> dict | None:
    """The circuit the report leads with: the first supported edge (``circuits.json`` lists them by
    drop) from a modular or directional sender, else the first supported edge; None without one."""
    supported = [c for c in data["circuits"] if c["verdict"] == "supported"]
    local = [c for c in supported if set(c["sender_kinds"]) & {"modular", "directional"}]
    return (local or supported or [None])[0]


def _composition_claim(data: dict) -> tuple:
    claim = "2. Later heads read what those heads wrote (composition)"
    counts, n_edges = data["verdicts"], data["n_edges"]
    supported = [c for c in data["circuits"] if c["verdict"] == "supported"]
    if not supported:
        checked = " (no task images: no edge was checked for mattering)" if not data.get("task_metric") else ""
        return (claim, "no", f"None of {n_edges} edges both composes and matters{checked}; {counts['weak']} are weak (exactly one of the two).")
    local = [c for c in supported if set(c["sender_kinds"]) & {"modular", "directional"}]
    c = strongest_supported(data)
    e = c["evidence"]
    (sl, sh), (rl, rh) = c["senders"][0], c["receivers"][0]
    composes = "; ".join(f"at {where} queries {e['composes']['metric']} {line_text(e['composes'][where])}" for where in c["read_at"])
    weights = e["weights"]
    percentile = weights["percentile_earlier"]
    rank = "" if percentile is None else f", percentile {number(100 * percentile, 0)} among the earlier heads into the receiver"
    evidence = (f"{counts['supported']} of {n_edges} edges supported ({len(local)} from modular or directional senders), {counts['weak']} weak. "
                f"Strongest: L{sl}H{sh} → L{rl}H{rh} through {c['kind'].upper()}: composes {composes}; "
                f"matters: drop of {task_metric_text(data.get('task_metric') or {})} {line_text(e['matters'], floor=True)}; "
                f"weight score z {number(weights['z'], 1)} against random heads{rank} (corroboration only); "
                f"shuffle reading: {c['shuffle_reading']}.")
    rho = (data.get("attribution") or {}).get("spearman_checked")
    if rho is not None:
        evidence += f" EAP-IG attribution agrees with exact task-level patching at Spearman {number(rho, 2)} over the checked edges."
    answer = "yes" if local else "only from non-local senders (no modular or directional head to read)"
    return (claim, answer, evidence)


def _transfer_claim(transfer: dict, skipped: str | None) -> tuple | None:
    if skipped:
        return ("2b. The centre token gains its neighbours' features", "not measured", f"The transfer probes were skipped: {skipped}.")
    clean = transfer.get("clean")
    if not clean or len(clean["ring_r2"][0]) < 2:
        return None
    ring1 = [row[1] for row in clean["ring_r2"]]
    best = max(range(1, len(ring1)), key=lambda i: ring1[i])
    gain = ring1[best] - ring1[0]
    evidence = (f"Held-out R² of ridge probes predicting a distance-1 neighbour's patch embedding from the centre token: {ring1[0]:.3f} at the "
                f"embedding (what the centre patch alone implies), {ring1[best]:.3f} at {clean['layers'][best]} ({clean['n_test_images']} test images).")
    for name, result in transfer.items():
        if name != "clean":
            evidence += f" With {name}: {result['ring_r2'][best][1]:.3f}."
    answer = "yes" if gain > 0.01 else "no gain over the embedding"
    return ("2b. The centre token gains its neighbours' features", answer, evidence)


def _necessity_claim(data: dict) -> tuple:
    keys = ["overall", *data["groups"]]
    random = data["random"]
    parts = [f"{key}: {data['clean'][key]:.3f} clean → {data['circuit'][key]:.3f} with the circuit ablated, "
             f"{random[key]['mean']:.3f} [5–95%: {random[key]['p05']:.3f}, {random[key]['p95']:.3f}] with random heads"
             for key in keys if key in random]
    heads = ", ".join(f"L{layer}H{head}" for layer, head in data["circuit"]["heads"])
    evidence = (f"Mean-ablating the {len(data['circuit']['heads'])} heads of the supported circuits ({heads}) on {data['n_images']} labelled "
                f"images, against {random['n_draws']} draws of as many random heads from the same layers. Accuracy " + "; ".join(parts)
                + f". Chance: {data['chance']['model']:.3f}.")
    drop = data["clean"]["overall"] - data["circuit"]["overall"]
    random_drop = data["clean"]["overall"] - random["overall"]["mean"] if random["n_draws"] else 0.0
    beats_every_draw = not random["n_draws"] or random["overall"]["fraction_at_or_below_circuit"] == 0
    answer = "yes" if beats_every_draw and drop > max(2 * random_drop, 0.02) else ("partly" if drop > random_drop + 0.01 else "no")
    return ("2c. The model needs the circuit (ablation beyond random heads)", answer, evidence)


def _features_claim(features: dict, metrics: dict) -> tuple:
    held = metrics["held_out"]
    n, total = features["n_compositional"], features["n_features_analysed"]
    evidence = (f"SAE on {metrics['hook']}: explained variance {held['explained_variance']:.3f} at L0 {held['l0']:.1f} on held-out images. "
                f"{n} of {total} analysed features need their neighbours (occlusion or shuffle) and the circuit beyond random heads.")
    if features["top"]:
        t = features["top"][0]
        excess = "n/a" if t.get("circuit_excess") is None else f"{t['circuit_excess']:.2f}"
        evidence += (f" Top: feature {t['feature']} (neighbour drop {t['neighbour_drop']:.2f}, centre drop {t['drop_centre']:.2f}, "
                     f"circuit minus random heads {excess}).")
    return ("3. Features after the composition layer combine neighbouring parts", "yes" if n else "no", evidence)


def claims(run: Run) -> list[tuple[str, str, str]]:
    """(claim, verdict, evidence and baseline) for each claim of the hypothesis the run's files can answer."""
    out = []
    atlas = read(run, LAYOUT.atlas)
    if atlas:
        out.append(_heads_claim(atlas))
    circuits = read(run, LAYOUT.circuits)
    if circuits:
        out.append(_composition_claim(circuits))
        transfer = _transfer_claim(circuits.get("transfer") or {}, circuits.get("transfer_skipped"))
        if transfer:
            out.append(transfer)
    necessity = read(run, LAYOUT.necessity_json)
    if necessity and "skipped" not in necessity:
        out.append(_necessity_claim(necessity))
    features, metrics = read(run, LAYOUT.features_json), read(run, LAYOUT.sae_metrics)
    if features and metrics:
        out.append(_features_claim(features, metrics))
    return out


def verdict_section(run: Run) -> str:
    intro = "Each claim of the hypothesis, what this run says, and the evidence with its baseline. Details follow in the sections below."
    return html.section("Verdicts", html.paragraph(intro) + html.table(claims(run), ("claim", "verdict", "evidence and baseline")), "verdicts")


def caveats_section(run: Run, loaded: LoadedModel) -> str:
    items = []
    overview = read(run, LAYOUT.overview_summary) or {}
    n_images = (overview.get("images") or {}).get("n_ok")
    if n_images is not None:
        items.append(f"All numbers come from {n_images} images; intervals are bootstrap intervals over images, not over models or datasets.")
    if loaded.random_weights:
        items.append("The model has random weights: nothing here describes a trained model.")
    circuits = read(run, LAYOUT.circuits)
    if circuits:
        items += [
            f"Ablation is '{circuits.get('ablation')}'. Mean ablation over images and positions removes position-specific output too; "
            "other ablations (position_mean, zero, resample) can give other effect sizes.",
            "Trained weights beat the random-matrix baseline almost everywhere, so weight scores only corroborate: a supported edge must "
            "compose (the receiver reads the sender beyond a null of other earlier heads and random-direction controls) and matter "
            "(ablating the edge alone lowers the task metric beyond a null of the same kind).",
            "Path patching measures direct sender → receiver paths only; effects through intermediate layers are not counted.",
            "EAP-IG edge attribution is an estimate; it picks the edges checked exactly and is not itself a verdict. "
            "An edge it leaves unchecked can be weak at most.",
        ]
    necessity = read(run, LAYOUT.necessity_json)
    if necessity and "skipped" not in necessity:
        items.append("Necessity ablates all circuit heads at once: it shows that the model needs those heads, not which edge between them "
                     "matters, and a head can serve other computations too. Task-level path patching (composition section) tests single edges.")
    if "held_out" in (read(run, LAYOUT.sae_metrics) or {}):
        items += [
            "Occluding patches with the mean colour is off-distribution; the shuffle variant keeps natural patch statistics, and both are reported.",
            "Feature dependence is measured on each feature's top-activating patches, not on all patches where it fires.",
        ]
    body = "<ul>" + "".join(f"<li>{html.escape(text)}</li>" for text in items) + "</ul>"
    return html.section("Caveats", body, "caveats")
