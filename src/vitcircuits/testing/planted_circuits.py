"""Planted composition circuits: layer-1 heads that read known layer-0 heads through Q, K or V.

Ground truth for path patching and weight-based composition scores. The model is a
:func:`~vitcircuits.testing.planted.build_planted_heads` model (see that module for the residual
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

``g = match_gain``, ``s = content_scale``, ``C = content_dims``. For unit-variance pixels each
content coordinate has standard deviation ``s``, and ``m_j`` contains ``c_i / 8`` when ``i`` is a
neighbour of ``j``, so a neighbour key gets an expected logit bonus of ``g`` (non-neighbours: 0;
every key also gets image-dependent noise of std about ``4 g / sqrt(C)``). The two match heads
therefore attend to keys whose neighbourhood content matches the query (mostly its own
neighbours); mean-ablating the modular head replaces ``m`` by one constant vector, which makes
their logits constant over keys and their attention uniform. The V receiver's pattern is
positional, so the same ablation changes only its output. Q, K or V inputs that read no ablated
slice see the ablation only through ``ln1``'s normalisation, a relative change of ``O(|m|^2)``.

Why the inert decoy is inert: the sink head puts all but ``~N exp(-sharpness)`` of its mass on
the class token (first register without one), whose content dims are exactly zero (prefix
tokens get no patch embedding), so its output is ``~N exp(-sharpness) |c|`` (about ``1e-4`` of the
modular head's) at every token of every image, and mean-ablating it moves the decoy's logits by
about ``g * 1e-4``. Its weights, though, look exactly like ``k_composition``'s: the sink's
``W_OV`` copies content into its slice whatever the value is, and the decoy's ``W_QK`` reads that
slice, so ``||W_OV^sink W_QK^T||`` scores as high as the real K edge.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from vitcircuits.models import HookedViT
from vitcircuits.testing.planted import (
    DIRECTIONAL,
    MODULAR,
    SELF,
    SINK,
    PlantedConfig,
    PlantedModel,
    build_planted_heads,
    target_mask,
)

K_RECEIVER = "k_composition"
Q_RECEIVER = "q_composition"
V_RECEIVER = "v_composition"
LOCAL_DECOY = "local_decoy"
INERT_DECOY = "inert_k_decoy"
RECEIVER_ROLES = (K_RECEIVER, Q_RECEIVER, V_RECEIVER, LOCAL_DECOY, INERT_DECOY)
"""Roles of layer-1 heads ``0, 1, ...``; later layer-1 heads are random fillers."""
V_RECEIVER_OFFSET = (0, -1)
"""``(dy, dx)`` the V receiver attends to: the patch to the left (itself in the first column)."""
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


def build_planted_circuits(cfg: PlantedConfig | None = None, match_gain: float = 4.0) -> PlantedCircuitModel:
    """The planted layer-0 heads of ``cfg`` (default :data:`CIRCUIT_CONFIG`) plus the layer-1
    receivers of the module docstring; ``match_gain`` is the expected logit bonus of a neighbour
    key in the two content-matching receivers."""
    cfg = CIRCUIT_CONFIG if cfg is None else cfg
    if cfg.n_layers < 2 or cfg.n_heads < len(RECEIVER_ROLES):
        raise ValueError(f"planted circuits need n_layers >= 2 and n_heads >= {len(RECEIVER_ROLES)}, "
                         f"got {cfg.n_layers} and {cfg.n_heads}")
    planted = build_planted_heads(cfg)
    model = planted.model
    N, C, D, H, Dh = cfg.n_tokens, cfg.content_dims, cfg.d_model, cfg.n_heads, model.cfg.d_head
    sender = {kind: cfg.planted_kinds.index(kind) for kind in (MODULAR, SELF, SINK)}
    head_of = {role: head for head, role in enumerate(RECEIVER_ROLES)}
    content, eye_CC = planted.content_slice, torch.eye(C)
    # q.k / sqrt(Dh) = match^2 / sqrt(Dh) * c.m = match_gain * 8 / C * c.m / content_scale^2
    match = math.sqrt(match_gain * 8 / C * math.sqrt(Dh)) / cfg.content_scale
    receiver_masks = {}
    block = model.blocks[1]
    with torch.no_grad():
        block.ln1.weight.copy_(model.blocks[0].ln1.weight)
        block.ln1.bias.copy_(model.blocks[0].ln1.bias)
        W_Q, W_K, W_V = block.attn.qkv.weight.view(3, H, Dh, D).unbind(0)
        W_O_DHd = block.attn.proj.weight.view(D, H, Dh)
        for head in head_of.values():
            for W in (W_Q, W_K, W_V):
                W[head] = 0.0
            W_O_DHd[:, head] = 0.0
            W_O_DHd[planted.out_slice(1, head), head, :C] = eye_CC
        for role, query_dims, key_dims in (
            (K_RECEIVER, content, planted.out_slice(0, sender[MODULAR])),
            (Q_RECEIVER, planted.out_slice(0, sender[MODULAR]), content),
            (INERT_DECOY, content, planted.out_slice(0, sender[SINK])),
        ):
            W_Q[head_of[role], :C, query_dims] = match * eye_CC
            W_K[head_of[role], :C, key_dims] = match * eye_CC
            W_V[head_of[role], :C, content] = eye_CC
        for role, kind, offset, value_dims in (
            (V_RECEIVER, DIRECTIONAL, V_RECEIVER_OFFSET, planted.out_slice(0, sender[SELF])),
            (LOCAL_DECOY, MODULAR, None, content),
        ):
            head = head_of[role]
            mask_NN = target_mask(kind, model.layout, offset=offset)
            W_Q[head, :N, :N] = cfg.sharpness * math.sqrt(Dh) * mask_NN.T.to(W_Q.dtype)
            W_K[head, :N, :N] = torch.eye(N)
            W_V[head, :C, value_dims] = eye_CC
            receiver_masks[(1, head)] = mask_NN
    return PlantedCircuitModel(
        model=model,
        config=cfg,
        truth_heads=dict(planted.truth),
        edges={
            (0, sender[MODULAR], 1, head_of[K_RECEIVER]): "k",
            (0, sender[MODULAR], 1, head_of[Q_RECEIVER]): "q",
            (0, sender[SELF], 1, head_of[V_RECEIVER]): "v",
        },
        decoy_edges={(0, sender[SINK], 1, head_of[INERT_DECOY]): "k"},
        receivers=[(1, head) for head in head_of.values()],
        roles={(1, head): role for role, head in head_of.items()},
        receiver_masks=receiver_masks,
        planted=planted,
    )
