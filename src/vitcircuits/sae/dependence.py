"""Does an SAE feature need its neighbouring patches *and* the modular → composition circuit?

For each analysed feature, on its own top-activating patches (from :class:`FeatureStats`), the
feature's activation at the example's patch token is recomputed under five interventions, each a
batched forward pass in which every example has its own image:

* **circuit**: the circuit heads (senders and receivers of supported circuits at or before the
  hook's layer) ablated at every position (``ablated_z`` with :attr:`DependenceConfig.ablation`,
  dataset mean by default); **control**: as many random heads, drawn per layer from the same
  layers minus the circuit heads, ``n_control_draws`` seeded draws averaged;
* **neighbours occluded**: the patches at Chebyshev distance ``1..radius`` set to 0 in the
  preprocessed image (the dataset mean colour after normalisation);
* **neighbours shuffled**: each neighbour patch replaced by a patch of the same image from a random
  position at Chebyshev distance ``> radius + 1`` from the example's patch (seeded);
* **centre occluded**: only the example's own patch set to 0.

``drop = mean over examples of (clean - variant) / clean`` over examples whose recomputed clean
activation is positive; it is at most 1 (SAE activations are non-negative) and negative when the
intervention raises the feature. ``circuit_excess = drop_circuit - drop_control``.

Compositional score (every term clipped to [0, 1])::

    neighbour_drop = max(drop_neighbours_occluded, drop_neighbours_shuffled)
    need           = min(neighbour_drop, circuit_excess)      # neighbour_drop alone without circuit heads
    score          = need * (1 - max(0, drop_centre - neighbour_drop))

``need`` is high only when the feature loses its activation both without its neighbours' content
(either removal counts: occlusion is off-distribution, shuffling keeps natural patch statistics)
and without the circuit beyond random heads of the same layers. The factor penalises features
that depend on their own patch much more than on the neighbours (a local feature whose neighbours
matter a little), while a feature that needs the centre and the neighbours alike keeps its score.
``compositional`` applies the thresholds of :class:`DependenceConfig` to the same quantities.
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from rich.progress import Progress

from vitcircuits.composition.ablation import AblationKind, ZStats, ablated_z
from vitcircuits.models.hooked_vit import HookedViT
from vitcircuits.sae.features import FeatureStats
from vitcircuits.sae.model import SAE

Head = tuple[int, int]
Example = tuple[int, int, int, int]
"""``(feature, image, row, col)``."""
VARIANTS = ("clean", "circuit", "control", "neighbours_occluded", "neighbours_shuffled", "centre")


@dataclass(frozen=True)
class DependenceConfig:
    """Settings and thresholds of :func:`circuit_dependence` (score and thresholds: module docstring)."""

    n_features: int = 64
    """Features analysed when none are given: the alive ones with the highest mean top activation."""
    n_examples: int = 8
    """Top-activating examples per feature."""
    radius: int = 1
    """Neighbourhood: patches at Chebyshev distance ``1..radius`` from the example's patch."""
    n_control_draws: int = 4
    """Random control head sets, averaged."""
    ablation: AblationKind = "mean"
    """How an ablated head's ``z`` is replaced (see :func:`vitcircuits.composition.ablation.ablated_z`)."""
    seed: int = 0
    """Seeds the control draws, the neighbour shuffles and resample ablation."""
    batch_size: int = 64
    """Examples per forward pass."""
    min_neighbour_drop: float = 0.5
    """``compositional`` needs ``neighbour_drop`` at least this: losing the neighbours removes half the activation."""
    min_circuit_excess: float = 0.25
    """``compositional`` needs the circuit ablation to remove at least this much more than random heads."""
    max_centre_dominance: float = 0.5
    """``compositional`` needs ``drop_centre - neighbour_drop`` at most this (not mainly a single-patch feature)."""

    def __post_init__(self) -> None:
        for name in ("n_examples", "radius", "n_control_draws", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")


def circuit_heads_from(circuits: Iterable[dict], max_layer: int, verdicts: tuple[str, ...] = ("supported",)) -> list[Head]:
    """Sorted distinct senders and receivers at layers ``<= max_layer`` of the circuits whose verdict is in ``verdicts``."""
    heads = {(int(layer), int(head)) for c in circuits if c["verdict"] in verdicts for layer, head in [*c["senders"], *c["receivers"]]}
    return sorted(h for h in heads if h[0] <= max_layer)


def select_features(stats: FeatureStats, n: int) -> list[int]:
    """The ``n`` alive features with the highest mean top activation (over their valid top examples)."""
    valid_FT = stats.top_image_FT >= 0
    mean_top_F = (stats.top_value_FT * valid_FT).sum(1) / valid_FT.sum(1).clamp_min(1)
    alive = torch.nonzero(valid_FT.any(1)).flatten()
    order = mean_top_F[alive].argsort(descending=True, stable=True)
    return alive[order][:n].tolist()


def neighbour_positions(row: int, col: int, grid: tuple[int, int], radius: int) -> list[tuple[int, int]]:
    """Grid positions at Chebyshev distance ``1..radius`` from ``(row, col)``, inside the grid."""
    R, C = grid
    return [(r, c) for r in range(max(row - radius, 0), min(row + radius + 1, R))
            for c in range(max(col - radius, 0), min(col + radius + 1, C)) if (r, c) != (row, col)]


def occlude_patches(image_CHW: torch.Tensor, positions: Iterable[tuple[int, int]], patch_size: tuple[int, int]) -> torch.Tensor:
    """A copy of a preprocessed image with the patches at ``positions`` set to 0 (the mean colour)."""
    ph, pw = patch_size
    out_CHW = image_CHW.clone()
    for r, c in positions:
        out_CHW[:, r * ph : (r + 1) * ph, c * pw : (c + 1) * pw] = 0.0
    return out_CHW


def shuffle_neighbours(image_CHW: torch.Tensor, row: int, col: int, grid: tuple[int, int], patch_size: tuple[int, int],
                       radius: int, generator: torch.Generator) -> torch.Tensor:
    """A copy of the image whose neighbour patches (distance ``1..radius``) are each replaced by the patch
    at a random position at Chebyshev distance ``> radius + 1`` from ``(row, col)`` (distinct sources while
    there are enough of them)."""
    R, C = grid
    ph, pw = patch_size
    far = [(r, c) for r in range(R) for c in range(C) if max(abs(r - row), abs(c - col)) > radius + 1]
    if not far:
        raise ValueError(f"no patch of the {R}x{C} grid is farther than {radius + 1} from ({row}, {col}); lower the radius")
    targets = neighbour_positions(row, col, grid, radius)
    order = torch.randperm(len(far), generator=generator).tolist()
    out_CHW = image_CHW.clone()
    for i, (r, c) in enumerate(targets):
        sr, sc = far[order[i % len(far)]]
        out_CHW[:, r * ph : (r + 1) * ph, c * pw : (c + 1) * pw] = image_CHW[:, sr * ph : (sr + 1) * ph, sc * pw : (sc + 1) * pw]
    return out_CHW


def control_head_sets(circuit_heads: list[Head], n_heads: int, n_draws: int, generator: torch.Generator) -> list[list[Head]]:
    """``n_draws`` random head sets with as many heads per layer as ``circuit_heads`` (fewer where the layer
    has fewer non-circuit heads), drawn from that layer's heads outside the circuit."""
    per_layer: dict[int, int] = defaultdict(int)
    for layer, _ in circuit_heads:
        per_layer[layer] += 1
    draws = []
    for _ in range(n_draws):
        heads = []
        for layer, count in sorted(per_layer.items()):
            pool = [h for h in range(n_heads) if (layer, h) not in circuit_heads]
            heads += [(layer, pool[i]) for i in torch.randperm(len(pool), generator=generator)[:count].tolist()]
        draws.append(heads)
    return draws


def hook_layer(hook_name: str) -> int | None:
    """Block index of a ``blocks.L.…`` hook, ``None`` for hooks outside the blocks."""
    parts = hook_name.split(".")
    return int(parts[1]) if parts[0] == "blocks" else None


@torch.no_grad()
def feature_activations(model: HookedViT, sae: SAE, hook_name: str, images_BCHW: torch.Tensor, tokens_B: torch.Tensor, features_B: torch.Tensor,
                        ablate: Sequence[Head] = (), zstats: ZStats | None = None, ablation: AblationKind = "mean",
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """Activation of feature ``features_B[b]`` at token ``tokens_B[b]`` of image ``b`` at ``hook_name``, with the
    heads in ``ablate`` ablated at every position; ``[B]``. Runs only the blocks up to the hook's."""
    by_layer: dict[int, list[int]] = defaultdict(list)
    for layer, head in ablate:
        by_layer[layer].append(head)

    def ablate_fn(layer: int) -> Callable:
        def fn(z_BNHd: torch.Tensor, hook) -> torch.Tensor:
            z_BNHd = z_BNHd.clone()
            for head in by_layer[layer]:
                z_BNHd[:, :, head] = ablated_z(ablation, z_BNHd[:, :, head], layer, head, zstats, generator)
            return z_BNHd
        return fn

    captured = {}

    def capture(acts: torch.Tensor, hook) -> None:
        captured["acts"] = acts

    hooks = [(f"blocks.{layer}.attn.hook_z", ablate_fn(layer)) for layer in by_layer] + [(hook_name, capture)]
    layer = hook_layer(hook_name)
    with model.hooks(hooks):
        model(images_BCHW.to(model.device, model.dtype), stop_at_layer=None if layer is None else layer + 1)
    acts = captured["acts"]
    B = acts.shape[0]
    acts_BD = acts[torch.arange(B), tokens_B.to(acts.device)].reshape(B, -1)
    feats_BF = sae.encode(acts_BD.to(sae.W_enc.device, sae.W_enc.dtype))
    return feats_BF[torch.arange(B), features_B.to(feats_BF.device)].float().cpu()


def compositional_score(neighbour_drop: float, circuit_excess: float | None, drop_centre: float) -> float:
    """The score of the module docstring; ``circuit_excess=None`` (no circuit heads) uses the neighbours only."""
    clip = lambda v: min(max(v, 0.0), 1.0)
    n = clip(neighbour_drop)
    need = n if circuit_excess is None else min(n, clip(circuit_excess))
    return need * (1.0 - clip(drop_centre - n))


def _variant_images(images_BCHW: torch.Tensor, examples: list[Example], grid: tuple[int, int], patch_size: tuple[int, int],
                    radius: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    occluded, shuffled, centre = [], [], []
    for image_CHW, (_, _, r, c) in zip(images_BCHW, examples):
        occluded.append(occlude_patches(image_CHW, neighbour_positions(r, c, grid, radius), patch_size))
        shuffled.append(shuffle_neighbours(image_CHW, r, c, grid, patch_size, radius, generator))
        centre.append(occlude_patches(image_CHW, [(r, c)], patch_size))
    return {"neighbours_occluded": torch.stack(occluded), "neighbours_shuffled": torch.stack(shuffled), "centre": torch.stack(centre)}


def _row(feature: int, stats: FeatureStats, acts: dict[str, torch.Tensor], circuit_tested: bool, config: DependenceConfig) -> dict:
    clean_E = acts["clean"]
    ok_E = clean_E > 0
    n = int(ok_E.sum())
    drop = {name: float(((clean_E - a_E)[ok_E] / clean_E[ok_E]).mean()) if n else None for name, a_E in acts.items() if name != "clean"}
    measured = circuit_tested and n > 0
    row = {"feature": feature, "density": float(stats.density_F[feature]), "n_examples": n,
           "act_clean": float(clean_E[ok_E].mean()) if n else 0.0, "circuit_tested": circuit_tested,
           "drop_circuit": drop.get("circuit"), "drop_control": drop.get("control"),
           "circuit_excess": drop["circuit"] - drop["control"] if measured else None,
           "drop_neighbours_occluded": drop["neighbours_occluded"], "drop_neighbours_shuffled": drop["neighbours_shuffled"],
           "drop_centre": drop["centre"]}
    if not n:  # no example reproduced a positive activation: nothing was measured
        return row | {"neighbour_drop": None, "compositional_score": 0.0, "compositional": False}
    neighbour = max(drop["neighbours_occluded"], drop["neighbours_shuffled"])
    excess = row["circuit_excess"]
    return row | {
        "neighbour_drop": neighbour,
        "compositional_score": compositional_score(neighbour, excess, drop["centre"]),
        "compositional": (neighbour >= config.min_neighbour_drop and (excess is None or excess >= config.min_circuit_excess)
                          and drop["centre"] - neighbour <= config.max_centre_dominance),
    }


def circuit_dependence(model: HookedViT, sae: SAE, hook_name: str, load_images: Callable[[list[int]], torch.Tensor], stats: FeatureStats,
                       circuit_heads: list[Head], zstats: ZStats | None, config: DependenceConfig = DependenceConfig(),
                       features: list[int] | None = None, progress: bool = False) -> list[dict]:
    """One row per analysed feature, sorted by ``compositional_score`` descending: ``feature``, ``density``,
    ``n_examples`` (examples with a positive recomputed clean activation), ``act_clean`` (their mean),
    ``circuit_tested``, ``drop_circuit``, ``drop_control``, ``circuit_excess``, ``drop_neighbours_occluded``,
    ``drop_neighbours_shuffled``, ``drop_centre``, ``neighbour_drop``, ``compositional_score`` and
    ``compositional`` (definitions in the module docstring; drops are ``None`` when ``n_examples`` is 0).

    ``load_images(indices)`` returns the preprocessed images ``[B, 3, H, W]`` of those image-list indices (the
    indices of ``stats``). ``features`` defaults to :func:`select_features`. Without ``circuit_heads`` the circuit
    fields are ``None`` and ``circuit_tested`` is false. ``zstats`` is needed by the mean ablations.
    """
    if circuit_heads and zstats is None and config.ablation in ("mean", "position_mean"):
        raise ValueError(f"{config.ablation} ablation needs zstats")
    layer = hook_layer(hook_name)
    if layer is not None and any(h[0] > layer for h in circuit_heads):
        raise ValueError(f"circuit heads after the hook's layer {layer} cannot change {hook_name}: {circuit_heads}")
    features = select_features(stats, config.n_features) if features is None else list(features)
    examples = [(f, i, r, c) for f in features for i, r, c, _ in stats.examples(f, config.n_examples)]
    generator = torch.Generator().manual_seed(config.seed)
    controls = control_head_sets(circuit_heads, model.cfg.n_heads, config.n_control_draws, generator) if circuit_heads else []
    patch_size, grid, start = tuple(model.cfg.patch_size), (model.layout.rows, model.layout.cols), model.layout.patch_start
    variants = VARIANTS if circuit_heads else tuple(v for v in VARIANTS if v not in ("circuit", "control"))
    acts: dict[str, list[torch.Tensor]] = {name: [] for name in variants}
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("circuit dependence", total=len(examples))
        for lo in range(0, len(examples), config.batch_size):
            batch = examples[lo : lo + config.batch_size]
            unique = sorted({e[1] for e in batch})
            loaded_UCHW = load_images(unique)
            images_BCHW = loaded_UCHW[[unique.index(e[1]) for e in batch]]
            tokens_B = torch.tensor([start + r * grid[1] + c for _, _, r, c in batch])
            features_B = torch.tensor([e[0] for e in batch])
            run = lambda x, heads=(): feature_activations(model, sae, hook_name, x, tokens_B, features_B, heads, zstats, config.ablation, generator)
            acts["clean"].append(run(images_BCHW))
            if circuit_heads:
                acts["circuit"].append(run(images_BCHW, circuit_heads))
                acts["control"].append(torch.stack([run(images_BCHW, heads) for heads in controls]).mean(0))
            for name, x in _variant_images(images_BCHW, batch, grid, patch_size, config.radius, generator).items():
                acts[name].append(run(x))
            bar.advance(task, len(batch))
    acts_V = {name: torch.cat(values) if values else torch.zeros(0) for name, values in acts.items()}
    feature_E = torch.tensor([e[0] for e in examples], dtype=torch.long)
    rows = [_row(f, stats, {name: a[feature_E == f] for name, a in acts_V.items()}, bool(circuit_heads), config) for f in features]
    return sorted(rows, key=lambda r: -r["compositional_score"])
