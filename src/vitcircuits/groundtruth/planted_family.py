"""A seeded family of planted-circuit ViTs: ground truth for benchmarking the head atlas and the
composition finder on many shapes, not one.

Every member is a :func:`~vitcircuits.groundtruth.planted_circuits.build_planted_circuits` model
(see :mod:`vitcircuits.groundtruth.planted` for the residual layout: one-hot positions, content dims,
one output slice per head) that is then rearranged by a function-preserving relabelling:

- **Head roles are permuted** within the sender and the receiver layer by a seeded permutation,
  together with the output slices they write (a permutation of the residual dims applied to every
  weight that reads or writes the stream), so head ``(l, h)`` still writes ``out_slice(l, h)``.
- **Layers are moved**: the planted senders sit in layer ``sender_layer`` and the receivers in
  the next one; the layers before them and after them are random fillers. This works because the
  planted heads never needed to be in layer 0, only to read a stream that is one-hot plus small
  zero-mean-ish terms: every filler writes a weak output (``filler_scale``) into its own slice only,
  so at any depth the stream is ``one-hot + content + O(|c|)`` slices, every block's ``ln1`` gets
  the layer-0 affine (weight ``sqrt(var0 + eps)``, bias ``1/D``) and maps it to itself up to
  ``1 - O(|x_rest|^2)``, and positional heads keep their ``sharpness`` margins. The same affine
  makes the fillers' random Q/K logits tiny (they read the stream at its raw scale), so fillers
  attend almost uniformly: they are unambiguous ``other`` heads, never a planted kind.
- **Fillers read no head's output**: their random Q/K/V weights are kept on the position and
  content dims only. A filler that read every dim would be a real, if incidental, receiver of
  every head (ablating a content-matching receiver moved a later filler's output by ~6 % through V
  in one member), so the planted edges would not be the whole causal graph; this way they are, up
  to the ``O(|c|^2)`` change of every ``ln1``'s normalisation.
- **Silent layer-mates** (``silent_fillers``): the sender layer's fillers get a zero ``W_V``, so
  their output and OV circuit are exactly zero (their edges are the composition stage's ``silent``
  ones).
- **Narrow members** (``heads_kept``): the full-width member is built, then only ``heads_kept``
  heads of every layer are kept (in their permuted order): the planted edges' senders and
  receivers first, then the decoy edges' ends, then the other planted heads (by built order:
  sender kinds as :attr:`~vitcircuits.groundtruth.planted.PlantedConfig.planted_kinds`, receiver roles
  as :attr:`FamilyConfig.receiver_roles`), then fillers (in filler layers: the first heads). The
  model is rebuilt with ``n_heads = heads_kept`` and the same ``d_head`` and residual layout (a
  dropped head's slice is left unwritten), so a kept head still writes the slice it wrote in the
  full-width member (:attr:`FamilyMember.kept_heads`). The stream changes only by the dropped heads' outputs, which
  no kept head reads except through ``ln1``'s normalisation.
- **Class-token circuits** (``cls_edges``): a
  :data:`~vitcircuits.groundtruth.planted_circuits.CLS_K_RECEIVER` whose query is non-zero at the
  class token only, so it K-composes with the modular head at that query alone.
- **Seeded content**: the directional offsets (distinct, among the 8 neighbour offsets), the V
  receiver's offset, the content projection and the filler weights all follow ``seed``.

Ground truth (:class:`FamilyMember`): ``truth_heads`` holds every head whose attention is fixed
by position (the senders' kinds, plus the receiver layer's positional heads: the V receiver is
``directional``, a local decoy ``modular``, an inert V decoy ``self``); the content-matching K/Q
receivers and the class-token receiver are ``unscored_heads`` (where their mean attention falls
depends on the grid and the images, so no kind is the right one); every other head (fillers,
silent or not, inert K/Q decoys, which attend uniformly) is :data:`OTHER`. ``edges`` are the causal edges, ``decoy_edges`` compose by weights
only, and local decoys compose with nothing.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from itertools import chain

import numpy as np
import torch

from vitcircuits.groundtruth.planted import DIRECTIONAL, MODULAR, NEIGHBOUR_OFFSETS, SELF, PlantedConfig
from vitcircuits.groundtruth.planted_circuits import (
    CLS_K_RECEIVER,
    EDGE_OF_ROLE,
    INERT_DECOY,
    INERT_Q_DECOY,
    INERT_V_DECOY,
    K_RECEIVER,
    LOCAL_DECOY,
    Q_RECEIVER,
    V_RECEIVER,
    build_planted_circuits,
)
from vitcircuits.models import HookedViT, TokenLayout, ViTConfig

OTHER = "other"
"""Truth of a head with no planted kind (a filler or a uniformly attending decoy)."""
FILLER = "filler"
"""Role of a random filler head."""
EDGE_RECEIVERS = {"k": K_RECEIVER, "q": Q_RECEIVER, "v": V_RECEIVER}
CLS_EDGE_RECEIVERS = {"k": CLS_K_RECEIVER}
"""Class-token edge -> receiver role."""
INERT_RECEIVERS = {"k": INERT_DECOY, "q": INERT_Q_DECOY, "v": INERT_V_DECOY}
POSITIONAL_RECEIVER_KINDS = {V_RECEIVER: DIRECTIONAL, LOCAL_DECOY: MODULAR, INERT_V_DECOY: SELF}
"""Receiver role -> kind of its position-only attention pattern."""
CONTENT_RECEIVERS = (K_RECEIVER, Q_RECEIVER, CLS_K_RECEIVER)
"""Roles whose attention depends on content (their kind is left unscored)."""
MIN_GRID = 4
MAX_PREFIX_SHARE = 0.25
"""Most prefix tokens (class token + registers) per patch: a near-uniform filler then puts
``< 0.5`` of its mass on them and is never read as a sink."""


@dataclass(frozen=True)
class FamilyConfig:
    """One member of the family; :func:`build_family_member` turns it into a model."""

    grid: tuple[int, int] = (8, 8)
    """Patch grid ``(rows, cols)``, each at least 4."""
    patch_size: int = 4
    """Square patch side in pixels."""
    n_layers: int = 2
    """Blocks; at least ``sender_layer + 2``. Layers other than the sender and receiver layers are fillers."""
    n_heads: int = 6
    """Heads per layer; at least the number of sender kinds (``4 + n_directional``: modular,
    directional..., self, sink, global) and of receiver roles."""
    sender_layer: int = 0
    """Layer of the planted senders; the receivers are in the next layer."""
    class_token: bool = True
    """Prepend a class token (the sink head's target)."""
    registers: int = 0
    """Register tokens (the first one is the sink without a class token)."""
    n_directional: int = 2
    """Directional sender heads; their offsets are distinct neighbour offsets drawn by ``seed``."""
    edges: tuple[str, ...] = ("q", "k", "v")
    """Causal edges to plant: ``k`` and ``q`` read the modular head, ``v`` reads the self head."""
    cls_edges: tuple[str, ...] = ()
    """Causal edges read at the class token (only ``k``: a class-token receiver reads the modular
    head's slice through K); need a class token."""
    inert_decoys: tuple[str, ...] = ("k",)
    """Inert decoys to plant, by the input that reads the sink head's slice (weights compose, no effect)."""
    local_decoys: int = 1
    """Positional modular receivers that read content and no head's output (compose with nothing)."""
    content_dims: int = 8
    """Residual dims of the content code (even)."""
    content_scale: float = 0.01
    """Gain of the content code (as :data:`~vitcircuits.groundtruth.planted_circuits.CIRCUIT_CONFIG`)."""
    match_gain: float = 4.0
    """Expected logit bonus of a neighbour key in the content-matching receivers."""
    seed: int = 0
    """Seeds the head permutations, the offsets, the content projection and the filler weights."""
    silent_fillers: bool = False
    """The sender layer's fillers write nothing (zero ``W_V``: output and OV circuit exactly zero)."""
    heads_kept: int | None = None
    """Keep only this many heads per layer (module docstring); None keeps all ``n_heads``."""

    def __post_init__(self) -> None:
        rows, cols = self.grid
        if min(rows, cols) < MIN_GRID:
            raise ValueError(f"grid must be at least {MIN_GRID}x{MIN_GRID}, got {self.grid}")
        if not 0 <= self.sender_layer <= self.n_layers - 2:
            raise ValueError(f"sender_layer={self.sender_layer} needs 0 <= sender_layer <= n_layers - 2 (n_layers={self.n_layers})")
        for name in ("edges", "inert_decoys"):
            kinds = getattr(self, name)
            if set(kinds) - {"q", "k", "v"} or len(set(kinds)) != len(kinds):
                raise ValueError(f"{name} must be distinct kinds among q, k, v, got {kinds}")
        if set(self.cls_edges) - set(CLS_EDGE_RECEIVERS) or len(set(self.cls_edges)) != len(self.cls_edges):
            raise ValueError(f"cls_edges must be distinct kinds among {tuple(CLS_EDGE_RECEIVERS)}, got {self.cls_edges}")
        if self.cls_edges and not self.class_token:
            raise ValueError(f"cls_edges={self.cls_edges} are read at the class token: they need class_token=True")
        if not 0 <= self.n_directional <= len(NEIGHBOUR_OFFSETS):
            raise ValueError(f"n_directional must be in [0, {len(NEIGHBOUR_OFFSETS)}], got {self.n_directional}")
        prefix = int(self.class_token) + self.registers
        if prefix < 1 or prefix > MAX_PREFIX_SHARE * rows * cols:
            raise ValueError(f"need 1 to {int(MAX_PREFIX_SHARE * rows * cols)} prefix tokens (class token + registers), got {prefix}")
        if self.n_heads < max(4 + self.n_directional, len(self.receiver_roles)):
            raise ValueError(f"n_heads={self.n_heads} is fewer than the {4 + self.n_directional} sender kinds "
                             f"or the {len(self.receiver_roles)} receiver roles")
        edge_roles = [role for role in self.receiver_roles if role in EDGE_OF_ROLE]
        needed = max(1, len({EDGE_OF_ROLE[role][0] for role in edge_roles}), len(edge_roles))
        if self.heads_kept is not None and not needed <= self.heads_kept <= self.n_heads:
            raise ValueError(f"heads_kept={self.heads_kept} must be in [{needed}, n_heads={self.n_heads}]: the planted edges "
                             f"{(*self.edges, *self.cls_edges)} need {needed} heads in one layer")
        if self.silent_fillers and min(self.n_heads, self.heads_kept or self.n_heads) <= 4 + self.n_directional:
            raise ValueError(f"silent_fillers needs a filler in the sender layer: more than {4 + self.n_directional} heads (kept)")

    @property
    def receiver_roles(self) -> tuple[str, ...]:
        """Roles planted in the receiver layer (before the seeded permutation)."""
        return (*[EDGE_RECEIVERS[k] for k in self.edges], *[CLS_EDGE_RECEIVERS[k] for k in self.cls_edges],
                *[LOCAL_DECOY] * self.local_decoys, *[INERT_RECEIVERS[k] for k in self.inert_decoys])

    @property
    def receiver_layer(self) -> int:
        return self.sender_layer + 1


@dataclass(frozen=True)
class FamilyMember:
    """A planted-circuit model of the family with its ground truth (fields as
    :class:`~vitcircuits.groundtruth.planted_circuits.PlantedCircuitModel`, keyed by the final layers and heads)."""

    model: HookedViT
    config: FamilyConfig
    planted_config: PlantedConfig
    """The shape it was built with (``d_model``, ``n_tokens``...)."""
    truth_heads: dict[tuple[int, int], str]
    """``(layer, head) -> kind`` of every head that attends by position alone (senders and positional receivers)."""
    head_roles: dict[tuple[int, int], str]
    """Every head's role: a sender kind, a receiver role or :data:`FILLER`."""
    unscored_heads: frozenset[tuple[int, int]]
    """Heads whose attention depends on content: no kind truth."""
    edges: dict[tuple[int, int, int, int], str]
    """``(sender_layer, sender_head, receiver_layer, receiver_head) -> 'q' | 'k' | 'v'``, causal edges."""
    decoy_edges: dict[tuple[int, int, int, int], str]
    """Same keys and values: weights compose, no causal effect."""
    receivers: list[tuple[int, int]]
    """Every planted receiver-layer head, in head order."""
    roles: dict[tuple[int, int], str]
    """Receiver ``(layer, head)`` -> role."""
    offsets: dict[tuple[int, int], tuple[int, int]] = field(default_factory=dict)
    """``(layer, head) -> (dy, dx)`` of every directional head (senders and the V receiver)."""
    target_masks: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)
    """``[N, N]`` bool ``[query, key]`` targets of every positional head."""
    kept_heads: tuple[tuple[int, ...], ...] = ()
    """Per layer, the head of the full-width member that each head of a narrow member is (whose slice
    it writes); empty when every head was kept."""

    @property
    def layout(self) -> TokenLayout:
        return self.model.layout

    @property
    def sender_layer(self) -> int:
        return self.config.sender_layer

    @property
    def receiver_layer(self) -> int:
        return self.config.receiver_layer

    def kind_truth(self, layer: int, head: int) -> str | None:
        """The head's true kind, :data:`OTHER`, or None when it is unscored."""
        if (layer, head) in self.unscored_heads:
            return None
        return self.truth_heads.get((layer, head), OTHER)

    def out_slice(self, layer: int, head: int) -> slice:
        """Residual dims that head ``(layer, head)`` writes (and nothing else writes)."""
        cfg = self.planted_config
        built = self.kept_heads[layer][head] if self.kept_heads else head
        start = cfg.n_tokens + cfg.content_dims * (1 + layer * cfg.n_heads + built)
        return slice(start, start + cfg.content_dims)

    @property
    def content_slice(self) -> slice:
        return slice(self.planted_config.n_tokens, self.planted_config.n_tokens + self.planted_config.content_dims)

    def receiver(self, role: str) -> tuple[int, int]:
        """``(layer, head)`` of the receiver with ``role`` (which must be unique)."""
        (head,) = [key for key, value in self.roles.items() if value == role]
        return head


def build_family_member(config: FamilyConfig) -> FamilyMember:
    """The planted model of ``config`` (module docstring) with its ground truth."""
    rng = np.random.default_rng(config.seed)
    offsets = tuple(NEIGHBOUR_OFFSETS[i] for i in rng.choice(len(NEIGHBOUR_OFFSETS), config.n_directional, replace=False))
    v_offset = NEIGHBOUR_OFFSETS[int(rng.integers(len(NEIGHBOUR_OFFSETS)))]
    planted_cfg = PlantedConfig(
        grid=config.grid, patch_size=config.patch_size, n_layers=config.n_layers, n_heads=config.n_heads, offsets=offsets,
        class_token=config.class_token, registers=config.registers, content_dims=config.content_dims,
        content_scale=config.content_scale, seed=config.seed,
    )
    built = build_planted_circuits(planted_cfg, config.match_gain, roles=config.receiver_roles, v_offset=v_offset)
    L, H, s = config.n_layers, config.n_heads, config.sender_layer
    fillers = list(range(2, L))
    order = fillers[:s] + [0, 1] + fillers[s:]  # new layer b is built layer order[b]
    # new head h of layer b is built head perms[b][h]: roles are shuffled in the sender and receiver layers
    perms = [rng.permutation(H).tolist() if old in (0, 1) else list(range(H)) for old in order]
    where = {(old, perms[new][h]): (new, h) for new, old in enumerate(order) for h in range(H)}
    member = FamilyMember(model=built.model, config=config, planted_config=planted_cfg, truth_heads={}, head_roles={},
                          unscored_heads=frozenset(), edges={}, decoy_edges={}, receivers=[], roles={})
    _rearrange(built.model, member.out_slice, order, perms)
    head_roles = {(layer, head): FILLER for layer in range(L) for head in range(H)}
    head_roles.update({where[head]: kind for head, kind in built.truth_heads.items()})
    head_roles.update({where[head]: role for head, role in built.roles.items()})
    D, Dh, heads_start = planted_cfg.d_model, built.model.cfg.d_head, member.content_slice.stop
    with torch.no_grad():
        ln0 = built.model.blocks[s].ln1
        for layer, block in enumerate(built.model.blocks):
            block.ln1.weight.copy_(ln0.weight)
            block.ln1.bias.copy_(ln0.bias)
            W_3HdD = block.attn.qkv.weight.view(3, H, Dh, D)
            for head in range(H):
                if head_roles[(layer, head)] == FILLER:  # fillers read positions and content, no head's output
                    W_3HdD[:, head, :, heads_start:] = 0.0
                    if config.silent_fillers and layer == s:
                        W_3HdD[2, head] = 0.0

    def moved(edges: dict) -> dict:
        return {(*where[(sl, sh)], *where[(rl, rh)]): kind for (sl, sh, rl, rh), kind in edges.items()}

    roles = {where[head]: role for head, role in built.roles.items()}
    truth = {where[head]: kind for head, kind in built.truth_heads.items()}
    truth.update({head: POSITIONAL_RECEIVER_KINDS[role] for head, role in roles.items() if role in POSITIONAL_RECEIVER_KINDS})
    offsets_out = {where[head]: offset for head, offset in built.planted.offsets.items()}
    offsets_out.update({head: v_offset for head, role in roles.items() if role == V_RECEIVER})
    masks = {where[head]: mask for head, mask in {**built.planted.target_masks, **built.receiver_masks}.items()}
    member = replace(
        member, truth_heads=dict(sorted(truth.items())), head_roles=head_roles,
        unscored_heads=frozenset(head for head, role in roles.items() if role in CONTENT_RECEIVERS),
        edges=moved(built.edges), decoy_edges=moved(built.decoy_edges), receivers=sorted(roles), roles=dict(sorted(roles.items())),
        offsets=offsets_out, target_masks=masks,
    )
    if config.heads_kept is None:
        return member
    built_head = {new: old for old, new in where.items()}
    return _narrow(member, config.heads_kept, lambda layer, head: built_head[(layer, head)][1])


def _narrow(member: FamilyMember, n_kept: int, built_head: Callable[[int, int], int]) -> FamilyMember:
    """``member`` with ``n_kept`` heads per layer (module docstring); ``built_head(layer, head)`` is
    the head's index before the permutation, which orders heads of equal priority."""
    causal, decoy = (set(chain.from_iterable((key[:2], key[2:]) for key in edges)) for edges in (member.edges, member.decoy_edges))

    def priority(layer: int, head: int) -> tuple[int, int]:
        key = (layer, head)
        rank = 0 if key in causal else 1 if key in decoy else 2 if member.head_roles[key] != FILLER else 3
        return rank, built_head(layer, head)

    def kept_in(layer: int) -> tuple[int, ...]:
        first = sorted(range(member.model.cfg.n_heads), key=lambda head: priority(layer, head))[:n_kept]
        return tuple(sorted(first))

    kept = tuple(kept_in(layer) for layer in range(member.model.cfg.n_layers))
    new = {(layer, head): (layer, i) for layer, heads in enumerate(kept) for i, head in enumerate(heads)}

    def by_head(table: dict) -> dict:
        return {new[key]: value for key, value in table.items() if key in new}

    def by_edge(table: dict) -> dict:
        return {(*new[key[:2]], *new[key[2:]]): kind for key, kind in table.items() if key[:2] in new and key[2:] in new}

    roles = by_head(member.roles)
    return replace(
        member, model=_keep_heads(member.model, kept), truth_heads=by_head(member.truth_heads), head_roles=by_head(member.head_roles),
        unscored_heads=frozenset(new[key] for key in member.unscored_heads if key in new), edges=by_edge(member.edges),
        decoy_edges=by_edge(member.decoy_edges), receivers=sorted(roles), roles=roles, offsets=by_head(member.offsets),
        target_masks=by_head(member.target_masks), kept_heads=kept,
    )


def family(seeds, base_config: FamilyConfig = FamilyConfig()) -> list[FamilyMember]:
    """One member per seed, all of ``base_config``'s shape."""
    return [build_family_member(replace(base_config, seed=int(seed))) for seed in seeds]


@torch.no_grad()
def _keep_heads(model: HookedViT, kept: tuple[tuple[int, ...], ...]) -> HookedViT:
    """A copy of ``model`` with only heads ``kept[layer]`` of every layer (same ``d_head`` and ``d_model``)."""
    narrow = HookedViT(replace(model.cfg, n_heads=len(kept[0]))).eval()
    state = {}
    for name, value in model.state_dict().items():
        if name.startswith("blocks."):
            _, block, rest = name.split(".", 2)
            value = _select_heads(rest, value, torch.as_tensor(kept[int(block)]), model.cfg)
        state[name] = value.clone()
    narrow.load_state_dict(state)
    return narrow


def _select_heads(rest: str, value: torch.Tensor, heads: torch.Tensor, cfg: ViTConfig) -> torch.Tensor:
    """Block parameter ``rest`` restricted to (and ordered as) ``heads``: rows of the ``[3, H, Dh, D]``
    qkv weight (and its bias), columns of the ``[D, H, Dh]`` output projection; others unchanged."""
    H, Dh, D = cfg.n_heads, cfg.d_head, cfg.d_model
    if rest == "attn.qkv.weight":
        return value.view(3, H, Dh, D)[:, heads].reshape(-1, D)
    if rest == "attn.qkv.bias":
        return value.view(3, H, Dh)[:, heads].reshape(-1)
    if rest == "attn.proj.weight":
        return value.view(D, H, Dh)[:, heads].reshape(D, -1)
    return value


_READS = ("attn.qkv.weight", "mlp.fc1.weight")
_WRITES = ("attn.proj.weight", "mlp.fc2.weight", "embed.proj.weight")
_TOKENS = ("cls_token", "dist_token", "reg_tokens", "pos_embed")


def _residual_axes(name: str, value: torch.Tensor, D: int) -> list[int]:
    """Axes of a parameter that index residual dims."""
    if name.endswith(_READS):
        return [1]
    if name.endswith(_WRITES) or (value.ndim == 1 and value.shape[0] == D and not name.endswith(("qkv.bias", "fc1.bias"))):
        return [0]
    if name in _TOKENS:
        return [value.ndim - 1]
    if D in value.shape:
        raise ValueError(f"do not know whether {name} {tuple(value.shape)} reads the residual stream")
    return []


@torch.no_grad()
def _rearrange(model: HookedViT, out_slice: Callable[[int, int], slice], order: list[int], perms: list[list[int]]) -> None:
    """Reorder ``model``'s blocks (new block ``b`` = old ``order[b]``) and heads (new head ``h`` of
    block ``b`` = old ``perms[b][h]``), moving each head's output slice (``out_slice(layer, head)``) with it."""
    D = model.cfg.d_model
    dims = torch.arange(D)
    source = dims.clone()
    for new, old in enumerate(order):
        for h, old_h in enumerate(perms[new]):
            source[out_slice(new, h)] = dims[out_slice(old, old_h)]
    old_state = {name: value.clone() for name, value in model.state_dict().items()}
    new_state = {}
    for name, value in old_state.items():
        if name.startswith("blocks."):
            _, block, rest = name.split(".", 2)
            value = _select_heads(rest, old_state[f"blocks.{order[int(block)]}.{rest}"], torch.as_tensor(perms[int(block)]), model.cfg)
        for axis in _residual_axes(name, value, D):
            value = value.index_select(axis, source)
        new_state[name] = value
    model.load_state_dict(new_state)
