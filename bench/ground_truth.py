"""Score the head atlas and the composition finder against planted ground truth.

    python bench/ground_truth.py [--n-models 8] [--small] [--n-images 16] [--json PATH] [--threads 1]
                                 [--organism [--model bundled:shapes-vit ...] [--truth-images 1200] [--truth-out FILE]]

Builds ``--n-models`` members of the planted family (:mod:`vitcircuits.groundtruth.planted_family`;
different seeds, grids, depths, sender layers, class token / registers, decoys), runs the head
atlas and the composition stage on seeded noise images, and prints, per detector, precision and
recall (atlas kind labels, the ``supported`` verdict) and ROC-AUC (kind scores, weight z,
attribution, exact path-patch z) against the truth, then a JSON summary. Populations and
definitions: :mod:`vitcircuits.groundtruth.ground_truth`. Goal: precision = recall = 1 for the kinds
and the verdict. ``--small`` is the CI configuration (small grids, 8 images).

``--organism`` scores the same detectors on the trained shapes organisms instead (all of
:data:`~vitcircuits.groundtruth.organism_benchmark.SHAPES_ORGANISMS`, or the ``--model`` given), against
their causal edges measured by path-ablating each edge on the task
(:mod:`vitcircuits.groundtruth.organism_benchmark`; ``--small``: 240 truth images instead of 1200), and
ends with one table of all of them. Goals: ``supported`` at ROC-AUC ≥ 0.95, precision ≥ 0.9 and
recall ≥ 0.8; attribution at ROC-AUC ≥ 0.95. ``--truth-out`` (one ``--model``) also writes the
measured edges as a ``truth.json`` for ``vitcircuits hunt --truth`` (the bundled organisms'
copies are made with this).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

from vitcircuits.files import write_json
from vitcircuits.groundtruth.ground_truth import benchmark_configs, format_report, run_benchmark
from vitcircuits.groundtruth.organism_benchmark import SHAPES_ORGANISMS, OrganismBenchConfig, format_organism, format_organisms, run_organism


def _clean(value):
    """JSON-safe copy: NaN becomes null."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-models", type=int, default=None, help="family members (default 8, or 3 with --small)")
    parser.add_argument("--small", action="store_true", help="small grids and few images (the CI configuration)")
    parser.add_argument("--n-images", type=int, default=None, help="noise images per member (default 16, or 8 with --small)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest for these tiny models)")
    parser.add_argument("--json", type=Path, default=None, help="also write the full JSON summary (per-member details) here")
    parser.add_argument("--organism", action="store_true", help="benchmark on the trained shapes organisms instead")
    parser.add_argument("--model", action="append", default=None, help="with --organism: only this organism (repeatable; default: all shapes organisms)")
    parser.add_argument("--truth-images", type=int, default=None,
                        help=f"generated images for the organism's truth (default {OrganismBenchConfig.truth_images}, or 240 with --small)")
    parser.add_argument("--truth-out", type=Path, default=None, help="write the organism's measured edges here (truth.json layout)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.organism:
        models = args.model or list(SHAPES_ORGANISMS)
        if args.truth_out and len(models) != 1:
            parser.error("--truth-out needs exactly one --model")
        truth_images = args.truth_images or (240 if args.small else OrganismBenchConfig.truth_images)
        summaries = []
        for model in models:
            summary = run_organism(OrganismBenchConfig(model=model, truth_images=truth_images))
            print(format_organism(summary) + "\n")
            summaries.append(summary)
        if args.truth_out:
            write_json(args.truth_out, summaries[0]["truth"])
        print(format_organisms(summaries))
        print(json.dumps(_clean([{k: v for k, v in s.items() if k != "truth"} for s in summaries]), indent=1))
        if args.json:
            args.json.write_text(json.dumps(_clean(summaries), indent=1))
        return {s["config"]["model"]: s for s in summaries}
    n_models = args.n_models or (3 if args.small else 8)
    n_images = args.n_images or (8 if args.small else 16)
    summary = run_benchmark(benchmark_configs(n_models, args.small), n_images=n_images, log=lambda s: print(s, file=sys.stderr))
    print(format_report(summary))
    brief = {key: summary[key] for key in ("n_models", "n_images", "kinds", "edges", "seconds")}
    for kind in brief["kinds"].values():
        kind.pop("mislabelled", None)
    print(json.dumps(_clean(brief), indent=1))
    if args.json:
        args.json.write_text(json.dumps(_clean(summary), indent=1))
    return summary


if __name__ == "__main__":
    main()
