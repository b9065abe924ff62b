"""The ``necessity`` stage (``hunt`` and ``vitcircuits necessity``): accuracy per class group with
the circuit's heads ablated, against random heads of the same layers
(:func:`~vitcircuits.composition.necessity.necessity_report`)."""
from __future__ import annotations

from collections.abc import Sequence

from vitcircuits.composition.necessity import (
    NecessityConfig,
    PredictionsPass,
    ZStatsPass,
    assemble_report,
    circuit_heads,
    joined_predictions,
    necessity_conditions,
)
from vitcircuits.data.loader import LoadSummary
from vitcircuits.files import read_json, write_json
from vitcircuits.inputs import ImageSet
from vitcircuits.layout import LAYOUT
from vitcircuits.models.loading import LoadedModel
from vitcircuits.runs import Run
from vitcircuits.stages.composition import read_circuits


def run_necessity(run: Run, loaded: LoadedModel, images: ImageSet, heads: Sequence[tuple[int, int]], groups: dict[str, list[int]],
                  config: NecessityConfig) -> tuple[dict, LoadSummary]:
    """Ablate ``heads`` on the labelled images of ``images`` through their engine (one pass for the
    mean-ablation statistics, one for the ablations); write ``necessity.json`` and return the
    report and what the passes read."""
    model = loaded.model
    conditions = necessity_conditions(heads, model.cfg.n_heads, config)
    stats = images.map(loaded, ZStatsPass()).result
    streamed = images.map(loaded, PredictionsPass(conditions, stats, config))
    report = assemble_report(model, conditions, *joined_predictions(streamed.result), groups, config)
    write_json(run.file(LAYOUT.necessity_json), report)
    run.write_manifest(necessity={"heads": report["circuit"]["heads"], "clean": report["clean"], "circuit": report["circuit"]["overall"]})
    return report, streamed.summary


def necessity_stage(run: Run, loaded: LoadedModel, images: ImageSet, config: NecessityConfig, max_images: int | None) -> None:
    """``hunt``'s stage: ablate the supported circuits' heads on the first ``max_images`` images
    (None: all); ``necessity.json`` says why when it cannot."""
    overview = read_json(run.file(LAYOUT.overview_summary))
    heads = circuit_heads(read_circuits(run.path))
    reason = ("the model has no classification head" if not loaded.model.cfg.n_classes else
              "the images have no class labels" if not overview["n_labelled"] else
              "no supported circuit" if not heads else None)
    if reason:
        write_json(run.file(LAYOUT.necessity_json), {"skipped": reason})
        return
    groups = dict(loaded.pretrained_cfg.get("class_groups") or {})
    run_necessity(run, loaded, images.first(max_images), heads, groups, config)
