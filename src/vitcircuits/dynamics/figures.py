"""Formation figures: the key heads, the followed edges and the class groups against training step
on one log axis, with the fitted formation windows (95 % intervals of the crossing) shaded."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from vitcircuits.dynamics.formation import Formation, Metric
from vitcircuits.plotting.figures import plt, save_figure


def _shade(ax, metric: Metric | None, color: str, alpha: float = 0.15) -> None:
    if metric is not None and metric.crossing.lo is not None:
        ax.axvspan(metric.crossing.lo, metric.crossing.hi, color=color, alpha=alpha, lw=0)


def _mark(ax, metric: Metric, line) -> None:
    if metric.crossing.step is not None:
        ax.axvline(metric.crossing.step, color=line.get_color(), ls=":", lw=0.8)


def plot_formation(result: Formation, folder: Path) -> list[tuple[Path, str]]:
    """``formation.png`` (key heads, edges, group loss and accuracy on one step axis) and
    ``heads_all.png`` (every head's modular score); returns (path, caption) of each."""
    steps = result.steps_G
    circuit = next((m for m in result.metrics if m.kind == "circuit"), None)
    key_heads = [m for m in result.metrics if m.kind == "head" and m.key]
    edges = [m for m in result.metrics if m.kind == "edge"]
    groups = [m for m in result.metrics if m.kind == "group" and m.subject != "all"]
    panels = [("modular score (key heads)", [m for m in key_heads if m.name == "modular_score"]),
              ("neighbour mass (key heads)", [m for m in key_heads if m.name == "neighbour_mass"]),
              ("edge strength / its maximum", edges),
              ("test loss", [m for m in groups if m.name == "loss"]),
              ("test accuracy", [m for m in groups if m.name == "accuracy"])]
    panels = [(title, metrics) for title, metrics in panels if metrics]
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 2.2 * len(panels)), sharex=True, squeeze=False)
    colours = plt.get_cmap("tab10")
    for ax, (title, metrics) in zip(axes[:, 0], panels):
        _shade(ax, circuit, "grey")
        for i, m in enumerate(metrics):
            peak = np.abs(m.curve_G).max()
            values = m.curve_G / peak if m.kind == "edge" and peak > 0 else m.curve_G
            style = "-" if m.key or m.kind != "edge" else "--"
            (line,) = ax.plot(steps, values, style, marker=".", ms=3, color=colours(i % 10), label=m.subject)
            _mark(ax, m, line)
            if m.kind == "group":
                _shade(ax, m, line.get_color(), 0.12)
        ax.set_xscale("log")
        ax.set_ylabel(title, fontsize=8)
        ax.legend(fontsize=6, ncol=4, loc="best")
    axes[-1, 0].set_xlabel("training step (log)")
    window = "" if circuit is None or circuit.crossing.lo is None else \
        f" Grey: the circuit's formation window ({circuit.crossing.lo:.0f}–{circuit.crossing.hi:.0f} steps, 95 % interval)."
    caption = ("Formation against training step: dotted lines mark each metric's half-way crossing; group windows are shaded in the "
               "group's colour; dashed edges are unsupported at the end." + window)
    paths = [(save_figure(fig, folder / "formation.png"), caption)]
    paths.append((_all_heads(result, folder / "heads_all.png"), "Every head's modular score against training step, one panel per layer."))
    return paths


def _all_heads(result: Formation, path: Path) -> Path:
    heads = [m for m in result.metrics if m.kind == "head" and m.name == "modular_score"]
    layers = sorted({m.extra["layer"] for m in heads})
    fig, axes = plt.subplots(1, len(layers), figsize=(3 * len(layers), 2.4), sharey=True, squeeze=False)
    for ax, layer in zip(axes[0], layers):
        for m in (m for m in heads if m.extra["layer"] == layer):
            ax.plot(result.steps_G, m.curve_G, lw=1.5 if m.key else 0.8, label=f"{m.subject} ({m.extra['final_kind']})")
        ax.set_xscale("log")
        ax.set_title(f"layer {layer}", fontsize=9)
        ax.legend(fontsize=5)
        ax.set_xlabel("step (log)", fontsize=8)
    axes[0, 0].set_ylabel("modular score")
    return save_figure(fig, path)
