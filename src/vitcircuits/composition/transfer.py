"""Neighbour → centre transfer probes: does the residual at patch (x, y) carry its neighbours' content?

The claim tested: a composition circuit "moves the relevant features from the neighbouring
embeddings to the embedding at (x, y)". For every layer (``embed`` = the residual entering block
0, ``blocks.0.hook_resid_pre``; then each ``blocks.{l}.hook_resid_post``) and every offset
``(dy, dx)`` with Chebyshev distance ``<= radius`` ((0, 0) included as a control), a ridge probe
predicts the *neighbour's* patch embedding (``hook_embed``: before position embeddings) from the
*centre's* residual. Rising R² with depth at distance-1 offsets is content moving in; ablating the
heads that move it should lower it.

Method (all choices are fixed here, so every number means the same thing):

* Targets are the clean patch embeddings ``model.embed(images)`` — exactly what ``hook_embed``
  sees before any hook — projected on their top ``pca_dims`` principal components, fitted on the
  training images (every patch). Head ablations cannot change them (``hook_embed`` is computed
  before any block), and even a hook on ``hook_embed`` itself leaves the targets clean.
* Centres are the *interior* patches, those at least ``radius`` from every border, so every offset
  has a neighbour and all offsets of a layer share one feature matrix (one ``X^T X`` per layer).
* Images, not tokens, are split, by a seeded hash of their index: ``test`` with probability
  ``test_fraction``; of the rest, ``val`` with probability ``val_fraction``, else ``fit``; ``train``
  is ``fit`` ∪ ``val``. The split does not depend on batching.
* Streaming: per split, ``[x, 1]^T [x, 1]`` per layer, ``[x, 1]^T y`` per (layer, offset) and
  ``sum |y|^2`` per offset are accumulated in float64; memory does not grow with images (for
  ViT-B, 13 layers, 25 offsets, 32 target dims: about 0.4 GB).
* Ridge, closed form: features are standardised with training statistics (features constant to
  float precision are dropped), ``W = (R + λ I)^{-1} Z^T y_c / n`` with ``R`` the feature
  correlation matrix, so ``λ`` is in units of a feature's variance (solved by Cholesky, float64).
  ``λ`` is chosen per (layer, offset) from ``ridges`` by SSE on ``val`` after fitting on ``fit``,
  then the probe is refitted on ``train`` with it.
* R² on the test images is ``1 − SSE / SST`` summed over target dims, SST around the *train*
  mean. It can be slightly negative when there is nothing to find.
* Ablation (:func:`transfer_curves`): probes are fitted on clean training activations and
  evaluated on the ablated activations of the test images: "how much does ablating lower R²".

Shape letters local to this module (the others are those of ``docs/conventions.md``): ``S`` the
splits, ``E`` the standardised features plus the bias column, ``K`` the target's principal
components, ``G`` the ridge grid, ``M`` the centre patches, ``X`` = ``O`` × ``K``.
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch

from vitcircuits.composition.ablation import AblationKind, ZStats, ablation_hooks
from vitcircuits.engine import LOCAL, Engine, numbered
from vitcircuits.models.hooked_vit import HookedViT
from vitcircuits.models.hooks import HookFn
from vitcircuits.plotting.figures import plt, save_figure

SPLITS = ("fit", "val", "test")
OKABE_ITO = ("#E69F00", "#56B4E9", "#009E73", "#0072B2", "#D55E00", "#CC79A7", "#F0E442", "#000000")
_CONSTANT_FEATURE = 1e-10
"""A feature whose variance is below this fraction of its second moment is treated as constant."""
_NULL_COMPONENT = 1e-9
"""Principal components with variance below this fraction of the largest are dropped."""



class TooFewImages(ValueError):
    """The seeded split left a probe without training, validation or test images."""

@dataclass(frozen=True)
class TransferConfig:
    """Settings of the neighbour → centre transfer probes."""

    radius: int = 2
    """Largest Chebyshev distance of an offset; centres are the patches at least this far from
    every border, so the patch grid needs more than ``2 * radius`` rows and columns."""
    pca_dims: int | None = 32
    """Principal components of the patch embedding kept as targets (None: all with non-zero
    variance, which gives the same R² as the full embedding)."""
    ridges: tuple[float, ...] = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)
    """Ridge grid, in units of a standardised feature's variance; one value skips validation."""
    test_fraction: float = 0.25
    """Probability that an image is held out for testing."""
    val_fraction: float = 0.2
    """Probability that a non-test image validates the ridge choice (it is refitted on it after)."""
    seed: int = 0
    """Seed of the image split."""

    def __post_init__(self) -> None:
        if self.radius < 0 or (self.pca_dims is not None and self.pca_dims < 1):
            raise ValueError(f"radius must be >= 0 and pca_dims >= 1 or None, got {self.radius} and {self.pca_dims}")
        if not self.ridges or min(self.ridges) <= 0:
            raise ValueError(f"ridges must be positive, got {self.ridges}")
        if not (0 < self.test_fraction < 1 and 0 <= self.val_fraction < 1):
            raise ValueError(f"need 0 < test_fraction < 1 and 0 <= val_fraction < 1, got {self.test_fraction}, {self.val_fraction}")


def image_split(index: int, config: TransferConfig) -> str:
    """``'fit'``, ``'val'`` or ``'test'`` for image ``index`` (a seeded hash; see module docstring)."""
    def unit(salt: str) -> float:
        digest = hashlib.blake2b(f"{config.seed}:{salt}:{index}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little") / 2**64

    if unit("test") < config.test_fraction:
        return "test"
    return "val" if unit("val") < config.val_fraction else "fit"


def offsets_within(radius: int) -> list[tuple[int, int]]:
    """Every ``(dy, dx)`` with Chebyshev distance ``<= radius``, row-major."""
    return [(dy, dx) for dy in range(-radius, radius + 1) for dx in range(-radius, radius + 1)]


@dataclass(frozen=True, eq=False)
class TargetBasis:
    """Principal components of the patch embeddings of the training images."""

    mean_D: torch.Tensor
    components_DK: torch.Tensor
    variance_kept: float
    """Fraction of the embedding variance the kept components explain."""

    def project(self, embed_BPD: torch.Tensor) -> torch.Tensor:
        return (embed_BPD.double() - self.mean_D.to(embed_BPD.device)) @ self.components_DK.to(embed_BPD.device)


@torch.no_grad()
def _basis_sums(config: TransferConfig, model: HookedViT, item: tuple[torch.Tensor, int]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``e^T e``, ``sum e`` and the rows of one batch's training images (``item``: the batch and
    the index of its first image)."""
    images_BCHW, start = item
    D = model.cfg.d_model
    moment_DD, sum_D, n = torch.zeros(D, D, dtype=torch.float64), torch.zeros(D, dtype=torch.float64), 0
    train = [i for i in range(len(images_BCHW)) if image_split(start + i, config) != "test"]
    if train:
        e_nD = model.embed(images_BCHW[train].to(model.device, model.dtype)).flatten(0, 1).double().cpu()
        moment_DD += e_nD.T @ e_nD
        sum_D += e_nD.sum(0)
        n += len(e_nD)
    return moment_DD, sum_D, n


def fit_target_basis(model: HookedViT, batches: Iterable[torch.Tensor], config: TransferConfig, engine: Engine = LOCAL) -> TargetBasis:
    """PCA of ``model.embed`` over every patch of the training images of ``batches`` (image
    tensors, indexed consecutively); only the patch embedding is run, batch by batch on
    ``engine``'s model replicas."""
    D = model.cfg.d_model
    moment_DD, sum_D, n = torch.zeros(D, D, dtype=torch.float64), torch.zeros(D, dtype=torch.float64), 0
    for moment, total, rows in engine.map_items(model, partial(_basis_sums, config), numbered(batches)):
        moment_DD += moment
        sum_D += total
        n += rows
    if n == 0:
        raise TooFewImages("no image fell in the probes' training split: add images or lower test_fraction")
    mean_D = sum_D / n
    variance_D, vectors_DD = torch.linalg.eigh(moment_DD / n - torch.outer(mean_D, mean_D))
    variance_D, vectors_DD = variance_D.flip(0).clamp_min(0), vectors_DD.flip(1)
    k = int((variance_D > _NULL_COMPONENT * variance_D[0]).sum())
    k = k if config.pca_dims is None else min(k, config.pca_dims)
    return TargetBasis(mean_D, vectors_DD[:, :k].contiguous(), float(variance_D[:k].sum() / variance_D.sum()))


@dataclass(frozen=True, eq=False)
class TransferResult:
    """Held-out R² of every (layer, offset) probe."""

    layer_names: tuple[str, ...]
    """``'embed'`` then ``'blocks.{l}.hook_resid_post'``."""
    offsets: tuple[tuple[int, int], ...]
    """``(dy, dx)`` of each column: the neighbour whose embedding is predicted."""
    r2_LO: np.ndarray
    """Test R² ``[layers, offsets]``."""
    ridge_LO: np.ndarray
    """Ridge ``λ`` used by each probe."""
    n_train_images: int
    n_test_images: int
    centres_per_image: int
    target_dims: int
    target_variance_kept: float
    ablation: str = "none"
    """What was ablated while the test activations were recorded; ablated probes use clean weights."""

    def ring_r2_LR(self) -> np.ndarray:
        """R² ``[layers, radius + 1]`` averaged over the offsets at each Chebyshev distance."""
        rings_O = np.array([max(abs(dy), abs(dx)) for dy, dx in self.offsets])
        return np.stack([self.r2_LO[:, rings_O == ring].mean(1) for ring in range(rings_O.max() + 1)], axis=1)


class TransferProbe:
    """Streaming sufficient statistics of all (layer, offset) probes; see the module docstring."""

    def __init__(self, config: TransferConfig, basis: TargetBasis) -> None:
        self.config, self.basis = config, basis
        self.offsets = offsets_within(config.radius)
        self.layer_names: list[str] = []
        self.n_images = dict.fromkeys(SPLITS, 0)
        self.gram_SLEE: torch.Tensor | None = None  # [x, 1]^T [x, 1]
        self.cross_SLOEK: torch.Tensor | None = None  # [x, 1]^T y
        self.ysq_SO: torch.Tensor | None = None  # sum |y|^2
        self.centres_per_image = 0

    def _geometry(self, model: HookedViT) -> tuple[list[int], torch.Tensor]:
        """Token index of each interior centre ``[M]`` and patch index of its neighbours ``[O, M]``."""
        layout, R = model.layout, self.config.radius
        if layout.rows <= 2 * R or layout.cols <= 2 * R:
            raise ValueError(f"a {layout.rows}x{layout.cols} patch grid has no patch {R} away from every border")
        centres = [(r, c) for r in range(R, layout.rows - R) for c in range(R, layout.cols - R)]
        neighbours_OM = torch.tensor([[(r + dy) * layout.cols + c + dx for r, c in centres] for dy, dx in self.offsets])
        return [layout.patch_index(r, c) for r, c in centres], neighbours_OM

    @torch.no_grad()
    def update(self, model: HookedViT, images_BCHW: torch.Tensor, image_indices: Sequence[int],
               fwd_hooks: Sequence[tuple[str, HookFn]] = ()) -> None:
        """Add a batch. ``fwd_hooks`` (e.g. head ablations) act on the residual features only:
        targets are the clean patch embeddings whatever the hooks do."""
        centres_M, neighbours_OM = self._geometry(model)
        L = model.cfg.n_layers
        names = ["blocks.0.hook_resid_pre"] + [f"blocks.{layer}.hook_resid_post" for layer in range(L)]
        images_BCHW = images_BCHW.to(model.device, model.dtype)
        with model.hooks(fwd_hooks):
            _, cache = model.run_with_cache(images_BCHW, stop_at_layer=L, names_filter=names)
        y_BOMK = self.basis.project(model.embed(images_BCHW))[:, neighbours_OM.to(images_BCHW.device)]
        if self.gram_SLEE is None:
            E, K, device = model.cfg.d_model + 1, y_BOMK.shape[-1], y_BOMK.device
            self.layer_names = ["embed"] + names[1:]
            self.centres_per_image = len(centres_M)
            self.gram_SLEE = torch.zeros(len(SPLITS), L + 1, E, E, dtype=torch.float64, device=device)
            self.cross_SLOEK = torch.zeros(len(SPLITS), L + 1, len(self.offsets), E, K, dtype=torch.float64, device=device)
            self.ysq_SO = torch.zeros(len(SPLITS), len(self.offsets), dtype=torch.float64, device=device)
        splits_B = [image_split(index, self.config) for index in image_indices]
        for s, split in enumerate(SPLITS):
            rows = [b for b, name in enumerate(splits_B) if name == split]
            if not rows:
                continue
            self.n_images[split] += len(rows)
            y_OnK = y_BOMK[rows].transpose(0, 1).flatten(1, 2)
            self.ysq_SO[s] += y_OnK.square().sum((1, 2))
            for layer, name in enumerate(names):
                x_nD = cache[name][rows][:, centres_M].flatten(0, 1).double()
                x_nE = torch.cat([x_nD, torch.ones_like(x_nD[:, :1])], dim=1)
                self.gram_SLEE[s, layer] += x_nE.T @ x_nE
                self.cross_SLOEK[s, layer] += torch.einsum("ne,onk->oek", x_nE, y_OnK)

    def merge(self, later: TransferProbe) -> TransferProbe:
        """Add the statistics of later images (same config and basis); returns self."""
        for split in SPLITS:
            self.n_images[split] += later.n_images[split]
        if later.gram_SLEE is None:
            return self
        if self.gram_SLEE is None:
            self.layer_names, self.centres_per_image = later.layer_names, later.centres_per_image
            self.gram_SLEE, self.cross_SLOEK, self.ysq_SO = later.gram_SLEE, later.cross_SLOEK, later.ysq_SO
        else:
            self.gram_SLEE += later.gram_SLEE.to(self.gram_SLEE.device)
            self.cross_SLOEK += later.cross_SLOEK.to(self.cross_SLOEK.device)
            self.ysq_SO += later.ysq_SO.to(self.ysq_SO.device)
        return self

    def _stats(self, layer: int, *splits: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``[x, 1]^T [x, 1]`` ``[E, E]``, ``[x, 1]^T y`` ``[O, E, K]`` and ``sum |y|^2`` ``[O]`` of
        one layer over the union of ``splits``."""
        index = [SPLITS.index(split) for split in splits]
        return (self.gram_SLEE[index, layer].sum(0), self.cross_SLOEK[index, layer].sum(0), self.ysq_SO[index].sum(0))

    def _predictors(self, layer: int, ridges_OG: torch.Tensor, *splits: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Affine ridge predictors ``[O, G, E, K]`` on raw ``[x, 1]`` of one layer, fitted on
        ``splits`` with ridges ``[O, G]``; and the training target mean ``[O, K]``."""
        gram_EE, cross_OEK, _ = self._stats(layer, *splits)
        n = gram_EE[-1, -1]
        mean_D, moment_DD = gram_EE[:-1, -1] / n, gram_EE[:-1, :-1] / n
        var_D = moment_DD.diagonal() - mean_D.square()
        keep_D = var_D > _CONSTANT_FEATURE * moment_DD.diagonal()
        scale_D = torch.where(keep_D, var_D.clamp_min(0).sqrt(), torch.inf)
        corr_DD = (moment_DD - torch.outer(mean_D, mean_D)) / torch.outer(scale_D, scale_D)
        corr_DD = torch.where(torch.outer(keep_D, keep_D), corr_DD, torch.diag(keep_D.logical_not().double()))
        y_mean_OK = cross_OEK[:, -1] / n
        rhs_ODK = (cross_OEK[:, :-1] / n - mean_D[None, :, None] * y_mean_OK[:, None]) / scale_D[None, :, None]
        eye_DD = torch.eye(len(corr_DD), dtype=corr_DD.dtype, device=corr_DD.device)
        O, D, K = rhs_ODK.shape
        rhs_DX = rhs_ODK.permute(1, 0, 2).reshape(D, O * K)
        w_OGDK = rhs_ODK.new_zeros(O, ridges_OG.shape[1], D, K)
        for ridge in ridges_OG.unique():
            solution_DX = torch.cholesky_solve(rhs_DX, torch.linalg.cholesky(corr_DD + ridge * eye_DD))
            uses_OG = ridges_OG == ridge
            w_OGDK[uses_OG] = solution_DX.reshape(D, O, K).permute(1, 0, 2)[:, None].expand_as(w_OGDK)[uses_OG]
        w_OGDK = w_OGDK / scale_D[None, None, :, None]
        bias_OGK = y_mean_OK[:, None] - torch.einsum("d,ogdk->ogk", mean_D, w_OGDK)
        return torch.cat([w_OGDK, bias_OGK[:, :, None]], dim=2), y_mean_OK

    @staticmethod
    def _sse(a_OGEK: torch.Tensor, gram_EE: torch.Tensor, cross_OEK: torch.Tensor, ysq_O: torch.Tensor) -> torch.Tensor:
        """``sum |y - [x, 1] A|^2`` ``[O, G]`` from sufficient statistics of one layer."""
        quad_OG = (torch.einsum("ef,ogfk->ogek", gram_EE, a_OGEK) * a_OGEK).sum((2, 3))
        return ysq_O[:, None] - 2 * torch.einsum("ogek,oek->og", a_OGEK, cross_OEK) + quad_OG

    def _fit(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training-set predictors ``[O, E, K]`` of one layer, their ridges ``[O]`` and the target mean ``[O, K]``."""
        if self.gram_SLEE is None or self.n_images["fit"] + self.n_images["val"] == 0:
            raise TooFewImages("no image fell in the probes' training split")
        grid_OG = torch.tensor(self.config.ridges, dtype=torch.float64, device=self.gram_SLEE.device).expand(len(self.offsets), -1)
        if len(self.config.ridges) == 1:
            ridges_O = grid_OG[:, 0]
        else:
            if not (self.n_images["fit"] and self.n_images["val"]):
                raise TooFewImages("choosing the ridge needs images in both the fit and the val split: add images or give one ridge")
            a_OGEK, _ = self._predictors(layer, grid_OG, "fit")
            best_O = self._sse(a_OGEK, *self._stats(layer, "val")).argmin(-1)
            ridges_O = grid_OG[0, best_O]
        a_OGEK, y_mean_OK = self._predictors(layer, ridges_O[:, None], "fit", "val")
        return a_OGEK[:, 0], ridges_O, y_mean_OK

    def result(self, fit_from: TransferProbe | None = None, ablation: str = "none") -> TransferResult:
        """Test R² of probes fitted on the training images of ``fit_from`` (default: this probe),
        evaluated on this probe's test images; ``ablation`` labels the result."""
        reference = self if fit_from is None else fit_from
        if self.gram_SLEE is None or self.n_images["test"] == 0:
            raise TooFewImages("no image fell in the probes' test split")
        r2_LO, ridges_LO = [], []
        for layer in range(len(self.layer_names)):
            a_OEK, ridges_O, y_mean_OK = reference._fit(layer)
            gram_EE, cross_OEK, ysq_O = self._stats(layer, "test")
            n, y_sum_OK = gram_EE[-1, -1], cross_OEK[:, -1]
            sse_O = self._sse(a_OEK[:, None], gram_EE, cross_OEK, ysq_O)[:, 0]
            sst_O = ysq_O - 2 * (y_mean_OK * y_sum_OK).sum(-1) + n * y_mean_OK.square().sum(-1)
            r2_LO.append(1 - sse_O / sst_O)
            ridges_LO.append(ridges_O)
        return TransferResult(
            layer_names=tuple(self.layer_names), offsets=tuple(self.offsets),
            r2_LO=torch.stack(r2_LO).cpu().numpy(), ridge_LO=torch.stack(ridges_LO).cpu().numpy(),
            n_train_images=reference.n_images["fit"] + reference.n_images["val"], n_test_images=self.n_images["test"],
            centres_per_image=self.centres_per_image, target_dims=self.basis.components_DK.shape[1],
            target_variance_kept=self.basis.variance_kept, ablation=ablation,
        )


def _probe_batch(config: TransferConfig, basis: TargetBasis, ablations: dict[str, list[tuple[int, int]]], stats: ZStats | None,
                 kind: AblationKind, model: HookedViT, item: tuple[torch.Tensor, int]) -> dict[str, TransferProbe]:
    """The clean and ablated probes' statistics of one batch (``item``: the batch and the index of
    its first image); ``resample`` ablation is seeded by that index."""
    images_BCHW, start = item
    indices = list(range(start, start + len(images_BCHW)))
    generator = torch.Generator().manual_seed(config.seed * 1_000_003 + start)
    probes = {"clean": TransferProbe(config, basis), **{name: TransferProbe(config, basis) for name in ablations}}
    probes["clean"].update(model, images_BCHW, indices)
    test = [i for i, index in enumerate(indices) if image_split(index, config) == "test"]
    for name, heads in ablations.items():
        if test:
            hooks = ablation_hooks(heads, kind, stats, generator)
            probes[name].update(model, images_BCHW[test], [indices[i] for i in test], fwd_hooks=hooks)
    return probes


def transfer_curves(model: HookedViT, batches: Iterable[torch.Tensor], config: TransferConfig = TransferConfig(),
                    ablations: dict[str, list[tuple[int, int]]] | None = None, stats: ZStats | None = None,
                    ablation_kind: AblationKind = "mean", engine: Engine = LOCAL) -> dict[str, TransferResult]:
    """Clean probes (key ``'clean'``) and, per named set of ``(layer, head)``, the clean probes
    evaluated with those heads ablated on the test images.

    ``batches`` are image tensors, indexed consecutively; each batch is run on ``engine``'s model
    replicas (once for the target PCA, once for the probes) and the statistics are added in order.
    The ablation is ``ablation_kind`` with ``stats``; without ``stats``, kinds that need them
    (mean, position_mean) become ``zero``.
    """
    ablations = ablations or {}
    if "clean" in ablations:
        raise ValueError("'clean' is reserved for the unablated probes")
    kind = "zero" if stats is None and ablation_kind in ("mean", "position_mean") else ablation_kind
    items = numbered(batches)
    basis = fit_target_basis(model, [x for x, _ in items], config, engine)
    probes = {"clean": TransferProbe(config, basis), **{name: TransferProbe(config, basis) for name in ablations}}
    for part in engine.map_items(model, partial(_probe_batch, config, basis, ablations, stats, kind), items):
        for name, probe in part.items():
            probes[name].merge(probe)
    results = {"clean": probes["clean"].result()}
    for name in ablations:
        results[name] = probes[name].result(fit_from=probes["clean"], ablation=f"{kind}: {ablations[name]}")
    return results


def plot_receptive_field(results: dict[str, TransferResult], path: str | Path) -> Path:
    """R² against layer, one colour per Chebyshev ring (offsets averaged), one line style per
    result: solid for ``'clean'``, dashed, dotted, ... for the ablations, in order."""
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    styles = iter(["--", ":", "-.", (0, (5, 1, 1, 1))] * len(results))
    for name, result in results.items():
        style = "-" if name == "clean" else next(styles)
        ring_r2_LR = result.ring_r2_LR()
        for ring in range(ring_r2_LR.shape[1]):
            ax.plot(ring_r2_LR[:, ring], linestyle=style, marker="o", markersize=3, color=OKABE_ITO[ring % len(OKABE_ITO)],
                    label=f"{name}, distance {ring}")
    names = next(iter(results.values())).layer_names
    ax.set_xticks(range(len(names)), [name if name == "embed" else name.split(".")[1] for name in names])
    ax.axhline(0, color="0.6", linewidth=0.8)
    ax.set_xlabel("layer (residual after block; embed = entering block 0)")
    ax.set_ylabel("held-out R² of neighbour patch embedding")
    ax.set_title("Neighbour → centre transfer")
    ax.legend(fontsize=7, ncol=2, handlelength=3.5)
    return save_figure(fig, path)
