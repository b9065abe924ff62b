"""Sparse autoencoder model: configuration, encoder/decoder and the three activation rules.

Shape suffixes: ``B`` batch rows, ``D`` input width (``d_in``), ``F`` dictionary size (``d_sae``).

The SAE works internally on *normalised* activations ``x * norm_scale`` where ``norm_scale`` is a
scalar estimated from data so that the mean activation norm becomes ``sqrt(d_in)``. :meth:`SAE.encode`
and :meth:`SAE.decode` always take and return *raw* activations; :meth:`SAE.fold_normalization_`
absorbs the scale into the weights so that ``norm_scale`` becomes 1 without changing any output.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

ARCHITECTURES = ("topk", "batchtopk", "relu")

SPARSE_TRAINING_DTYPES = (torch.float32, torch.float64)
"""Dtypes for which :func:`vitcircuits.sae.train.train_sae` uses the sparse TopK / BatchTopK step on the CPU."""

_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class SAEConfig:
    """Shape and sparsity rule of a sparse autoencoder.

    Attributes:
        d_in: width of the activations being decomposed.
        d_sae: number of dictionary latents.
        architecture: ``"topk"`` keeps the ``k`` largest latents of every row; ``"batchtopk"`` keeps the
            ``k * B`` largest latents over a whole training batch and uses a learned threshold at
            inference (JumpReLU-style); ``"relu"`` is a ReLU encoder trained with an L1 penalty.
        k: target number of active latents per row (``topk`` / ``batchtopk``).
        l1_coefficient: weight of the decoder-norm-weighted L1 penalty (``relu`` only).
        aux_k: number of dead latents used by the AuxK loss (``topk`` / ``batchtopk``). ``None`` uses the
            TopK-paper convention ``d_in // 2`` (clamped to ``[1, d_sae]``); see :attr:`resolved_aux_k`.
        aux_coefficient: weight of the AuxK loss relative to the reconstruction loss (paper: 1/32).
        dead_steps_threshold: a latent is *dead* when it has not fired in any of the last this many
            training steps (counted in steps, i.e. ``dead_steps_threshold * batch_size`` tokens).
        threshold_momentum: momentum of the running average that estimates the BatchTopK inference
            threshold from the smallest kept activation of each training batch.
        normalize_activations: scale inputs so that their mean norm is ``sqrt(d_in)`` (scale estimated
            from data before training, foldable into the weights afterwards).
        dtype: parameter dtype name (``"float32"``, ``"float64"``, ``"bfloat16"``, ``"float16"``).
        hook_name: name of the activation site the SAE was trained on (metadata, written to ``cfg.json``).
        hook_layer: layer index of that site (metadata, ``-1`` when unknown).
    """

    d_in: int
    d_sae: int
    architecture: str = "topk"
    k: int = 32
    l1_coefficient: float = 1e-3
    aux_k: int | None = None
    aux_coefficient: float = 1.0 / 32.0
    dead_steps_threshold: int = 1000
    threshold_momentum: float = 0.99
    normalize_activations: bool = True
    dtype: str = "float32"
    hook_name: str = ""
    hook_layer: int = -1

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"unknown SAE architecture {self.architecture!r}; expected one of {ARCHITECTURES}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; expected one of {tuple(_DTYPES)}")
        if self.d_in <= 0 or self.d_sae <= 0:
            raise ValueError(f"d_in and d_sae must be positive, got {self.d_in} and {self.d_sae}")
        if self.architecture != "relu" and not 0 < self.k <= self.d_sae:
            raise ValueError(f"k must be in [1, d_sae={self.d_sae}], got {self.k}")

    @property
    def resolved_aux_k(self) -> int:
        """AuxK latent count: ``aux_k`` if set, else ``d_in // 2``, clamped to ``[1, d_sae]``."""
        aux_k = self.aux_k if self.aux_k is not None else self.d_in // 2
        return max(1, min(aux_k, self.d_sae))

    @property
    def torch_dtype(self) -> torch.dtype:
        """The :mod:`torch` dtype named by :attr:`dtype`."""
        return _DTYPES[self.dtype]


class ActiveLatents(NamedTuple):
    """The selected entries of a ``[B, F]`` latent matrix, in row-major CSR form (indices only, no values).

    Attributes:
        crow: ``[B + 1]`` row pointers; the entries of row ``b`` are ``crow[b]:crow[b + 1]``.
        rows: ``[N]`` row of each entry (non-decreasing).
        cols: ``[N]`` latent of each entry (any order within a row).
    """

    crow: torch.Tensor
    rows: torch.Tensor
    cols: torch.Tensor

    @classmethod
    def from_topk(cls, idx_BT: torch.Tensor) -> ActiveLatents:
        """``K`` entries per row at the latents ``idx_BT``."""
        B, K = idx_BT.shape
        device = idx_BT.device
        crow = torch.arange(0, B * K + 1, K, device=device)
        rows = torch.arange(B, device=device).repeat_interleave(K)
        return cls(crow, rows, idx_BT.reshape(-1))

    @classmethod
    def from_flat(cls, flat_idx_N: torch.Tensor, B: int, F: int) -> ActiveLatents:
        """Entries at the (distinct) flat indices ``row * F + col``; returns them sorted row-major."""
        mask = torch.zeros(B * F, dtype=torch.bool, device=flat_idx_N.device)
        mask[flat_idx_N] = True
        flat = mask.nonzero().squeeze(1)
        rows, cols = flat // F, flat % F
        crow = torch.zeros(B + 1, dtype=torch.long, device=flat.device)
        crow[1:] = torch.bincount(rows, minlength=B).cumsum(0)
        return cls(crow, rows, cols)

    def csr(self, values_N: torch.Tensor, B: int, F: int) -> torch.Tensor:
        """``[B, F]`` sparse CSR matrix with ``values_N`` at these entries."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
            return torch.sparse_csr_tensor(self.crow, self.cols, values_N, (B, F), check_invariants=False)

    def coo_transposed(self, values_N: torch.Tensor, B: int, F: int) -> torch.Tensor:
        """``[F, B]`` sparse COO matrix (the transpose) with ``values_N`` at these entries."""
        return torch.sparse_coo_tensor(torch.stack([self.cols, self.rows]), values_N, (F, B), check_invariants=False)


class _SelectedPreactivations(torch.autograd.Function):
    """``pre[rows, cols]`` for ``pre = xc @ W_enc + b_enc`` whose values were computed without autograd.

    The forward pass only takes the already computed values; the backward pass computes the
    gradients of ``xc``, ``W_enc`` and ``b_enc`` from the ``N`` selected entries alone (sparse
    products), which is exactly the gradient of the dense expression restricted to those entries.
    """

    @staticmethod
    def forward(ctx, vals_N, xc_BD, W_enc_DF, b_enc_F, active: ActiveLatents):
        ctx.active = active
        ctx.save_for_backward(xc_BD, W_enc_DF)
        ctx.n_latents = b_enc_F.shape[0]
        return vals_N.clone()

    @staticmethod
    def backward(ctx, g_N):
        xc_BD, W_enc_DF = ctx.saved_tensors
        active, F, B = ctx.active, ctx.n_latents, xc_BD.shape[0]
        g_N = g_N.contiguous()
        grad_xc = grad_W = grad_b = None
        if ctx.needs_input_grad[1]:
            grad_xc = active.csr(g_N, B, F) @ W_enc_DF.T
        if ctx.needs_input_grad[2]:
            grad_W = torch.sparse.mm(active.coo_transposed(g_N, B, F), xc_BD).T
        if ctx.needs_input_grad[3]:
            grad_b = torch.zeros(F, dtype=g_N.dtype, device=g_N.device).index_add_(0, active.cols, g_N)
        return None, grad_xc, grad_W, grad_b, None


class _SparseDecode(torch.autograd.Function):
    """``out[b] = sum over the entries (b, f) of vals * W_dec[f]`` (no bias), with sparse backward."""

    @staticmethod
    def forward(ctx, vals_N, W_dec_FD, active: ActiveLatents, B: int):
        ctx.active, ctx.B = active, B
        ctx.save_for_backward(vals_N, W_dec_FD)
        return active.csr(vals_N, B, W_dec_FD.shape[0]) @ W_dec_FD

    @staticmethod
    def backward(ctx, g_BD):
        vals_N, W_dec_FD = ctx.saved_tensors
        active, B, F = ctx.active, ctx.B, W_dec_FD.shape[0]
        g_BD = g_BD.contiguous()
        grad_vals = grad_W = None
        if ctx.needs_input_grad[0]:  # (g @ W_dec^T) sampled at the entries
            grad_vals = torch.sparse.sampled_addmm(active.csr(vals_N, B, F), g_BD, W_dec_FD.T, beta=0.0).values()
        if ctx.needs_input_grad[1]:
            grad_W = torch.sparse.mm(active.coo_transposed(vals_N, B, F), g_BD)
        return grad_vals, grad_W, None, None


class SAE(nn.Module):
    """Sparse autoencoder ``x -> f = act((x*s - b_dec) @ W_enc + b_enc) -> (f @ W_dec + b_dec) / s``.

    Parameters follow SAELens names and layouts: ``W_enc [d_in, d_sae]``, ``b_enc [d_sae]``,
    ``W_dec [d_sae, d_in]``, ``b_dec [d_in]``. Buffers: ``norm_scale`` (scalar ``s``), ``threshold``
    ``[d_sae]`` (BatchTopK inference threshold, also what SAELens calls the JumpReLU threshold) and
    ``threshold_updates`` (number of running-average updates of ``threshold`` so far).

    Decoder rows are initialised at unit norm and the encoder as the decoder's transpose.
    """

    def __init__(self, cfg: SAEConfig, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        dtype = cfg.torch_dtype
        W_dec_FD = torch.randn(cfg.d_sae, cfg.d_in, generator=generator, dtype=torch.float32)
        W_dec_FD = W_dec_FD / W_dec_FD.norm(dim=1, keepdim=True)
        self.W_enc = nn.Parameter(W_dec_FD.T.clone().to(dtype))
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae, dtype=dtype))
        self.W_dec = nn.Parameter(W_dec_FD.to(dtype))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in, dtype=dtype))
        self.register_buffer("norm_scale", torch.ones((), dtype=dtype))
        self.register_buffer("threshold", torch.zeros(cfg.d_sae, dtype=dtype))
        self.register_buffer("threshold_updates", torch.zeros((), dtype=torch.long))

    # ----------------------------------------------------------------------------------- encoding
    def pre_activations(self, xn_BD: torch.Tensor) -> torch.Tensor:
        """Encoder pre-activations of *normalised* inputs: ``(xn - b_dec) @ W_enc + b_enc``."""
        return (xn_BD - self.b_dec) @ self.W_enc + self.b_enc

    def activate(self, pre_BF: torch.Tensor) -> torch.Tensor:
        """Apply the sparsity rule to pre-activations.

        ``topk``: ReLU of the ``k`` largest entries of each row, zeros elsewhere. ``batchtopk``: in
        training mode ReLU of the ``k * B`` largest entries of the whole batch; in eval mode a
        JumpReLU ``pre * (pre > threshold)``. ``relu``: plain ReLU.
        """
        arch = self.cfg.architecture
        if arch == "relu":
            return torch.relu(pre_BF)
        if arch == "topk":
            vals_BT, idx_BT = pre_BF.topk(self.cfg.k, dim=-1)
            return torch.zeros_like(pre_BF).scatter(-1, idx_BT, torch.relu(vals_BT))
        if self.training:
            flat = pre_BF.reshape(-1)
            n_keep = min(self.cfg.k * pre_BF.shape[0], flat.numel())
            vals, idx = flat.topk(n_keep)
            return torch.zeros_like(flat).scatter(0, idx, torch.relu(vals)).reshape(pre_BF.shape)
        return pre_BF * (pre_BF > self.threshold).to(pre_BF.dtype) * (pre_BF > 0).to(pre_BF.dtype)

    def encode_normalized(self, xn_BD: torch.Tensor) -> torch.Tensor:
        """Latent activations of already-normalised inputs."""
        return self.activate(self.pre_activations(xn_BD))

    def encode(self, x_BD: torch.Tensor) -> torch.Tensor:
        """Latent activations ``feats_BF`` of raw activations ``x_BD``."""
        return self.encode_normalized(x_BD * self.norm_scale)

    # ----------------------------------------------------------------------------------- decoding
    def decode_normalized(self, feats_BF: torch.Tensor) -> torch.Tensor:
        """Reconstruction in the normalised space: ``feats @ W_dec + b_dec``."""
        return feats_BF @ self.W_dec + self.b_dec

    def decode(self, feats_BF: torch.Tensor) -> torch.Tensor:
        """Reconstruction ``x_BD`` in the raw activation space."""
        return self.decode_normalized(feats_BF) / self.norm_scale

    def forward(self, x_BD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(recon_BD, feats_BF)`` for raw activations ``x_BD``."""
        feats_BF = self.encode(x_BD)
        return self.decode(feats_BF), feats_BF

    # ------------------------------------------------------------------------------------ losses
    def weighted_l1(self, feats_BF: torch.Tensor) -> torch.Tensor:
        """Mean over rows of ``sum_f |f| * ||W_dec[f]||`` (the ReLU SAE sparsity penalty)."""
        return (feats_BF.abs() * self.W_dec.norm(dim=1)).sum(-1).mean()

    # ------------------------------------------------------------------------------- maintenance
    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        """Rescale every decoder row to unit norm (in place)."""
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))

    @torch.no_grad()
    def remove_parallel_decoder_grad_(self) -> None:
        """Project out of ``W_dec.grad`` the component parallel to each (unit-norm) decoder row."""
        if self.W_dec.grad is None:
            return
        rows_FD = self.W_dec / self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)
        parallel_F1 = (self.W_dec.grad * rows_FD).sum(dim=1, keepdim=True)
        self.W_dec.grad.sub_(parallel_F1 * rows_FD)

    @torch.no_grad()
    def estimate_norm_scale_(self, x_ND: torch.Tensor) -> float:
        """Set ``norm_scale`` so that the mean norm of ``x_ND * norm_scale`` is ``sqrt(d_in)``.

        Does nothing (keeps 1) when ``cfg.normalize_activations`` is false. Returns the scale.
        """
        if self.cfg.normalize_activations:
            mean_norm = x_ND.double().norm(dim=-1).mean().item()
            self.norm_scale.fill_(math.sqrt(self.cfg.d_in) / max(mean_norm, 1e-12))
        return float(self.norm_scale)

    @torch.no_grad()
    def fold_normalization_(self) -> None:
        """Absorb ``norm_scale`` into the weights and reset it to 1, leaving every output unchanged.

        With ``s = norm_scale``: ``W_enc <- s W_enc``, ``W_dec <- W_dec / s``, ``b_dec <- b_dec / s``.
        Latents and thresholds are unchanged; decoder rows then have norm ``1 / s``.
        """
        s = self.norm_scale.clone()
        self.W_enc.mul_(s)
        self.W_dec.div_(s)
        self.b_dec.div_(s)
        self.norm_scale.fill_(1.0)

    @torch.no_grad()
    def update_threshold_(self, feats_BF: torch.Tensor) -> None:
        """Fold the smallest positive activation of a BatchTopK training batch into ``threshold``.

        ``feats_BF`` may also be the kept activations alone, in any shape (only positive entries count).

        ``threshold`` is a running average (momentum ``cfg.threshold_momentum``, first batch taken as
        is) of the smallest kept activation; every latent shares the same value.
        """
        kept = feats_BF[feats_BF > 0]
        if kept.numel() == 0:
            return
        smallest = kept.min()
        if int(self.threshold_updates) == 0:
            self.threshold.fill_(smallest)
        else:
            m = self.cfg.threshold_momentum
            self.threshold.mul_(m).add_((1 - m) * smallest)
        self.threshold_updates.add_(1)

    def auxk_reconstruction(self, pre_BF: torch.Tensor, dead_F: torch.Tensor) -> torch.Tensor:
        """Reconstruction of the residual from the top ``aux_k`` *dead* latents (no decoder bias).

        Returns zeros when no latent is dead.
        """
        n_dead = int(dead_F.sum())
        if n_dead == 0:
            return torch.zeros(pre_BF.shape[0], self.cfg.d_in, dtype=pre_BF.dtype, device=pre_BF.device)
        masked_BF = pre_BF.masked_fill(~dead_F, float("-inf"))
        vals_BT, idx_BT = masked_BF.topk(min(self.cfg.resolved_aux_k, n_dead), dim=-1)
        aux_BF = torch.zeros_like(pre_BF).scatter(-1, idx_BT, torch.relu(vals_BT))
        return aux_BF @ self.W_dec

    # ----------------------------------------------------------------- sparse training step
    @property
    def supports_sparse_training(self) -> bool:
        """Whether :func:`~vitcircuits.sae.train.train_sae` uses the sparse step (TopK / BatchTopK,
        float32 / float64, on the CPU): only the encoder matmul stays dense."""
        return (self.cfg.architecture in ("topk", "batchtopk") and self.W_enc.dtype in SPARSE_TRAINING_DTYPES
                and self.W_enc.device.type == "cpu")

    @torch.no_grad()
    def select_active(self, pre_BF: torch.Tensor) -> tuple[ActiveLatents, torch.Tensor]:
        """The entries that :meth:`activate` keeps in training mode and their pre-activations ``vals_N``.

        ``topk``: the ``k`` largest of each row; ``batchtopk``: the ``k * B`` largest of the batch.
        ``relu(vals_N)`` at these entries (zeros elsewhere) is exactly :meth:`activate`'s output.
        """
        if self.cfg.architecture == "topk":
            vals_BT, idx_BT = pre_BF.topk(self.cfg.k, dim=-1)
            return ActiveLatents.from_topk(idx_BT), vals_BT.reshape(-1)
        if self.cfg.architecture != "batchtopk":
            raise ValueError(f"select_active needs a topk or batchtopk SAE, not {self.cfg.architecture!r}")
        B, F = pre_BF.shape
        flat = pre_BF.reshape(-1)
        active = ActiveLatents.from_flat(flat.topk(min(self.cfg.k * B, flat.numel())).indices, B, F)
        return active, pre_BF[active.rows, active.cols]

    @torch.no_grad()
    def select_auxk(self, pre_BF: torch.Tensor, dead_F: torch.Tensor) -> tuple[ActiveLatents, torch.Tensor] | None:
        """The ``aux_k`` largest pre-activations among dead latents of each row (as in
        :meth:`auxk_reconstruction`) and their values; ``None`` when no latent is dead."""
        n_dead = int(dead_F.sum())
        if n_dead == 0:
            return None
        vals_BT, idx_BT = pre_BF.masked_fill(~dead_F, float("-inf")).topk(min(self.cfg.resolved_aux_k, n_dead), dim=-1)
        return ActiveLatents.from_topk(idx_BT), vals_BT.reshape(-1)

    def selected_preactivations(self, vals_N: torch.Tensor, xc_BD: torch.Tensor, active: ActiveLatents) -> torch.Tensor:
        """``(xc @ W_enc + b_enc)[active]`` with autograd, given those values computed without it.

        ``xc_BD`` is the normalised input minus ``b_dec`` (with its graph, so that ``b_dec`` gets its
        encoder-side gradient). Gradients reach ``W_enc``, ``b_enc`` and ``xc`` through sparse products only.
        """
        return _SelectedPreactivations.apply(vals_N, xc_BD, self.W_enc, self.b_enc, active)

    def decode_active(self, feats_N: torch.Tensor, active: ActiveLatents, n_rows: int) -> torch.Tensor:
        """``feats @ W_dec`` for latents given at ``active`` entries (no decoder bias), sparse forward and backward."""
        return _SparseDecode.apply(feats_N, self.W_dec, active, n_rows)
