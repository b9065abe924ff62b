"""The head atlas: scan a model over images, summarise every head, save/load ``heads.csv`` and
``kernels.npz``. A :class:`HeadAtlas` in Python holds what the run folder holds."""
from __future__ import annotations

import csv
import io
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from vitcircuits.files import read_json, write_json, write_npz, write_text
from vitcircuits.heads.kinds import KindThresholds, classify
from vitcircuits.heads.metrics import COVERAGE_SHARE, HeadRow, baseline_rows, head_metrics, mean_kernels
from vitcircuits.heads.offsets import HeadStatsAccumulator
from vitcircuits.heads.positional import pattern_agreement, positional_accumulator
from vitcircuits.models.config import TokenLayout
from vitcircuits.models.hooked_vit import HookedViT

HEADS_COLUMNS = (
    "layer", "head", "kind", "modular_score", "modular_score_lo", "modular_score_hi",
    "neighbour_mass", "neighbour_mass_lo", "neighbour_mass_hi", "neighbour_mass_raw",
    "neighbour_mass_interior", "neighbour_mass_border", "self_mass", "self_mass_lo", "self_mass_hi",
    "cls_mass", "dist_mass", "register_mass", "prefix_mass_lo", "prefix_mass_hi",
    "mean_distance_patches", "mean_distance_patches_lo", "mean_distance_patches_hi", "mean_distance_px",
    "direction_coverage", "direction_entropy", "top_direction_share", "peak_dy", "peak_dx", "peak_mass",
    "content_dependence", "positional_agreement", "positional_modular_score", "positional_kind", "n_images",
)


@dataclass(frozen=True)
class AtlasConfig:
    """Settings of a head scan."""

    radius: int = 1
    """Chebyshev radius of the neighbourhood (1 = the 8 surrounding patches)."""
    n_boot: int = 200
    """Poisson-bootstrap replicates for the intervals."""
    coverage_share: float = COVERAGE_SHARE
    """Share of neighbour mass a direction needs to count towards ``direction_coverage``."""
    thresholds: KindThresholds = field(default_factory=KindThresholds)
    """Kind thresholds (see :mod:`vitcircuits.heads.kinds`)."""
    seed: int = 0
    """Seed of the bootstrap weights."""


@dataclass
class HeadAtlas:
    """Per-head kernels, metrics and kinds of one model over one image set."""

    model_id: str
    layout: TokenLayout
    patch_size: tuple[int, int]
    config: AtlasConfig
    rows: list[HeadRow]
    kernels_LHYX: np.ndarray
    raw_kernels_LHYX: np.ndarray
    positional_kernels_LHYX: np.ndarray
    offset_counts_YX: np.ndarray
    baselines: dict[str, HeadRow]

    @property
    def n_layers(self) -> int:
        return self.kernels_LHYX.shape[0]

    @property
    def n_heads(self) -> int:
        return self.kernels_LHYX.shape[1]

    def row(self, layer: int, head: int) -> HeadRow:
        return self.rows[layer * self.n_heads + head]

    def heads_of_kind(self, kind: str) -> list[tuple[int, int]]:
        return [(r.layer, r.head) for r in self.rows if r.kind == kind]

    def kind_grid(self) -> list[list[str]]:
        return [[self.row(layer, head).kind for head in range(self.n_heads)] for layer in range(self.n_layers)]

    def window(self, radius: int) -> np.ndarray:
        """Kernels cropped to offsets within ``radius`` of the centre, ``[L, H, 2r+1, 2r+1]`` (NaN-padded)."""
        rows, cols = self.layout.rows, self.layout.cols
        out = np.full((self.n_layers, self.n_heads, 2 * radius + 1, 2 * radius + 1), np.nan)
        for i, dy in enumerate(range(-radius, radius + 1)):
            for j, dx in enumerate(range(-radius, radius + 1)):
                if abs(dy) < rows and abs(dx) < cols:
                    out[:, :, i, j] = self.kernels_LHYX[:, :, dy + rows - 1, dx + cols - 1]
        return out

    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=HEADS_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows({k: (f"{v:.6g}" if isinstance(v, float) else "" if v is None else v) for k, v in r.as_dict().items()} for r in self.rows)
        write_text(folder / "heads.csv", buf.getvalue())
        write_npz(folder / "kernels.npz", kernels=self.kernels_LHYX, raw_kernels=self.raw_kernels_LHYX,
                  positional_kernels=self.positional_kernels_LHYX, offset_counts=self.offset_counts_YX)
        write_json(folder / "atlas.json", {"model_id": self.model_id, "layout": asdict(self.layout), "patch_size": list(self.patch_size),
                                           "config": asdict(self.config),
                                           "baselines": {name: b.as_dict(positional=False) for name, b in self.baselines.items()},
                                           "rows": [r.as_dict() for r in self.rows]})

    @classmethod
    def load(cls, folder: str | Path) -> HeadAtlas:
        folder = Path(folder)
        meta = read_json(folder / "atlas.json")
        arrays = np.load(folder / "kernels.npz")
        layout = meta["layout"]
        layout["register_slice"] = tuple(layout["register_slice"])
        config = meta["config"]
        config["thresholds"] = KindThresholds(**config["thresholds"])
        return cls(
            model_id=meta["model_id"], layout=TokenLayout(**layout), patch_size=tuple(meta["patch_size"]),
            config=AtlasConfig(**config), rows=[HeadRow(**r) for r in meta["rows"]], kernels_LHYX=arrays["kernels"],
            raw_kernels_LHYX=arrays["raw_kernels"], positional_kernels_LHYX=arrays["positional_kernels"],
            offset_counts_YX=arrays["offset_counts"], baselines={name: HeadRow(**b) for name, b in meta["baselines"].items()},
        )


def new_accumulator(model: HookedViT, config: AtlasConfig, keep_per_image: bool = False) -> HeadStatsAccumulator:
    return HeadStatsAccumulator(model.layout, model.cfg.n_layers, model.cfg.n_heads, config.radius, model.cfg.patch_size,
                                n_boot=config.n_boot, seed=config.seed, keep_per_image=keep_per_image)


@torch.no_grad()
def accumulate(model: HookedViT, acc: HeadStatsAccumulator, images_BCHW: torch.Tensor, image_indices: list[int]) -> torch.Tensor:
    """Run one batch, feeding each layer's attention pattern to ``acc`` as it is computed (no
    pattern is kept); return the model's output."""

    def feed(pattern_BHQK: torch.Tensor, hook) -> None:
        acc.update(int(hook.name.split(".")[1]), pattern_BHQK, image_indices)

    return model.run_with_hooks(images_BCHW, fwd_hooks=[(lambda name: name.endswith("attn.hook_pattern"), feed)])


def build_atlas(model: HookedViT, acc: HeadStatsAccumulator, config: AtlasConfig, model_id: str) -> HeadAtlas:
    """Metrics, kinds and positional comparison from accumulated statistics."""
    rows = head_metrics(acc, config.coverage_share)
    baselines = baseline_rows(model.layout, config.radius, model.cfg.patch_size)
    uniform = replace(baselines["uniform"])
    positional = positional_accumulator(model, config.radius)
    positional_rows = head_metrics(positional, config.coverage_share)
    empirical_LHPP = acc.pattern_sum_LHPP / acc.n_images
    agreement = pattern_agreement(empirical_LHPP, positional.pattern_sum_LHPP)
    for row, prow in zip(rows, positional_rows):
        row.kind = classify(row, uniform, config.thresholds)
        row.positional_agreement = float(agreement[row.layer, row.head])
        row.positional_modular_score = prow.modular_score
        row.positional_kind = classify(prow, uniform, config.thresholds)
    for base in baselines.values():
        base.kind = classify(base, uniform, config.thresholds)
    return HeadAtlas(
        model_id=model_id, layout=model.layout, patch_size=model.cfg.patch_size, config=config, rows=rows,
        kernels_LHYX=mean_kernels(acc), raw_kernels_LHYX=mean_kernels(acc, raw=True),
        positional_kernels_LHYX=mean_kernels(positional), offset_counts_YX=acc.offset_count_O.numpy().reshape(acc.geometry.kernel_shape),
        baselines=baselines,
    )
