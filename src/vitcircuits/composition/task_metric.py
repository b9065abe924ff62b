"""What "the output" is when an edge is asked whether it matters: one number per image that a
path ablation can lower.

- ``margin`` (classifiers, or a backbone with a linear probe): the target class's logit minus the
  mean of the other logits (:func:`margin`). The target is the image's label when there is one,
  else the model's clean prediction. Unlike the log-probability it does not saturate on confident
  predictions.
- ``embedding`` (backbones without labels): minus the relative change of the final token stream
  (every token after the final norm), ``−‖out − out_clean‖ / ‖out_clean‖`` per image; 0 on the
  clean run, so its drop is the relative distance the ablation moves the embedding. All tokens,
  not only the pooled vector, because a backbone hands its whole token stream on: dense heads
  read the patches, classifiers the class token or the mean.

The **drop** of an edge is ``value(clean) − value(ablated)``, averaged over images. Its practical
floor (:meth:`TaskMetric.floor`) is 1 % of the mean clean margin, or a 1 % relative move of the
embedding: an edge that changes the output by less is not one a researcher would call part of the
circuit, whatever its significance.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from vitcircuits.models.hooked_vit import HookedViT

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
    """A linear probe ``[C, D]`` on the model's pooled output (with ``probe_C``), for ``margin`` on a
    backbone: the margin is then taken on ``out @ probe_CD.T + probe_C``. None: the model's logits."""
    probe_C: torch.Tensor | None = None
    """The probe's bias ``[C]``."""

    def __post_init__(self) -> None:
        if self.kind not in ("margin", "embedding"):
            raise ValueError(f"unknown task metric {self.kind!r}; choose margin or embedding")
        if (self.probe_CD is None) != (self.probe_C is None):
            raise ValueError("a linear probe needs both its weight and its bias")
        if self.kind == "embedding" and self.probe_CD is not None:
            raise ValueError("a linear probe is read by the margin metric, not the embedding metric")

    def output(self, model: HookedViT, images_BCHW: torch.Tensor) -> torch.Tensor:
        """Run the model (with whatever hooks are active) to what this metric reads: logits ``[B, C]``
        (the model's, or the probe's on its pooled output) for ``margin``, the final token stream
        ``[B, N, D]`` for ``embedding``."""
        if self.kind == "embedding":
            x_BND = model(images_BCHW, stop_at_layer=model.cfg.n_layers)
            return model.ln_final(x_BND) if model.cfg.final_norm == "tokens" else x_BND
        out = model(images_BCHW)
        if self.probe_CD is None:
            return out
        return out @ self.probe_CD.to(out).T + self.probe_C.to(out)

    def targets(self, clean_output: torch.Tensor, labels_B: torch.Tensor | None = None) -> torch.Tensor:
        """Per image, what :meth:`value` compares :meth:`output` with: the label (or the clean
        prediction) for ``margin``, the clean output for ``embedding``."""
        if self.kind == "embedding":
            return clean_output.detach()
        if labels_B is not None:
            return labels_B.to(clean_output.device)
        return clean_output.argmax(-1)

    def value(self, output: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """``[B]``: the metric of each image's output (higher: more of what the clean model does)."""
        if self.kind == "margin":
            return margin(output, targets)
        diff = (output - targets.to(output)).flatten(1)
        return -diff.norm(dim=1) / targets.flatten(1).norm(dim=1).clamp_min(1e-12).to(output)

    def floor(self, clean_values_B: torch.Tensor) -> float:
        """The smallest mean drop that counts as mattering (module docstring)."""
        if self.kind == "embedding":
            return FLOOR_FRACTION
        return FLOOR_FRACTION * float(clean_values_B.double().abs().mean())


def fit_probe(features_BD: torch.Tensor, labels_B: torch.Tensor, n_classes: int, ridge: float = 1.0) -> TaskMetric:
    """A ``margin`` metric on a linear probe of a backbone's pooled output: ridge regression of
    one-hot labels on the centred features (closed form, ``ridge`` times the mean feature variance
    on the diagonal), so it is deterministic and needs no training loop."""
    x_BD = features_BD.double()
    mean_D = x_BD.mean(0)
    centred = x_BD - mean_D
    targets_BC = torch.nn.functional.one_hot(labels_B.long(), n_classes).double()
    gram_DD = centred.T @ centred
    scale = gram_DD.diagonal().mean()
    W_DC = torch.linalg.solve(gram_DD + ridge * scale * torch.eye(gram_DD.shape[0], dtype=torch.float64), centred.T @ targets_BC)
    probe_CD = W_DC.T.float()
    return TaskMetric("margin", probe_CD, (-(mean_D @ W_DC)).float())
