"""Planted composition circuits: layer-1 heads that read known layer-0 heads through Q, K or V.

Ground truth for path patching and weight-based composition scores. The model is a
:func:`~vitcircuits.groundtruth.planted.build_planted_heads` model (see that module for the residual
layout: one-hot position dims, content dims, one output slice per head) whose first layer-1 heads
are replaced by planted receivers; MLPs stay zero and further layer-1 heads stay random fillers.

``blocks.1.ln1`` gets the affine of ``blocks.0.ln1`` (weight ``sqrt(var0 + eps)``, bias ``1/D``),
so it maps the residual stream to itself up to a factor ``1 - O(|x_rest|^2)``, where ``x_rest`` is
everything but the one-hot: content and layer-0 output slices are all ``+/-`` pairs (zero mean)
and of the size of the content code, so layer 1 sees them at their raw scale, and positional
receivers keep their ``sharpness`` margins.

Receivers (layer-1 heads, in this order; every one writes only its own output slice, ``W_O``
copying head dims ``[0, C)`` into it)::

    k_composition  Q reads the content c_i of the query, K reads the modular head's slice m_j
                   (mean content of the 8 neighbours of key j): logit = g * 8/C * c_i.m_j / s^2
    q_composition  the transpose: Q reads the modular slice m_i, K reads the key's content c_j
    v_composition  attends to the patch to its left by position; V reads the self head's slice
    local_decoy    attends to its 8 neighbours by position; V reads content; reads no head's output
    inert_k_decoy  Q reads content, K reads the sink head's slice (weights like k_composition)

Optional roles (not in :data:`RECEIVER_ROLES`; pass ``roles`` to :func:`build_planted_circuits`)::

    inert_q_decoy  the transpose: Q reads the sink head's slice, K reads content
    inert_v_decoy  attends to itself by position; V reads content and the sink head's slice
    cls_k_composition  K-composition read at the class token: Q reads the class token's position
                   dim only (a fixed unit direction u of head space, zero at every other query),
                   K reads the modular head's slice (as k_composition), V reads content with gain
                   2 sqrt(N): logit at the class query = g * u.m_j / std(u.m); needs a class token

``g = match_gain``, ``s = content_scale``, ``C = content_dims``. For unit-variance pixels each
content coordinate has standard deviation ``s``, and ``m_j`` contains ``c_i / 8`` when ``i`` is a
neighbour of ``j``, so a neighbour key gets an expected logit bonus of ``g`` (non-neighbours: 0;
every key also gets image-dependent noise of std about ``4 g / sqrt(C)``). The two match heads
therefore attend to keys whose neighbourhood content matches the query (mostly its own
neighbours); mean-ablating the modular head replaces ``m`` by one constant vector, which makes
their logits constant over keys and their attention uniform. The V receiver's pattern is
positional, so the same ablation changes only its output. Q, K or V inputs that read no ablated
slice see the ablation only through ``ln1``'s normalisation, a relative change of ``O(|m|^2)``.

The class-token receiver attends uniformly at every patch query (its query is zero there), so it
composes with the modular head at the class token's query only: there its attention follows the
modular slice of the keys (logits of spread about ``g`` over keys), and mean-ablating the modular
head makes it uniform. It changes one token's output, so V reads content with gain ``2 sqrt(N)``
(:data:`CLS_VALUE_GAIN`): relative to the whole ``N``-token stream its move is then twice that of
a receiver whose every patch query moves by the size of the content code, about 2-4 % for unit
pixel noise (a path ablation must move the embedding by 1 % to matter).

Why the inert decoy is inert: the sink head puts all but ``~N exp(-sharpness)`` of its mass on
the class token (first register without one), whose content dims are exactly zero (prefix
tokens get no patch embedding), so its output is ``~N exp(-sharpness) |c|`` (about ``1e-4`` of the
modular head's) at every token of every image, and mean-ablating it moves the decoy's logits by
about ``g * 1e-4``. Its weights, though, look exactly like ``k_composition``'s: the sink's
``W_OV`` copies content into its slice whatever the value is, and the decoy's ``W_QK`` reads that
slice, so ``||W_OV^sink W_QK^T||`` scores as high as the real K edge. The same holds for the
optional Q and V decoys; the V decoy's output is its own content (it attends to itself), next to
which the sink's contribution is ``~1e-4`` too.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from vitcircuits.groundtruth.planted import (
    DIRECTIONAL,
    MODULAR,
    SELF,
    SINK,
    PlantedConfig,
    PlantedModel,
    build_planted_heads,
    target_mask,
)
from vitcircuits.models import HookedViT

K_RECEIVER = "k_composition"
Q_RECEIVER = "q_composition"
V_RECEIVER = "v_composition"
LOCAL_DECOY = "local_decoy"
INERT_DECOY = "inert_k_decoy"
INERT_Q_DECOY = "inert_q_decoy"
INERT_V_DECOY = "inert_v_decoy"
CLS_K_RECEIVER = "cls_k_composition"
RECEIVER_ROLES = (K_RECEIVER, Q_RECEIVER, V_RECEIVER, LOCAL_DECOY, INERT_DECOY)
"""Default roles of layer-1 heads ``0, 1, ...``; later layer-1 heads are random fillers."""
ALL_RECEIVER_ROLES = (*RECEIVER_ROLES, INERT_Q_DECOY, INERT_V_DECOY, CLS_K_RECEIVER)
"""Every role :func:`build_planted_circuits` can plant."""
EDGE_OF_ROLE = {K_RECEIVER: (MODULAR, "k"), Q_RECEIVER: (MODULAR, "q"), V_RECEIVER: (SELF, "v"), CLS_K_RECEIVER: (MODULAR, "k")}
"""Causal receiver role -> (kind of the layer-0 sender it reads, input it reads it through)."""
DECOY_OF_ROLE = {INERT_DECOY: (SINK, "k"), INERT_Q_DECOY: (SINK, "q"), INERT_V_DECOY: (SINK, "v")}
"""Inert decoy role -> (sender kind, input): weights compose, the path has no effect."""
V_RECEIVER_OFFSET = (0, -1)
"""``(dy, dx)`` the V receiver attends to: the patch to the left (itself in the first column)."""
CLS_VALUE_GAIN = 2.0
"""The class-token receiver's V reads content with gain ``CLS_VALUE_GAIN * sqrt(N)`` (module docstring)."""
CIRCUIT_CONFIG = PlantedConfig(content_scale=0.01)
"""Default shape: 8x8 patches and a class token; content 5x the head-atlas default, which keeps
layer-0 logits within ``sharpness * |c|^2 / 2 < 0.05`` of position-only for pixel std 1 while
leaving float32 plenty of resolution for the content-matching logits."""


@dataclass(frozen=True)
class PlantedCircuitModel:
    """A planted-circuit HookedViT with its ground truth."""

    model: HookedViT
    config: PlantedConfig
    truth_heads: dict[tuple[int, int], str]
    """``(0, head) -> kind`` of the planted layer-0 heads (as :attr:`PlantedModel.truth`)."""
    edges: dict[tuple[int, int, int, int], str]
    """``(sender_layer, sender_head, receiver_layer, receiver_head) -> 'q' | 'k' | 'v'``: the input
    of the receiver that reads the sender's output, for the causal circuits only."""
    decoy_edges: dict[tuple[int, int, int, int], str]
    """Same keys and values: pairs whose weights compose but whose path has no causal effect."""
    receivers: list[tuple[int, int]]
    """``(layer, head)`` of every planted layer-1 head (circuits and decoys), in head order."""
    roles: dict[tuple[int, int], str]
    """Receiver ``(layer, head)`` -> one of :data:`RECEIVER_ROLES`."""
    receiver_masks: dict[tuple[int, int], torch.Tensor]
    """``[N, N]`` bool ``[query, key]`` targets of the receivers that attend by position."""
    planted: PlantedModel
    """The same model seen as a layer-0 planted model: ``out_slice``, ``content_slice``,
    ``target_masks`` and ``offsets`` of the layer-0 heads."""

    def receiver(self, role: str) -> tuple[int, int]:
        """``(layer, head)`` of the receiver with ``role``."""
        (head,) = [key for key, value in self.roles.items() if value == role]
        return head


def build_planted_circuits(cfg: PlantedConfig | None = None, match_gain: float = 4.0, roles: tuple[str, ...] = RECEIVER_ROLES,
                           v_offset: tuple[int, int] = V_RECEIVER_OFFSET) -> PlantedCircuitModel:
    """The planted layer-0 heads of ``cfg`` (default :data:`CIRCUIT_CONFIG`) plus the layer-1
    receivers of the module docstring; ``match_gain`` is the expected logit bonus of a neighbour
    key in the two content-matching receivers. ``roles`` are the roles of layer-1 heads ``0, 1,
    ...`` (any of :data:`ALL_RECEIVER_ROLES`; only ``local_decoy`` may repeat) and ``v_offset`` the
    ``(dy, dx)`` the V receiver attends to."""
    cfg = CIRCUIT_CONFIG if cfg is None else cfg
    if cfg.n_layers < 2 or cfg.n_heads < len(roles):
        raise ValueError(f"planted circuits need n_layers >= 2 and n_heads >= {len(roles)}, "
                         f"got {cfg.n_layers} and {cfg.n_heads}")
    if set(roles) - set(ALL_RECEIVER_ROLES):
        raise ValueError(f"unknown receiver roles {sorted(set(roles) - set(ALL_RECEIVER_ROLES))}")
    if any(roles.count(role) > 1 for role in roles if role != LOCAL_DECOY):
        raise ValueError(f"only {LOCAL_DECOY!r} may repeat, got {roles}")
    if CLS_K_RECEIVER in roles and not cfg.class_token:
        raise ValueError(f"{CLS_K_RECEIVER!r} reads at the class token: it needs class_token=True")
    planted = build_planted_heads(cfg)
    model = planted.model
    N, C, D, H, Dh = cfg.n_tokens, cfg.content_dims, cfg.d_model, cfg.n_heads, model.cfg.d_head
    reads = {kind: planted.out_slice(0, cfg.planted_kinds.index(kind)) for kind in (MODULAR, SELF, SINK)}
    content, eye_CC = planted.content_slice, torch.eye(C)
    reads["content"] = content
    # q.k / sqrt(Dh) = match^2 / sqrt(Dh) * c.m = match_gain * 8 / C * c.m / content_scale^2
    match = math.sqrt(match_gain * 8 / C * math.sqrt(Dh)) / cfg.content_scale
    # class-token receiver: u = (1, -1, 1, -1, ...) / sqrt(C) reads every content pair; u.m has std
    # content_scale / 2 for an interior key (u.c: sqrt(2) s, averaged over 8 neighbours), so
    # q.k / sqrt(Dh) = cls_query * match * u.m / sqrt(Dh) has std match_gain
    u_C = torch.tensor([1.0, -1.0]).repeat(C // 2) / math.sqrt(C)
    cls_query = 2 * match_gain * math.sqrt(Dh) / (match * cfg.content_scale)
    # content-matching role -> (what Q reads, what K reads); V reads content
    matching = {K_RECEIVER: ("content", MODULAR), Q_RECEIVER: (MODULAR, "content"),
                INERT_DECOY: ("content", SINK), INERT_Q_DECOY: (SINK, "content")}
    # positional role -> (pattern kind, offset, what V reads)
    positional = {V_RECEIVER: (DIRECTIONAL, v_offset, (SELF,)), LOCAL_DECOY: (MODULAR, None, ("content",)),
                  INERT_V_DECOY: (SELF, None, ("content", SINK))}
    receiver_masks = {}
    block = model.blocks[1]
    with torch.no_grad():
        block.ln1.weight.copy_(model.blocks[0].ln1.weight)
        block.ln1.bias.copy_(model.blocks[0].ln1.bias)
        W_Q, W_K, W_V = block.attn.qkv.weight.view(3, H, Dh, D).unbind(0)
        W_O_DHd = block.attn.proj.weight.view(D, H, Dh)
        for head, role in enumerate(roles):
            for W in (W_Q, W_K, W_V):
                W[head] = 0.0
            W_O_DHd[:, head] = 0.0
            W_O_DHd[planted.out_slice(1, head), head, :C] = eye_CC
            if role == CLS_K_RECEIVER:
                W_Q[head, :C, model.layout.cls_index] = cls_query * u_C
                W_K[head, :C, reads[MODULAR]] = match * eye_CC
                W_V[head, :C, content] = CLS_VALUE_GAIN * math.sqrt(N) * eye_CC
                continue
            if role in matching:
                query_reads, key_reads = matching[role]
                W_Q[head, :C, reads[query_reads]] = match * eye_CC
                W_K[head, :C, reads[key_reads]] = match * eye_CC
                W_V[head, :C, content] = eye_CC
                continue
            kind, offset, value_reads = positional[role]
            mask_NN = target_mask(kind, model.layout, offset=offset)
            W_Q[head, :N, :N] = cfg.sharpness * math.sqrt(Dh) * mask_NN.T.to(W_Q.dtype)
            W_K[head, :N, :N] = torch.eye(N)
            for name in value_reads:
                W_V[head, :C, reads[name]] = eye_CC
            receiver_masks[(1, head)] = mask_NN

    def edges_of(table: dict) -> dict:
        return {(0, cfg.planted_kinds.index(table[role][0]), 1, head): table[role][1] for head, role in enumerate(roles) if role in table}

    return PlantedCircuitModel(
        model=model,
        config=cfg,
        truth_heads=dict(planted.truth),
        edges=edges_of(EDGE_OF_ROLE),
        decoy_edges=edges_of(DECOY_OF_ROLE),
        receivers=[(1, head) for head in range(len(roles))],
        roles={(1, head): role for head, role in enumerate(roles)},
        receiver_masks=receiver_masks,
        planted=planted,
    )
