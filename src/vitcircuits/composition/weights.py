"""Weight-based Q-, K- and V-composition scores between heads (Elhage et al. 2021), with a
positional variant and a random-matrix baseline.

Conventions (TransformerLens; row-vector residual ``x``; weights from
:mod:`vitcircuits.models.weights`, so ``W_O`` includes layer-scale)::

    W_OV = W_V @ W_O      [D, D]   a head adds  x @ W_OV  to the residual stream
    W_QK = W_Q @ W_K^T    [D, D]   its attention logit is  x_query @ W_QK @ x_key^T

With ``comp(A, B) = ||A @ B||_F / (||A||_F ||B||_F)`` (in [0, 1]), a sender head ``s`` in layer
``l_s`` and a receiver ``r`` in layer ``l_r > l_s``::

    q:  comp(W_OV^s, W_QK^r)      the receiver's queries read what the sender wrote
    k:  comp(W_OV^s, W_QK^r^T)    its keys read it
    v:  comp(W_OV^s, W_OV^r)      its values read it

The sender's matrix is always on the left. This is TransformerLens's
``HookedTransformer.all_composition_scores`` (left = ``OV`` of the sender, right = ``QK``,
``QK.T`` or ``OV`` of the receiver), except that pairs with ``l_r <= l_s`` are NaN, not 0.

Positional variant. ``Pn [N_patch, D]`` is the position-only residual stream of the patch tokens
(position embedding plus the patch embedding's bias, through ``ln_pre`` if the model has one)
normalised like a LayerNorm input (centred, divided by its RMS; the affine is folded into the
weights, so each head sees its own ``ln1`` applied to it). With ``Y_s = Pn @ W_OV^s`` (row ``j``:
what the sender writes when it attends to position ``j``)::

    pos_q:  comp(Y_s, W_QK^r @ Pn^T)    = ||Y_s W_QK^r Pn^T|| / (||Y_s|| ||W_QK^r Pn^T||)
    pos_k:  comp(Y_s, W_QK^r^T @ Pn^T)  = ||Pn W_QK^r Y_s^T|| / (||Pn W_QK^r|| ||Y_s||)

``pos_k`` is large when the receiver's positional queries, matched against keys made of the
sender's output, depend on where the sender looked (``pos_q``: the same with query and key
swapped). Both ignore what other heads and MLPs add to the stream.

Preprocessing: LayerNorm is folded (``ln1`` scales into ``W_Q, W_K, W_V``, exactly as
:func:`~vitcircuits.models.weights.fold_layer_norm`), so a model and its folded copy score the
same. As TransformerLens does when it folds, reading weights are centred over their input dim
(``center_reads``: a LayerNorm output has zero mean, so that direction is never read) and
``W_O`` over its output dim (``center_writes``: the next LayerNorm removes a write's mean). Both
leave the model's function unchanged but change the norms, hence the scores. Biases play no part.

Baseline: the same score for independent sender/receiver heads with i.i.d. Gaussian
``W_Q, W_K, W_V [D, Dh]`` and ``W_O [Dh, D]``, centred like the model's and applied to the same
``Pn``; ``z = (score - mean) / std``. For q/k/v it depends only on ``(D, Dh)``; the mean is about
``1/sqrt(D)`` (0.036 for ViT-B). Samples are drawn exactly but cheaply in bases of at most
``2*Dh`` dimensions (:func:`_random_factors`). The baseline is isotropic: anisotropic trained weights (outlier
dims, folded LayerNorm scales) shift every z, so compare z-scores within a model.

Arithmetic: a circuit is a factored ``U @ V^T`` with factors ``[*, Dh]`` (:data:`KIND_FACTORS`).
All pairs use ``||A B||^2 = <A^T A, B B^T>_F``: each head's ``D x D`` Gram
(``A^T A = V_A (U_A^T U_A) V_A^T`` for senders, ``B B^T = U_B (V_B^T V_B) U_B^T`` for receivers)
is formed once (``O(D^2 Dh)``), in row strips of its upper triangle (off-diagonal entries
counted twice), and the inner products of all pairs come from matrix products of the strips:
``O(D^2)`` per pair rather than ``O(D Dh^2)``, and no ``D x D`` matrix per pair. Baseline samples are single pairs:
``||A B||^2 = tr(M^T G M G')`` with ``M = V_A^T U_B``, ``G = U_A^T U_A``, ``G' = V_B^T V_B``.
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from vitcircuits.models.hooked_vit import HookedViT

WEIGHT_KINDS = ("q", "k", "v")
POSITIONAL_KINDS = ("pos_q", "pos_k")
KIND_FACTORS = {
    "q": ("W_V", "W_O^T", "W_Q", "W_K"),
    "k": ("W_V", "W_O^T", "W_K", "W_Q"),
    "v": ("W_V", "W_O^T", "W_V", "W_O^T"),
    "pos_q": ("Pn W_V", "W_O^T", "W_Q", "Pn W_K"),
    "pos_k": ("Pn W_V", "W_O^T", "W_K", "Pn W_Q"),
}
"""Kind → ``(U_A, V_A, U_B, V_B)``: the score is ``comp(U_A V_A^T, U_B V_B^T)``, sender then receiver."""
COMPOSITION_COLUMNS = (
    "sender_layer", "sender_head", "receiver_layer", "receiver_head", "kind",
    "weight_score", "baseline_mean", "baseline_std", "weight_z", "silent",
)
GRAM_STRIP_ROWS = 96
"""Rows per strip a ``D x D`` Gram is formed in: memory is about ``2 * S * GRAM_STRIP_ROWS * D``
floats, where ``S`` is the number of heads."""


@dataclass(frozen=True)
class CompositionConfig:
    """Settings of :func:`composition_scores`."""

    center_writes: bool = True
    """Subtract from each row of ``W_O`` its mean over the ``D`` output dims (the next LayerNorm
    removes that component)."""
    center_reads: bool = True
    """Subtract from ``W_Q, W_K, W_V`` their mean over the ``D`` input dims (a LayerNorm output
    has zero mean, so that component is never read)."""
    n_baseline_samples: int = 200
    """Random sender/receiver pairs per kind for the baseline mean and std."""
    seed: int = 0
    """Seed of the baseline's Gaussian weights."""
    include_positional: bool = True
    """Also compute ``pos_q`` and ``pos_k`` (about 1.6 times the cost)."""


class HeadWeights(NamedTuple):
    """Weights of a stack of ``S`` heads, float32."""

    W_Q: torch.Tensor
    """``[S, D, Dh]``"""
    W_K: torch.Tensor
    """``[S, D, Dh]``"""
    W_V: torch.Tensor
    """``[S, D, Dh]``"""
    W_O: torch.Tensor
    """``[S, Dh, D]``"""


@dataclass(frozen=True)
class CompositionScores:
    """Scores ``[sender_layer, sender_head, receiver_layer, receiver_head]`` of every kind (NaN
    where ``receiver_layer <= sender_layer``, never written out; 0 where a head's circuit is zero,
    flagged in :attr:`silent`), with baselines."""

    q_LHLH: np.ndarray
    k_LHLH: np.ndarray
    v_LHLH: np.ndarray
    pos_q_LHLH: np.ndarray | None
    """None unless ``config.include_positional``; likewise ``pos_k_LHLH``."""
    pos_k_LHLH: np.ndarray | None
    baseline_mean: dict[str, float]
    """Kind → mean score of random heads."""
    baseline_std: dict[str, float]
    """Kind → standard deviation of the score of random heads."""
    config: CompositionConfig
    silent: dict[str, np.ndarray]
    """Kind → ``[L, H, L, H]``: the sender writes nothing (zero ``W_OV``, or zero over its Gram's
    directions) or the receiver's circuit of that kind is zero, so the score is 0 by definition."""

    @property
    def kinds(self) -> tuple[str, ...]:
        return WEIGHT_KINDS + (POSITIONAL_KINDS if self.pos_q_LHLH is not None else ())

    def scores(self, kind: str) -> np.ndarray:
        """``[L, H, L, H]`` scores of one kind."""
        if kind not in self.kinds:
            raise KeyError(f"unknown or absent kind {kind!r}; have {self.kinds}")
        return getattr(self, f"{kind}_LHLH")

    def z(self, kind: str) -> np.ndarray:
        """``[L, H, L, H]`` z-scores against the random baseline of the same kind."""
        return (self.scores(kind) - self.baseline_mean[kind]) / self.baseline_std[kind]

    def rows(self) -> Iterator[dict]:
        """One dict per (kind, sender, later receiver), keys :data:`COMPOSITION_COLUMNS`."""
        L, H = self.q_LHLH.shape[:2]
        for kind in self.kinds:
            scores, z = self.scores(kind), self.z(kind)
            for ls in range(L):
                for hs in range(H):
                    for lr in range(ls + 1, L):
                        for hr in range(H):
                            yield self._row(kind, (ls, hs, lr, hr), scores, z)

    def top(self, kind: str, n: int = 10) -> list[dict]:
        """The ``n`` highest-scoring pairs of ``kind`` as rows (score order = z order)."""
        scores, z = self.scores(kind), self.z(kind)
        flat = np.where(np.isnan(scores), -np.inf, scores).ravel()
        order = np.argsort(-flat, kind="stable")[: min(n, int(np.isfinite(flat).sum()))]
        return [self._row(kind, np.unravel_index(i, scores.shape), scores, z) for i in order]

    def _row(self, kind: str, index: tuple, scores: np.ndarray, z: np.ndarray) -> dict:
        ls, hs, lr, hr = (int(i) for i in index)
        return {
            "sender_layer": ls, "sender_head": hs, "receiver_layer": lr, "receiver_head": hr,
            "kind": kind, "weight_score": float(scores[ls, hs, lr, hr]),
            "baseline_mean": self.baseline_mean[kind], "baseline_std": self.baseline_std[kind],
            "weight_z": float(z[ls, hs, lr, hr]), "silent": bool(self.silent[kind][ls, hs, lr, hr]),
        }


@torch.no_grad()
def composition_scores(model: HookedViT, config: CompositionConfig = CompositionConfig()) -> CompositionScores:
    """All-pairs composition scores of ``model`` with their random baselines (definitions in the
    module docstring). LayerNorm is folded here: pass the model as loaded."""
    cfg = model.cfg
    heads = head_weights(model, config)
    positions_ND = positional_inputs(model) if config.include_positional else None
    kinds = WEIGHT_KINDS + (POSITIONAL_KINDS if config.include_positional else ())
    scores, silent = _all_pairs(heads, positions_ND, kinds, cfg.n_layers, cfg.n_heads)
    baseline = random_baseline(cfg.d_model, cfg.d_head, config, positions_ND)
    arrays = {kind: scores[kind].double().cpu().numpy() for kind in kinds}
    return CompositionScores(
        q_LHLH=arrays["q"], k_LHLH=arrays["k"], v_LHLH=arrays["v"],
        pos_q_LHLH=arrays.get("pos_q"), pos_k_LHLH=arrays.get("pos_k"),
        baseline_mean={kind: mean for kind, (mean, _) in baseline.items()},
        baseline_std={kind: std for kind, (_, std) in baseline.items()},
        config=config, silent={kind: silent[kind].cpu().numpy() for kind in kinds},
    )


@torch.no_grad()
def head_weights(model: HookedViT, config: CompositionConfig = CompositionConfig()) -> HeadWeights:
    """Every head's weights, flattened to ``S = L*H`` heads, with ``ln1``'s scale folded into the
    reading weights (as ``fold_layer_norm(model).W_Q`` etc., without copying the model) and
    centred as ``config`` says."""
    ln_scale_LD = torch.stack([block.ln1.weight.detach() for block in model.blocks]).float()
    W_Q, W_K, W_V = (W.float() * ln_scale_LD[:, None, :, None] for W in (model.W_Q, model.W_K, model.W_V))
    heads = HeadWeights(*(W.flatten(0, 1) for W in (W_Q, W_K, W_V, model.W_O.float())))
    return _centre(heads, config)


@torch.no_grad()
def positional_inputs(model: HookedViT) -> torch.Tensor:
    """``Pn [N_patch, D]``: the patch tokens' position-only residual stream (position embedding
    + patch-embedding bias, through ``ln_pre`` if any), centred and divided by its RMS."""
    cfg, layout = model.cfg, model.layout
    pos_ND = model.W_pos.float()
    x_ND = pos_ND[layout.patch_start :] if cfg.pos_embed_prefix else pos_ND
    if model.embed.proj.bias is not None:
        x_ND = x_ND + model.embed.proj.bias.detach().float()
    if model.ln_pre is not None:
        x_ND = F.layer_norm(x_ND, (cfg.d_model,), model.ln_pre.weight.detach().float(), model.ln_pre.bias.detach().float(), cfg.ln_eps)
    return F.layer_norm(x_ND, (cfg.d_model,), eps=cfg.ln_eps)


@torch.no_grad()
def random_baseline(
    d_model: int, d_head: int, config: CompositionConfig = CompositionConfig(), positions_ND: torch.Tensor | None = None
) -> dict[str, tuple[float, float]]:
    """Kind → ``(mean, std)`` of the score of independent heads with i.i.d. N(0, 1) weights,
    centred as ``config`` says: q/k/v, and pos_q/pos_k when ``positions_ND`` (``Pn``) is given.
    Seeded by ``config.seed``; see :func:`_random_factors` for how the samples are drawn."""
    n = config.n_baseline_samples
    if n < 2:
        raise ValueError(f"n_baseline_samples must be at least 2, got {n}")
    kinds = WEIGHT_KINDS + (POSITIONAL_KINDS if positions_ND is not None else ())
    singular_N = torch.linalg.svdvals(positions_ND.double()).float().cpu() if positions_ND is not None else None
    draw = _BaselineDraws(n, d_model - 1, d_head, torch.Generator().manual_seed(config.seed), np.random.default_rng(config.seed))
    stats = {}
    for kind in kinds:
        values = _paired_score(*_random_factors(kind, draw, config, singular_N))
        stats[kind] = (float(values.mean()), float(values.std()))
    return stats


class _BaselineDraws(NamedTuple):
    """Seeded random draws of ``n`` baseline samples (normals from torch, chi-squares from numpy)."""

    n: int
    df: int
    d_head: int
    generator: torch.Generator
    rng: np.random.Generator

    def normal(self, *shape: int) -> torch.Tensor:
        return torch.randn(self.n, *shape, generator=self.generator)

    def wishart_basis(self, uncentred: list[bool]) -> list[torch.Tensor]:
        """``[n, rows, Dh]`` blocks whose joint Gram has the law of ``F^T F``, ``F`` = one residual
        factor per entry (centred or not), see :func:`_random_factors`."""
        p = len(uncentred) * self.d_head
        if self.df > p:
            L = self.normal(p, p).tril_(-1)
            chi2 = self.rng.chisquare(self.df - np.arange(p), size=(self.n, p))
            L.diagonal(dim1=-2, dim2=-1).copy_(torch.from_numpy(np.sqrt(chi2)))
            basis = L.mT
        else:
            basis = self.normal(self.df, p)
        extra = self.normal(1, p) * torch.tensor(uncentred).repeat_interleave(self.d_head)
        return list(torch.cat([basis, extra], dim=1).split(self.d_head, dim=-1))


def _random_factors(kind: str, draw: _BaselineDraws, config: CompositionConfig, singular_N: torch.Tensor | None) -> list[torch.Tensor]:
    """``draw.n`` samples of ``kind``'s four factors (:data:`KIND_FACTORS`) for independent
    Gaussian heads, expressed in small bases that give the score exactly its law in R^D.

    The score depends on ``U_A`` and ``V_B`` only through their own Grams and on ``V_A``, ``U_B``
    through their joint Gram, and these are independent; each group is drawn alone. For
    residual factors ``F = [F_1 .. F_m]`` (``D x m*Dh``), with ``P = I - 11^T/D``, a centred factor
    is ``P Z`` and an uncentred one ``P Z + 1 z^T / sqrt(D)`` with ``z ~ N(0, I)`` independent of
    ``P Z``; so ``F^T F = W + c c^T`` with ``W ~ Wishart(D - 1, I)`` and ``c`` the stacked ``z`` of
    the uncentred factors (0 elsewhere). ``W = L L^T`` is drawn by Bartlett's decomposition when
    ``D - 1 > m*Dh`` (else as the Gram of a ``(D - 1) x m*Dh`` Gaussian) and the factors are the
    column blocks of ``[L^T; c^T]``. A factor ``Pn W`` has the Gram law of ``diag(s) Z`` with ``s``
    the singular values of ``Pn`` (whose rows have zero mean, so centring ``W`` changes nothing).
    """
    U_A, V_A, U_B, V_B = KIND_FACTORS[kind]

    def alone(name: str) -> torch.Tensor:
        if name.startswith("Pn "):
            return singular_N[:, None] * draw.normal(singular_N.numel(), draw.d_head)
        return draw.wishart_basis([not _is_centred(name, config)])[0]

    V_A_, U_B_ = draw.wishart_basis([not _is_centred(V_A, config), not _is_centred(U_B, config)])
    return [alone(U_A), V_A_, U_B_, alone(V_B)]


def _is_centred(name: str, config: CompositionConfig) -> bool:
    return config.center_writes if name == "W_O^T" else config.center_reads


def _paired_score(U_A: torch.Tensor, V_A: torch.Tensor, U_B: torch.Tensor, V_B: torch.Tensor) -> torch.Tensor:
    """``comp(U_A V_A^T, U_B V_B^T)`` per leading index, from Dh x Dh Grams:
    ``||A B||^2 = tr(M^T G_A M G_B)`` with ``M = V_A^T U_B``, ``G_A = U_A^T U_A``, ``G_B = V_B^T V_B``."""
    G_A, G_B, M = U_A.mT @ U_A, V_B.mT @ V_B, V_A.mT @ U_B
    squared = ((M.mT @ G_A @ M) * G_B).sum((-2, -1))
    norm_A = (G_A * (V_A.mT @ V_A)).sum((-2, -1))
    norm_B = ((U_B.mT @ U_B) * G_B).sum((-2, -1))
    return (squared / (norm_A * norm_B)).clamp_min(0).sqrt()


def _centre(heads: HeadWeights, config: CompositionConfig) -> HeadWeights:
    centre = lambda W, dim: W - W.mean(dim, keepdim=True)
    W_Q, W_K, W_V = heads.W_Q, heads.W_K, heads.W_V
    if config.center_reads:
        W_Q, W_K, W_V = (centre(W, -2) for W in (W_Q, W_K, W_V))
    W_O = centre(heads.W_O, -1) if config.center_writes else heads.W_O
    return HeadWeights(W_Q, W_K, W_V, W_O)


def _factor(name: str, heads: HeadWeights, positions_ND: torch.Tensor | None) -> torch.Tensor:
    """A factor named in :data:`KIND_FACTORS`, ``[S, D or N_patch, Dh]``."""
    base = name.removeprefix("Pn ")
    W = heads.W_O.mT if base == "W_O^T" else getattr(heads, base)
    return positions_ND @ W if base != name else W


def _all_pairs(
    heads: HeadWeights, positions_ND: torch.Tensor | None, kinds: tuple[str, ...], n_layers: int, n_heads: int
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Kind → ``[L, H, L, H]`` scores, NaN unless the receiver's layer is later; 0 where the
    sender's or the receiver's circuit is zero (:attr:`CompositionScores.silent`).

    Senders are the heads of layers ``0..L-2``, receivers those of ``1..L-1``; all such pairs
    except (later half of the senders, earlier half of the receivers) are scored, two matrix
    products per Gram strip, and pairs with ``l_r <= l_s`` are masked.
    """
    L, H = n_layers, n_heads
    n, half = (L - 1) * H, (L - 1) // 2 * H
    later_LHLH = torch.arange(L)[:, None, None, None] < torch.arange(L)[None, None, :, None]
    out, silent = {}, {}
    for sender_factors in sorted({KIND_FACTORS[kind][:2] for kind in kinds}):
        group = [kind for kind in kinds if KIND_FACTORS[kind][:2] == sender_factors]
        U_A, V_A = (_factor(name, heads, positions_ND)[:n] for name in sender_factors)
        receivers = {}
        for kind in group:
            U_B, V_B = (_factor(name, heads, positions_ND)[H:] for name in KIND_FACTORS[kind][2:])
            receivers[kind] = (U_B @ (V_B.mT @ V_B), U_B)  # B B^T = left @ outer^T
        send_left_SDd = V_A @ (U_A.mT @ U_A)  # A^T A = left @ outer^T
        send_norm_S = (send_left_SDd * V_A).sum((-2, -1))
        dots_SR = {kind: send_norm_S.new_zeros(n, n) for kind in group}
        for lo, hi in _strip_bounds(V_A.shape[-2]):
            send_strip_SP = _gram_strip(send_left_SDd, V_A, lo, hi)
            send_strip_SP[:, :, hi - lo :] *= 2  # off-diagonal entries stand for both triangles
            send_strip_SP = send_strip_SP.flatten(1)
            for kind, (left, outer) in receivers.items():
                recv_strip_RP = _gram_strip(left, outer, lo, hi).flatten(1)
                # skip (senders of the later half) x (receivers of the earlier half): all masked
                dots_SR[kind][:half].addmm_(send_strip_SP[:half], recv_strip_RP.T)
                dots_SR[kind][half:, half:].addmm_(send_strip_SP[half:], recv_strip_RP[half:].T)
        for kind in group:
            left, outer = receivers[kind]
            denominator = send_norm_S[:, None] * (left * outer).sum((-2, -1))[None]
            squared_SR = torch.where(denominator > 0, dots_SR[kind] / denominator.clamp_min(1e-30), 0.0)
            score_LHLH = torch.full((L, H, L, H), math.nan, device=squared_SR.device)
            score_LHLH[:-1, :, 1:] = squared_SR.clamp_min(0).sqrt().view(L - 1, H, L - 1, H)
            out[kind] = torch.where(later_LHLH.to(squared_SR.device), score_LHLH, math.nan)
            silent_LHLH = torch.zeros(L, H, L, H, dtype=torch.bool)
            silent_LHLH[:-1, :, 1:] = (denominator <= 0).view(L - 1, H, L - 1, H).cpu()
            silent[kind] = silent_LHLH & later_LHLH
    return out, silent


def _strip_bounds(d_model: int) -> list[tuple[int, int]]:
    """Row ranges of the strips a ``D x D`` Gram is formed in, about :data:`GRAM_STRIP_ROWS` each."""
    n = max(1, round(d_model / GRAM_STRIP_ROWS))
    bounds = [round(i * d_model / n) for i in range(n + 1)]
    return list(itertools.pairwise(bounds))


def _gram_strip(left: torch.Tensor, outer: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Rows ``[lo, hi)``, columns ``[lo, D)`` of the Grams ``left @ outer^T``, ``[S, hi-lo, D-lo]``.
    Over all strips these cover the upper triangle, so for symmetric Grams the sum over strips
    of (strip with its off-diagonal part doubled) . (strip) is the Frobenius inner product."""
    return left[:, lo:hi] @ outer[:, lo:].mT
