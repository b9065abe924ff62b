"""What one checkpoint of a training series is measured for: per image, so that every metric's
formation step gets an interval over the same image resamples (:mod:`vitcircuits.dynamics.phase`).

For one model and one image set, two streaming passes:

1. the head atlas (:func:`~vitcircuits.heads.atlas.build_atlas`: kinds, modular score, neighbour
   mass, peak offset with their intervals), keeping each image's neighbour mass and 8 direction
   masses per head, and each image's loss and whether it is classified right (labelled images of a
   classifier); the same pass sums the heads' outputs for the mean ablation;
2. path patching of every head but the last layer's into every later head's Q, K and V inputs
   (:func:`~vitcircuits.composition.patching.path_patch_batch`, no random controls), keeping
   each image's verdict metric at patch and prefix queries.

Heads are matched across checkpoints by (layer, head): training does not permute them (each
head's parameters stay in their slot from initialisation on), so a head of one checkpoint is the
same head in the next.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.numpy import load_file, save_file

from vitcircuits.composition.ablation import ZStats
from vitcircuits.composition.patching import PatchEffects, PatchingConfig, path_patch_batch
from vitcircuits.files import write_with
from vitcircuits.heads.atlas import AtlasConfig, HeadAtlas, accumulate, build_atlas, new_accumulator
from vitcircuits.models.hooked_vit import HookedViT


@dataclass(frozen=True)
class MeasureConfig:
    """What is measured at every checkpoint."""

    atlas: AtlasConfig = field(default_factory=AtlasConfig)
    """The head atlas of every checkpoint."""
    patching: PatchingConfig = field(default_factory=PatchingConfig)
    """How senders are ablated for path patching (default: the mean over images and positions)."""


@dataclass
class StepMeasures:
    """One checkpoint's measurements (module docstring); arrays are per image, in image order."""

    atlas: HeadAtlas
    heads_ILHM: np.ndarray
    """Per image and head: neighbour mass, then the mass in each of the 8 directions."""
    senders: list[tuple[int, int]]
    """The path-patching senders, in the order of ``edges_ISJLHU``'s ``S`` axis."""
    edges_ISJLHU: np.ndarray
    """Per image: the verdict metric of sender ``S`` into receiver (``L``, ``H``) through input
    ``J`` (q, k, v) at patch and prefix queries ``U``."""
    loss_I: np.ndarray | None
    """Cross-entropy of the true class, 0 where the label is unknown (-1); None: no labels, or not a
    classifier."""
    correct_I: np.ndarray | None
    labels_I: np.ndarray | None

    ARRAYS = ("heads_ILHM", "edges_ISJLHU", "loss_I", "correct_I", "labels_I")

    def save(self, folder: str | Path) -> None:
        """``heads/`` (the atlas) and ``measures.safetensors`` in ``folder``."""
        folder = Path(folder)
        self.atlas.save(folder / "heads")
        arrays = {name: np.ascontiguousarray(getattr(self, name)) for name in self.ARRAYS if getattr(self, name) is not None}
        arrays["senders_S2"] = np.asarray(self.senders, dtype=np.int64).reshape(-1, 2)
        write_with(folder / "measures.safetensors", lambda tmp: save_file(arrays, str(tmp)))

    @classmethod
    def load(cls, folder: str | Path) -> StepMeasures:
        folder = Path(folder)
        arrays = load_file(str(folder / "measures.safetensors"))
        return cls(atlas=HeadAtlas.load(folder / "heads"), senders=[tuple(int(v) for v in row) for row in arrays.pop("senders_S2")],
                   **{name: arrays.get(name) for name in cls.ARRAYS})


NEIGHBOUR, DIRECTIONS = 0, slice(4, 12)
"""Where neighbour mass and the 8 direction masses sit on the accumulator's ``M`` axis."""


@torch.no_grad()
def measure_checkpoint(model: HookedViT, batches: Iterable, config: MeasureConfig, model_id: str) -> StepMeasures:
    """Both passes over ``batches`` (an iterable that can be read twice: image batches with
    ``images_BCHW``, ``indices`` and ``labels_B``)."""
    acc = new_accumulator(model, config.atlas, keep_per_image=True)
    stats = ZStats.empty(model)
    losses, correct, labels = [], [], []
    for batch in batches:
        images_BCHW = batch.images_BCHW.to(model.device, model.dtype)
        logits_BC = accumulate(model, acc, images_BCHW, list(batch.indices))
        stats.update(model, images_BCHW)  # its own forward: the fused attention, as the composition stage's means
        if batch.labels_B is not None and model.cfg.n_classes:
            labels_B = batch.labels_B.to(logits_BC.device)
            known_B = labels_B >= 0
            loss_B = torch.zeros(labels_B.shape, device=logits_BC.device)  # unknown labels belong to no group
            loss_B[known_B] = F.cross_entropy(logits_BC[known_B].float(), labels_B[known_B], reduction="none")
            losses.append(loss_B.cpu())
            correct.append((logits_BC.argmax(-1) == labels_B).float().cpu())
            labels.append(batch.labels_B.cpu())
    atlas = build_atlas(model, acc, config.atlas, model_id)
    per_image_ILHM = acc.per_image_ILHM().numpy()
    heads_ILHM = np.concatenate([per_image_ILHM[..., NEIGHBOUR : NEIGHBOUR + 1], per_image_ILHM[..., DIRECTIONS]], axis=-1)
    L, H = model.cfg.n_layers, model.cfg.n_heads
    senders = [(layer, head) for layer in range(L - 1) for head in range(H)]
    effects = PatchEffects(senders, L, H)
    if senders:
        for batch in batches:
            path_patch_batch(model, batch.images_BCHW.to(model.device, model.dtype), senders, effects, stats, config.patching)
    labelled = len(labels) > 0 and sum(len(t) for t in labels) == acc.n_images
    return StepMeasures(
        atlas=atlas, heads_ILHM=heads_ILHM.astype(np.float32), senders=senders, edges_ISJLHU=effects.per_image().numpy().astype(np.float32),
        loss_I=torch.cat(losses).numpy() if labelled else None, correct_I=torch.cat(correct).numpy() if labelled else None,
        labels_I=torch.cat(labels).numpy() if labelled else None)
