"""Streaming per-feature statistics of an SAE over the patch tokens of an image set.

:func:`feature_stats` reads chunks of rows ``(acts_ND, image_index_N, row_N, col_N)`` — one row per
*patch* token, activations flattened to the SAE's width as in :mod:`vitcircuits.cache` — and keeps,
with memory independent of the number of rows, for every feature ``f``:

* ``density_F``: fraction of rows where ``f > 0``;
* ``mean_act_F``: mean activation over all rows (zeros included);
* ``mean_map_FYX``: mean activation at each patch-grid position;
* the ``top_k`` largest *positive* activations with their image index and grid position
  (``top_value_FT`` sorted descending; ``-1`` indices and value 0 where the feature fired on fewer
  than ``top_k`` rows). Each row is one ``(image, row, col)``, so the examples are distinct patches.

Prefix tokens (CLS, registers; ``row == -1`` in a cache) have no grid position and must be left out
by the caller: rows outside the grid are refused.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.progress import Progress
from safetensors.torch import load_file

from vitcircuits.files import read_json, write_json
from vitcircuits.sae.io import atomic_save_safetensors
from vitcircuits.sae.model import SAE

STATS_TENSORS = "feature_stats.safetensors"
STATS_JSON = "feature_stats.json"
_TENSOR_FIELDS = ("density_F", "mean_act_F", "mean_map_FYX", "top_value_FT", "top_image_FT", "top_row_FT", "top_col_FT")


@dataclass(frozen=True)
class FeatureStatsConfig:
    """Settings of :func:`feature_stats`."""

    top_k: int = 16
    """Top-activating patches kept per feature."""


@dataclass
class FeatureStats:
    """Per-feature statistics over ``n_rows`` patch tokens (see the module docstring)."""

    density_F: torch.Tensor
    """Fraction of rows where the feature is positive."""
    mean_act_F: torch.Tensor
    """Mean activation over all rows."""
    mean_map_FYX: torch.Tensor
    """Mean activation at each grid position ``(row, col)``."""
    top_value_FT: torch.Tensor
    """Largest positive activations, descending (0 where fewer than k)."""
    top_image_FT: torch.Tensor
    """Image index of each top activation (-1 where fewer than k)."""
    top_row_FT: torch.Tensor
    """Grid row of each top activation (-1 where fewer than k)."""
    top_col_FT: torch.Tensor
    """Grid column of each top activation (-1 where fewer than k)."""
    n_rows: int
    """Rows (patch tokens) seen."""
    grid: tuple[int, int]
    """Patch grid ``(rows, cols)``."""

    @property
    def n_features(self) -> int:
        return self.density_F.shape[0]

    def examples(self, feature: int, n: int | None = None) -> list[tuple[int, int, int, float]]:
        """The feature's top ``(image, row, col, value)`` examples (at most ``n``), best first."""
        valid = self.top_image_FT[feature] >= 0
        out = [(int(i), int(r), int(c), float(v)) for i, r, c, v, ok in zip(
            self.top_image_FT[feature], self.top_row_FT[feature], self.top_col_FT[feature], self.top_value_FT[feature], valid) if ok]
        return out if n is None else out[:n]

    def save(self, folder: str | Path) -> Path:
        """Write ``feature_stats.safetensors`` and ``feature_stats.json`` (each atomically) into ``folder``."""
        folder = Path(folder)
        atomic_save_safetensors({name: getattr(self, name) for name in _TENSOR_FIELDS}, folder / STATS_TENSORS)
        write_json(folder / STATS_JSON, {"n_rows": self.n_rows, "grid": list(self.grid), "top_k": self.top_value_FT.shape[1]})
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> FeatureStats:
        """Read what :meth:`save` wrote."""
        folder = Path(folder)
        meta = read_json(folder / STATS_JSON)
        tensors = load_file(str(folder / STATS_TENSORS))
        return cls(**{name: tensors[name] for name in _TENSOR_FIELDS}, n_rows=int(meta["n_rows"]), grid=tuple(meta["grid"]))


class FeatureAccumulator:
    """Running sums and the running top-k of every feature (:func:`feature_stats`); accumulators
    of disjoint rows merge (:meth:`merge`)."""

    def __init__(self, n_features: int, grid: tuple[int, int], top_k: int) -> None:
        R, C = grid
        self.grid, self.k = grid, top_k
        self.n_rows = 0
        self.count_F = torch.zeros(n_features, dtype=torch.float64)
        self.sum_F = torch.zeros(n_features, dtype=torch.float64)
        self.sum_FP = torch.zeros(n_features, R * C, dtype=torch.float64)
        self.rows_P = torch.zeros(R * C, dtype=torch.float64)
        self.value_FT = torch.zeros(n_features, top_k)
        self.image_FT = torch.full((n_features, top_k), -1, dtype=torch.long)
        self.pos_FT = torch.full((n_features, top_k), -1, dtype=torch.long)

    def add(self, feats_NF: torch.Tensor, image_N: torch.Tensor, row_N: torch.Tensor, col_N: torch.Tensor) -> None:
        R, C = self.grid
        if bool(((row_N < 0) | (row_N >= R) | (col_N < 0) | (col_N >= C)).any()):
            raise ValueError(f"rows outside the {R}x{C} patch grid (prefix tokens?); give patch tokens only")
        feats_NF = feats_NF.float()
        pos_N = row_N.long() * C + col_N.long()
        self.n_rows += feats_NF.shape[0]
        self.count_F += (feats_NF > 0).sum(0).double()
        self.sum_F += feats_NF.sum(0).double()
        self.sum_FP.index_add_(1, pos_N, feats_NF.T.double())
        self.rows_P += torch.bincount(pos_N, minlength=R * C).double()
        # chunk top-k first (k x F), then merge with the running top-k: memory O(F * (k + chunk))
        value_TF, idx_TF = feats_NF.topk(min(self.k, feats_NF.shape[0]), dim=0)
        self._keep_top(value_TF.T, image_N.long()[idx_TF].T, pos_N[idx_TF].T)

    def _keep_top(self, value_FM: torch.Tensor, image_FM: torch.Tensor, pos_FM: torch.Tensor) -> None:
        """Merge candidates ``[F, M]`` into the running top-k (the running ones first)."""
        value_FM = torch.cat([self.value_FT, value_FM], dim=1)
        image_FM = torch.cat([self.image_FT, image_FM], dim=1)
        pos_FM = torch.cat([self.pos_FT, pos_FM], dim=1)
        self.value_FT, keep_FT = value_FM.topk(self.k, dim=1)
        self.image_FT, self.pos_FT = image_FM.gather(1, keep_FT), pos_FM.gather(1, keep_FT)

    def merge(self, later: FeatureAccumulator) -> FeatureAccumulator:
        """Add the rows of ``later`` (rows after this one's); returns self."""
        self.n_rows += later.n_rows
        self.count_F += later.count_F
        self.sum_F += later.sum_F
        self.sum_FP += later.sum_FP
        self.rows_P += later.rows_P
        self._keep_top(later.value_FT, later.image_FT, later.pos_FT)
        return self

    def result(self) -> FeatureStats:
        R, C = self.grid
        n = max(self.n_rows, 1)
        fired_FT = self.value_FT > 0
        image_FT = torch.where(fired_FT, self.image_FT, -1)
        pos_FT = torch.where(fired_FT, self.pos_FT, -1)
        return FeatureStats(
            density_F=(self.count_F / n).float(),
            mean_act_F=(self.sum_F / n).float(),
            mean_map_FYX=(self.sum_FP / self.rows_P.clamp_min(1)).float().view(-1, R, C),
            top_value_FT=torch.where(fired_FT, self.value_FT, 0.0),
            top_image_FT=image_FT,
            top_row_FT=torch.where(fired_FT, pos_FT // C, -1),
            top_col_FT=torch.where(fired_FT, pos_FT % C, -1),
            n_rows=self.n_rows,
            grid=(R, C),
        )


@torch.no_grad()
def feature_stats(sae: SAE, rows: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]], grid: tuple[int, int],
                  config: FeatureStatsConfig = FeatureStatsConfig(), progress: bool = False) -> FeatureStats:
    """Statistics of every feature of ``sae`` over ``rows``: chunks of ``(acts_ND, image_index_N, row_N, col_N)``
    holding patch tokens only (raw activations, as :meth:`SAE.encode` takes them)."""
    return feature_accumulator(sae, rows, grid, config, progress).result()


@torch.no_grad()
def feature_accumulator(sae: SAE, rows: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]], grid: tuple[int, int],
                        config: FeatureStatsConfig = FeatureStatsConfig(), progress: bool = False) -> FeatureAccumulator:
    """The accumulator of :func:`feature_stats` over ``rows`` (to merge with others)."""
    acc = FeatureAccumulator(sae.cfg.d_sae, tuple(grid), config.top_k)
    device = sae.W_enc.device
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("feature statistics", total=None)
        for acts_ND, image_N, row_N, col_N in rows:
            feats_NF = sae.encode(acts_ND.to(device, sae.W_enc.dtype)).cpu()
            acc.add(feats_NF, image_N.cpu(), row_N.cpu(), col_N.cpu())
            bar.advance(task, acts_ND.shape[0])
    return acc
