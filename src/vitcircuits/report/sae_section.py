"""The report's SAE section: held-out metrics, downstream fidelity and compositional features."""
from __future__ import annotations

from vitcircuits.files import read_json
from vitcircuits.layout import LAYOUT
from vitcircuits.report import html
from vitcircuits.runs import Run


def _fmt(value, spec: str = ".3f") -> str:
    return "n/a" if value is None else format(value, spec)


def _fidelity_rows(fidelity: dict) -> list[tuple]:
    rows = [("reconstruction explained variance at the hook", _fmt(fidelity.get("explained_variance")))]
    for name, label in (("sae", "SAE spliced in"), ("mean_ablation", "mean-ablated (baseline)")):
        variant = fidelity.get(name, {})
        if fidelity.get("output_kind") == "logits":
            text = f"KL {_fmt(variant.get('kl'), '.4f')} nats, top-1 agreement {_fmt(variant.get('top1_agreement'))}"
            if "delta_accuracy" in variant:
                text += f", Δaccuracy {_fmt(variant['delta_accuracy'], '+.3f')}"
        else:
            text = f"cosine of the final embedding {_fmt(variant.get('cosine'))}, relative error {_fmt(variant.get('relative_error'))}"
        rows.append((label, text))
    recovered = fidelity.get("loss_recovered", fidelity.get("cosine_recovered"))
    rows.append(("fraction of the mean-ablation damage the SAE recovers", _fmt(recovered) if recovered is not None else
                 "n/a: mean-ablating the spliced tokens does not change the output here (e.g. patch tokens after the last block "
                 "of a model that reads only the class token)"))
    return rows


def sae_section(run: Run) -> str:
    metrics = read_json(run.file(LAYOUT.sae_metrics))
    if "skipped" in metrics:
        return html.section("Sparse autoencoder and compositional features",
                            html.paragraph(f"The SAE stage was skipped: {metrics['skipped']}."), "sae")
    held = metrics["held_out"]
    sae = metrics["sae"]
    intro = (f"A {sae['architecture']} SAE with {sae['d_sae']} latents (k = {sae['k']}) on {metrics['hook']}, "
             f"chosen {metrics['hook_reason']}. Trained on {metrics['n_train_rows']} patch tokens for {metrics['steps']} steps; "
             f"every number below is on held-out images ({held['n_tokens']} tokens).")
    table = html.table([
        ("L0 (active latents per token)", _fmt(held["l0"], ".1f")),
        ("explained variance", _fmt(held["explained_variance"])),
        ("dead / dense latents", f"{held['dead_fraction']:.3f} / {held['dense_fraction']:.3f}"),
        *_fidelity_rows(metrics["fidelity"]),
    ])
    body = html.paragraph(intro) + table
    features_path = run.file(LAYOUT.features_json)
    if features_path.exists():
        features = read_json(features_path)
        heads = ", ".join(f"L{layer}H{head}" for layer, head in features["circuit_heads"]) or "none (no supported circuit up to this layer)"
        body += html.paragraph(
            f"{features['n_compositional']} of {features['n_features_analysed']} analysed features are compositional: their activation at a "
            f"patch falls when only its neighbours are occluded or shuffled, and when the circuit heads ({heads}) are ablated beyond what "
            "ablating random heads of the same layers does, while occluding the patch itself does not explain it.")
        rows = [(r["feature"], _fmt(r["density"], ".4f"), _fmt(r["drop_neighbours_occluded"], ".2f"), _fmt(r["drop_neighbours_shuffled"], ".2f"),
                 _fmt(r["drop_centre"], ".2f"), _fmt(r.get("circuit_excess"), ".2f"), _fmt(r["compositional_score"], ".2f"),
                 "yes" if r["compositional"] else "no") for r in features["top"][:12]]
        body += html.table(rows, ("feature", "density", "drop: neighbours occluded", "drop: neighbours shuffled", "drop: centre occluded",
                                  "drop: circuit − random heads", "compositional score", "compositional"))
        body += html.gallery("Feature gallery, mean maps and circuit dependence",
                             [(run.file(f"{LAYOUT.sae}/{path}"), caption) for path, caption in features["figures"]])
    return html.section("Sparse autoencoder and compositional features", body, "sae")
