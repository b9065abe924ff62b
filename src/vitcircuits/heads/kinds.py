"""Head kinds from head metrics, by documented thresholds.

Rules, applied in order (first match wins); all masses are from :mod:`vitcircuits.heads.metrics`:
1. ``cls/sink``: cls + distillation + register mass ≥ ``sink_mass``.
2. ``self``: self mass ≥ ``self_mass``.
3. ``directional``: the kernel's peak is at a non-zero offset and holds ≥ ``shift_mass`` (a
   shift head, at any distance).
4. ``modular``: neighbour mass ≥ ``local_mass``, ≥ ``modular_directions`` of the 8 directions each
   hold ≥ 1/16 of it, and direction entropy ≥ ``modular_entropy`` (local, several directions).
5. ``directional``: neighbour mass ≥ ``local_mass`` and one direction holds ≥ ``directional_share``.
6. ``global``: mean distance ≥ ``global_distance`` × the uniform-attention baseline's distance.
7. ``mixed``: anything else.

Rules 4 and 5 call a head local, which means something only when attention spread uniformly over
the grid is not local already: on a grid so small that the uniform baseline's neighbour mass
reaches ``local_mass`` (a 3 × 3 grid at radius 1, where every patch is a neighbour of the
centre), they never apply.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vitcircuits.heads.metrics import HeadRow

KINDS = ("modular", "directional", "self", "cls/sink", "global", "mixed")


@dataclass(frozen=True)
class KindThresholds:
    """Cut-offs for :func:`classify`; defaults are used by every command and documented above."""

    sink_mass: float = 0.5
    """Raw attention on CLS/distillation/register tokens that makes a sink head."""
    self_mass: float = 0.5
    """Renormalised attention on the query itself that makes a self head."""
    shift_mass: float = 0.5
    """Mass at a single non-zero offset that makes a shift (directional) head."""
    local_mass: float = 0.5
    """Renormalised neighbour mass (Chebyshev ≤ R) that makes a head local."""
    modular_directions: int = 4
    """Directions, of 8, that must each hold ≥ 1/16 of a modular head's neighbour mass."""
    modular_entropy: float = 0.6
    """Minimum normalised direction entropy of a modular head."""
    directional_share: float = 0.5
    """Share of neighbour mass in one direction that makes a local head directional."""
    global_distance: float = 0.8
    """Fraction of the uniform-attention mean distance above which a head is global."""


def classify(row: HeadRow, uniform: HeadRow, t: KindThresholds = KindThresholds()) -> str:
    """The kind of one head from its metrics row; ``uniform`` is the metrics row of uniform
    attention on the same grid."""
    if row.cls_mass + row.dist_mass + row.register_mass >= t.sink_mass:
        return "cls/sink"
    if row.self_mass >= t.self_mass:
        return "self"
    if (row.peak_dy, row.peak_dx) != (0, 0) and row.peak_mass >= t.shift_mass:
        return "directional"
    if row.neighbour_mass >= t.local_mass > uniform.neighbour_mass:
        if row.direction_coverage >= t.modular_directions and row.direction_entropy >= t.modular_entropy:
            return "modular"
        if row.top_direction_share >= t.directional_share:
            return "directional"
    if row.mean_distance_patches >= t.global_distance * uniform.mean_distance_patches:
        return "global"
    return "mixed"
