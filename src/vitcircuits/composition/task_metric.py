"""What "the output" is when an edge is asked whether it matters: one number per image that a
path ablation can lower.

- ``margin`` (classifiers, or a backbone with a linear probe): the target class's logit minus the
  mean of the other logits (:func:`margin`). The target is the image's label when there is one,
  else the model's clean prediction. Unlike the log-probability it does not saturate on confident
  predictions.
- ``embedding`` (backbones without labels): minus the relative change of the model's output (the
  pooled embedding, or every final token when the model does not pool), ``−‖out − out_clean‖ /
  ‖out_clean‖``; 0 on the clean run, so its drop is the relative distance the ablation moves the
  embedding.

The **drop** of an edge is ``value(clean) − value(ablated)``, averaged over images. Its practical
floor (:meth:`TaskMetric.floor`) is 1 % of the mean clean margin, or a 1 % relative move of the
embedding: an edge that changes the output by less is not one a researcher would call part of the
circuit, whatever its significance.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

MetricKind = Literal["margin", "embedding"]
FLOOR_FRACTION = 0.01
"""The practical floor of a drop, as a fraction of the clean margin (or of the embedding's norm)."""


def margin(logits_BC: torch.Tensor, targets_B: torch.Tensor) -> torch.Tensor:
    """``[B]``: the target class's logit minus the mean of the other classes' logits."""
    true_B = logits_BC.gather(1, targets_B[:, None])[:, 0]
    return true_B - (logits_BC.sum(-1) - true_B) / (logits_BC.shape[-1] - 1)


@dataclass(frozen=True)
class TaskMetric:
    """The output metric of edge attribution and task-level path patching (module docstring)."""

    kind: MetricKind = "margin"
    """``margin`` or ``embedding``."""
    probe_CD: torch.Tensor | None = None
    """A linear probe ``[C, D]`` on the model's pooled output (with ``probe_C``): the margin is
    then taken on ``out @ probe_CD.T + probe_C``. None: the model's own logits."""
    probe_C: torch.Tensor | None = None
    """The probe's bias ``[C]``."""

    def __post_init__(self) -> None:
        if self.kind not in ("margin", "embedding"):
            raise ValueError(f"unknown task metric {self.kind!r}; choose margin or embedding")
        if (self.probe_CD is None) != (self.probe_C is None):
            raise ValueError("a linear probe needs both its weight and its bias")

    def readout(self, output: torch.Tensor) -> torch.Tensor:
        """The model's output as this metric reads it: logits for ``margin``, the output for ``embedding``."""
        if self.probe_CD is None:
            return output
        return output @ self.probe_CD.to(output).T + self.probe_C.to(output)

    def targets(self, clean_output: torch.Tensor, labels_B: torch.Tensor | None = None) -> torch.Tensor:
        """Per image, what :meth:`value` compares with: the label (or the clean prediction) for
        ``margin``, the clean output for ``embedding``."""
        if self.kind == "embedding":
            return clean_output.detach()
        if labels_B is not None:
            return labels_B.to(clean_output.device)
        return self.readout(clean_output).argmax(-1)

    def value(self, output: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """``[B]``: the metric of each image's output (higher: more of what the clean model does)."""
        if self.kind == "margin":
            return margin(self.readout(output), targets)
        diff = (output - targets.to(output)).flatten(1)
        return -diff.norm(dim=1) / targets.flatten(1).norm(dim=1).clamp_min(1e-12).to(output)

    def floor(self, clean_values_B: torch.Tensor) -> float:
        """The smallest mean drop that counts as mattering (module docstring)."""
        if self.kind == "embedding":
            return FLOOR_FRACTION
        return FLOOR_FRACTION * float(clean_values_B.double().abs().mean())
