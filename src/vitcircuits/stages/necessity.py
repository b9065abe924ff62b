"""The ``necessity`` stage (``hunt`` and ``vitcircuits necessity``): accuracy per class group with
the circuit's heads ablated, against random heads of the same layers
(:func:`~vitcircuits.composition.necessity.necessity_report`)."""
from __future__ import annotations

from collections.abc import Iterable, Sequence

from vitcircuits.composition.necessity import LabelledBatches, NecessityConfig, circuit_heads, necessity_report
from vitcircuits.files import read_json, write_json
from vitcircuits.inputs import ImageSet
from vitcircuits.layout import LAYOUT
from vitcircuits.models.loading import LoadedModel
from vitcircuits.runs import Run
from vitcircuits.stages.composition import read_circuits


def run_necessity(run: Run, loaded: LoadedModel, batches: Iterable, heads: Sequence[tuple[int, int]], groups: dict[str, list[int]],
                  config: NecessityConfig) -> dict:
    """Ablate ``heads`` on the labelled images of ``batches`` (a re-iterable of image batches: it is
    read once for the mean-ablation statistics, once for the ablations); write ``necessity.json``
    and return the report."""
    report = necessity_report(loaded.model, LabelledBatches(batches), heads, groups, config)
    write_json(run.file(LAYOUT.necessity_json), report)
    run.write_manifest(necessity={"heads": report["circuit"]["heads"], "clean": report["clean"], "circuit": report["circuit"]["overall"]})
    return report


def necessity_stage(run: Run, loaded: LoadedModel, images: ImageSet, config: NecessityConfig, max_images: int | None) -> None:
    """``hunt``'s stage: ablate the supported circuits' heads on at most ``max_images`` labelled
    images, decoded once and held for both reads (all images, streamed twice, when ``max_images``
    is None); ``necessity.json`` says why when it cannot."""
    overview = read_json(run.file(LAYOUT.overview_summary))
    heads = circuit_heads(read_circuits(run.path))
    reason = ("the model has no classification head" if not loaded.model.cfg.n_classes else
              "the images have no class labels" if not overview["n_labelled"] else
              "no supported circuit" if not heads else None)
    if reason:
        write_json(run.file(LAYOUT.necessity_json), {"skipped": reason})
        return
    groups = dict(loaded.pretrained_cfg.get("class_groups") or {})
    batches = images.first(max_images).batches()
    run_necessity(run, loaded, batches if max_images is None else list(batches), heads, groups, config)
