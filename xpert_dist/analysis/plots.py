"""PNG figures of the shift analysis: layer x module heat maps (one panel per compared pair) and
per-layer curves. Same conventions as ``xpert_dist.report.plots`` (matplotlib object API on an Agg
canvas, atomic writes, ``save_png``); panel figures grow with the number of panels and layers.
"""
from __future__ import annotations

import math
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from ..report.plots import DPI, FIG_INCHES, save_png
from .metrics import grid


def figure(width: float = FIG_INCHES[0], height: float = FIG_INCHES[1]) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _finite(values) -> list[float]:
    return [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]


def heatmap_panels(panels: dict[str, dict[str, float]], path: str | Path, title: str, *,
                   label: str = "", vmin: float | None = None, vmax: float | None = None,
                   cmap: str = "viridis", annotate: bool | None = None,
                   size: tuple[float, float] | None = None) -> Path | None:
    """One layer x module heat map per panel (per-matrix values keyed by full module names), a shared
    colour scale (``vmin``/``vmax`` default to the data's range) and one colour bar. ``size`` (inches)
    fixes the figure size; by default it grows with the panels and layers."""
    grids = {name: grid(vals) for name, vals in panels.items() if vals}
    grids = {name: g for name, g in grids.items() if g[0]}
    if not grids:
        return None
    allv = _finite(v for _, _, g in grids.values() for row in g for v in row)
    lo = min(allv) if vmin is None else vmin
    hi = max(allv) if vmax is None else vmax
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    n = len(grids)
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    n_layers = max(len(g[0]) for g in grids.values())
    fig = figure(*size) if size else figure(max(FIG_INCHES[0], 2.6 * cols + 1.2), max(3.2, rows * (1.2 + 0.16 * n_layers)))
    image = None
    for k, (name, (layers, modules, g)) in enumerate(grids.items()):
        ax = fig.add_subplot(rows, cols, k + 1)
        image = ax.imshow(g, aspect="auto", cmap=cmap, vmin=lo, vmax=hi, interpolation="nearest")
        ax.set_xticks(range(len(modules)), [m.replace("_proj", "") for m in modules], rotation=45, fontsize=7)
        step = max(1, len(layers) // 12)
        ax.set_yticks(range(0, len(layers), step), [str(x) for x in layers[::step]], fontsize=7)
        ax.set_title(name, fontsize=8)
        if k % cols == 0:
            ax.set_ylabel("layer", fontsize=8)
        if annotate if annotate is not None else len(layers) * len(modules) <= 40:
            for i, row in enumerate(g):
                for j, v in enumerate(row):
                    if not math.isnan(v):
                        ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6,
                                color="white" if v < (lo + hi) / 2 else "black")
    fig.colorbar(image, ax=fig.axes, label=label, shrink=0.9)
    fig.suptitle(title, fontsize=10)
    return save_png(fig, path)


def layer_curves(panels: dict[str, dict[str, tuple[list[int], list[float]]]], path: str | Path, title: str, *,
                 ylabel: str = "", hlines: dict[str, float] | None = None,
                 ylim: tuple[float, float] | None = None) -> Path | None:
    """One panel per entry of ``panels``; in it one line per label: value against layer index.
    ``hlines``: labelled dashed horizontal reference lines drawn in every panel."""
    panels = {p: {k: v for k, v in lines.items() if v[0]} for p, lines in panels.items()}
    panels = {p: lines for p, lines in panels.items() if lines}
    if not panels:
        return None
    ys = _finite(y for lines in panels.values() for _, vals in lines.values() for y in vals)
    if ylim is None and ys:
        pad = 0.05 * max(1e-6, max(ys) - min(ys))
        ylim = (min(ys) - pad, max(ys) + pad)
    n = len(panels)
    cols = min(n, 2)
    rows = math.ceil(n / cols)
    fig = figure(FIG_INCHES[0] if cols == 1 else 11.0, max(FIG_INCHES[1], 3.4 * rows))
    for k, (pname, lines) in enumerate(panels.items()):
        ax = fig.add_subplot(rows, cols, k + 1)
        for label, (xs, ys) in lines.items():
            ax.plot(xs, ys, marker="o", markersize=2.5, linewidth=1.2, label=label)
        for label, y in (hlines or {}).items():
            if ylim is None or ylim[0] <= y <= ylim[1]:
                ax.axhline(y, color="grey", linestyle="--", linewidth=0.9, label=label)
            else:  # far outside the data: named in the legend instead of squashing the curves
                ax.plot([], [], " ", label=f"{label}: off scale")
        ax.set_title(pname, fontsize=9)
        ax.set_xlabel("layer", fontsize=8)
        ax.set_ylabel(ylabel, fontsize=8)
        if ylim:
            ax.set_ylim(*ylim)
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6)
    fig.suptitle(title, fontsize=10)
    return save_png(fig, path)
