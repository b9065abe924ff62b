"""Every path of a run folder, named once (``docs/run-folder.md`` draws the tree).

``hunt`` and the standalone commands write the same layout: ``vitcircuits heads`` writes
``heads/``, ``compose`` ``heads/`` and ``composition/``, ``necessity`` ``necessity/``, ``sae train``
``sae/``, so every reader (the report, the explorer, ``--heads-from``, ``--circuits``) looks in one
place. Paths are relative to the run folder, POSIX-style.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RunLayout:
    """The relative paths of a run folder."""

    manifest: str = "manifest.json"
    """What ran, on what, with which versions, and a summary of every stage."""
    stages: str = "stages.json"
    """Per stage: the hash of its inputs, when it finished, the manifest sections it wrote."""
    truth: str = "truth.json"
    """Known causal edges given with ``hunt --truth``."""
    report: str = "report.html"
    """The offline report."""
    overview: str = "overview"
    """Predictions and attention-map grids."""
    predictions: str = "overview/predictions.csv"
    overview_summary: str = "overview/summary.json"
    heads: str = "heads"
    """The head atlas: ``atlas.json``, ``heads.csv``, ``kernels.npz`` and figures."""
    atlas: str = "heads/atlas.json"
    heads_figures: str = "heads/figures.json"
    composition: str = "composition"
    """Every edge's evidence and verdict: ``composition.csv``, ``circuits.json`` and figures."""
    circuits: str = "composition/circuits.json"
    composition_csv: str = "composition/composition.csv"
    composition_figures: str = "composition/figures.json"
    necessity: str = "necessity"
    necessity_json: str = "necessity/necessity.json"
    sae: str = "sae"
    """The SAE stage: harvest, checkpoints, the SAE and its metrics."""
    activations: str = "sae/activations"
    """Harvest shards and their ``index.json`` (:mod:`vitcircuits.cache`)."""
    sae_training: str = "sae/training"
    """SAE checkpoints (resumable)."""
    sae_weights: str = "sae/sae"
    """The trained SAE in SAELens layout."""
    sae_metrics: str = "sae/metrics.json"
    features: str = "sae/features"
    """Feature statistics, circuit dependence, compositional features and galleries."""
    features_json: str = "sae/features/features.json"
    dependence_csv: str = "sae/features/dependence.csv"
    cache: str = "activations"
    """Shards of ``vitcircuits cache``."""
    dynamics: str = "dynamics"
    """Training dynamics (``vitcircuits dynamics``): per-checkpoint measurements and the formation fits."""
    dynamics_checkpoints: str = "dynamics/checkpoints"
    """A bundled series, unpacked (float16 checkpoints in the timm hub layout)."""
    dynamics_steps: str = "dynamics/steps"
    """One folder per checkpoint: its atlas (``heads/``), ``measures.safetensors`` and ``key.json``."""
    formation_json: str = "dynamics/formation.json"
    """Every followed metric's curve and formation step, and the lags."""
    formation_csv: str = "dynamics/formation.csv"
    atlas_by_step_csv: str = "dynamics/atlas_by_step.csv"
    """Every checkpoint's atlas in one table: kind, modular score, neighbour mass, peak offset per head."""
    lags_csv: str = "dynamics/lags.csv"
    dynamics_figures: str = "dynamics/figures.json"


LAYOUT = RunLayout()
"""The layout every command writes."""
