"""Composition figures: sender × receiver heatmaps per kind, and the circuit graph."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from vitcircuits.composition.patching import METRICS, PATHS, VERDICT_METRIC
from vitcircuits.composition.scan import CompositionResult
from vitcircuits.plotting.figures import plt, save_figure

KIND_COLOURS = {"q": "#0072B2", "k": "#D55E00", "v": "#009E73"}


def plot_weight_heatmaps(result: CompositionResult, path: str | Path) -> Path:
    """Weight-score z of every (sender, later receiver) pair, one panel per kind; heads are
    ordered layer by layer, grey where the receiver is not later than the sender."""
    L, H = result.scores.q_LHLH.shape[:2]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.4))
    for ax, kind in zip(axes, PATHS):
        z = result.scores.z(kind).reshape(L * H, L * H)
        image = ax.imshow(np.ma.masked_invalid(z), cmap="PuOr_r", vmin=-6, vmax=6, interpolation="nearest")
        ax.set_facecolor("#dddddd")
        ticks = np.arange(0, L * H, H)
        ax.set_xticks(ticks, [f"L{layer}" for layer in range(L)], fontsize=7)
        ax.set_yticks(ticks, [f"L{layer}" for layer in range(L)], fontsize=7)
        ax.set_xlabel("receiver head")
        ax.set_ylabel("sender head")
        ax.set_title(f"{kind.upper()}-composition weight z", fontsize=9)
    fig.colorbar(image, ax=axes, shrink=0.8, label="z against random heads (clipped at ±6)")
    return save_figure(fig, path)


def plot_patch_heatmaps(result: CompositionResult, path: str | Path) -> Path:
    """Path-patching effect of each sender on each receiver at patch queries, per input (JS for
    q/k, relative output change for v)."""
    effects = result.effects["clean"]
    _, _, L, H, _ = effects.shape
    fig, axes = plt.subplots(1, 3, figsize=(13, min(0.35 * len(result.patched) + 1.6, 24)))
    for p, (ax, kind) in enumerate(zip(axes, PATHS)):
        metric = METRICS.index(VERDICT_METRIC[kind])
        values = effects[:, p, :, :, metric].reshape(len(result.patched), L * H)
        image = ax.imshow(values, cmap="cividis", aspect="auto", interpolation="nearest")
        ax.set_yticks(range(len(result.patched)), [f"L{layer}H{head}" for layer, head in result.patched], fontsize=6)
        ax.set_xticks(np.arange(0, L * H, H), [f"L{layer}" for layer in range(L)], fontsize=7)
        ax.set_xlabel("receiver head")
        ax.set_title(f"patch via {kind.upper()}: {'relative output change' if kind == 'v' else 'JS divergence'}", fontsize=9)
        fig.colorbar(image, ax=ax, shrink=0.8)
    return save_figure(fig, path)


def plot_circuit_graph(result: CompositionResult, path: str | Path, n_layers: int, n_heads: int) -> Path:
    """Heads by layer (x) and index (y); an arrow for every supported (solid) or weak (dashed)
    edge, coloured by kind, width by the drop of the task metric (relative to the largest)."""
    fig, ax = plt.subplots(figsize=(1.0 * n_layers + 2, 0.45 * n_heads + 1.5))
    xs, ys = np.meshgrid(np.arange(n_layers), np.arange(n_heads), indexing="ij")
    ax.scatter(xs.ravel(), ys.ravel(), s=40, color="#bbbbbb", zorder=2)
    shown = [c for c in result.circuits if c["verdict"] != "none"]
    drop = lambda c: max(c["evidence"]["matters"]["effect"], 0.0) if c["evidence"]["matters"] else 0.0  # noqa: E731
    largest = max([drop(c) for c in shown], default=0.0) or 1.0
    for c in shown:
        (sl, sh), (rl, rh) = c["senders"][0], c["receivers"][0]
        style = "-" if c["verdict"] == "supported" else "--"
        ax.annotate("", xy=(rl, rh), xytext=(sl, sh), arrowprops={
            "arrowstyle": "-|>", "color": KIND_COLOURS[c["kind"]], "linestyle": style,
            "linewidth": 0.8 + 4 * drop(c) / largest, "alpha": 0.9, "shrinkA": 4, "shrinkB": 4}, zorder=3)
    for kind, colour in KIND_COLOURS.items():
        ax.plot([], [], color=colour, label=f"{kind.upper()}-composition")
    ax.plot([], [], color="black", linestyle="--", label="weak (one line of evidence)")
    ax.set_xticks(range(n_layers))
    ax.set_yticks(range(n_heads))
    ax.set_xlabel("layer")
    ax.set_ylabel("head")
    ax.invert_yaxis()
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    ax.set_title("Edges that compose or matter (solid: both, supported)", fontsize=9)
    return save_figure(fig, path)
