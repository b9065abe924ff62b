"""Settings of the composition stage (:mod:`~vitcircuits.composition.scan`)."""
from __future__ import annotations

from dataclasses import dataclass, field

from vitcircuits.composition.circuits import VerdictCriteria
from vitcircuits.composition.edge_attribution import EdgeAttributionConfig
from vitcircuits.composition.evidence import N_BOOT
from vitcircuits.composition.patching import PatchingConfig
from vitcircuits.composition.transfer import TransferConfig
from vitcircuits.composition.weights import CompositionConfig


@dataclass(frozen=True)
class ComposeConfig:
    """Settings of the composition stage."""

    weights: CompositionConfig = field(default_factory=CompositionConfig)
    """Weight-score settings (LN folding, centring, baseline samples)."""
    patching: PatchingConfig = field(default_factory=PatchingConfig)
    """Ablation kind (default: mean over images and positions) and radius."""
    criteria: VerdictCriteria = field(default_factory=VerdictCriteria)
    """Practical floors of the composes line and the shuffle reading's threshold."""
    attribution: EdgeAttributionConfig = field(default_factory=EdgeAttributionConfig)
    """Integration steps of the all-edge attribution."""
    max_patch_images: int | None = 64
    """Images used for path patching and the shuffle control, a seeded uniform sample of all
    (image folders are often sorted by class); None: all."""
    transfer: TransferConfig = field(default_factory=TransferConfig)
    """Neighbour → centre probes (radius is capped to what the grid allows)."""
    max_transfer_images: int | None = 512
    """Images for the transfer probes (None: all)."""
    task_images: int = 64
    """Images (a seeded uniform sample of all) for edge attribution and the exact task-level
    checks; 0: off, and then no edge can be shown to matter."""
    max_task_edges: int = 300
    """Every edge is checked exactly when the model has at most this many (a small organism)."""
    task_candidates: int = 24
    """Else the edges with the largest attributed drops that are checked exactly, each with up to
    :data:`~vitcircuits.composition.evidence.MIN_NULL` other senders into its receiver input."""
    agreement_top: int = 40
    """The rank agreement of attribution with the exact checks is also reported over this many
    checked edges with the largest exact drops."""
    n_boot: int = N_BOOT
    """Bootstrap resamples of the images for every effect's interval."""
    task_metric: str = "auto"
    """``auto`` (the margin of a classifier's own prediction, the move of a backbone's final token
    stream), ``margin``, ``embedding``, or ``probe`` (the margin of a linear probe on the pooled
    output, fitted by the caller on labelled images and passed to :func:`run_composition`)."""
