"""PNG plots of stored run results (no recomputation): loss curves, per-layer sparsity, retention bars.

Figures are built with matplotlib's object API on an Agg canvas (no pyplot state, no display needed) and
always have the same pixel size, ``FIG_INCHES * DPI`` = 800 x 500 (no tight bbox). Every file is written
to a temporary name and renamed into place. Each function returns the path, or None when there was
nothing to plot.
"""
from __future__ import annotations

import io
import math
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .results import atomic_write_bytes, layer_means, sparsity_grid

FIG_INCHES = (8.0, 5.0)
DPI = 100
PIXELS = (int(FIG_INCHES[0] * DPI), int(FIG_INCHES[1] * DPI))  # (width, height)


def _figure() -> Figure:
    fig = Figure(figsize=FIG_INCHES, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_png(fig: Figure, path: str | Path) -> Path:
    """Render ``fig`` to PNG bytes and write them atomically to ``path``."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return atomic_write_bytes(path, buf.getvalue())


def ema_span(n_points: int) -> int:
    """Smoothing span of a loss curve of ``n_points``: a tenth of the curve, between 2 and 50 steps."""
    return max(2, min(50, n_points // 10))


def ema(values: list[float], span: int) -> list[float]:
    """Debiased exponential moving average, ``alpha = 2 / (span + 1)``: ``m_t = (1-alpha) m_{t-1} + alpha x_t``
    from ``m_0 = 0``, divided by ``1 - (1-alpha)^t`` (so the first point is ``x_1``, not pulled to 0)."""
    alpha = 2.0 / (span + 1.0)
    out, m = [], 0.0
    for t, x in enumerate(values, start=1):
        m = (1.0 - alpha) * m + alpha * x
        out.append(m / (1.0 - (1.0 - alpha) ** t))
    return out


def loss_figure(curves: dict[str, list], prune_steps: dict[str, list] | None = None,
                title: str = "Training loss") -> Figure | None:
    """Raw per-step loss (thin, faint) with its EMA (`ema`, span `ema_span`) over it, one colour per run;
    prune steps as dotted vertical lines in the run's colour."""
    curves = {name: pts for name, pts in curves.items() if pts}
    if not curves:
        return None
    fig = _figure()
    ax = fig.add_subplot()
    marked = False
    for name, pts in curves.items():
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        (raw,) = ax.plot(xs, ys, linewidth=0.8, alpha=0.35, label=f"{name} (per step)")
        span = ema_span(len(ys))
        ax.plot(xs, ema(ys, span), color=raw.get_color(), linewidth=1.8, label=f"{name} (EMA, span {span})")
        for step in (prune_steps or {}).get(name, []):
            ax.axvline(step, color=raw.get_color(), linestyle=":", linewidth=1.0, alpha=0.8,
                       label=None if marked else "prune step")
            marked = True
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def plot_loss(curves: dict[str, list], path: str | Path, prune_steps: dict[str, list] | None = None,
              title: str = "Training loss") -> Path | None:
    """`loss_figure` written as a PNG."""
    fig = loss_figure(curves, prune_steps, title)
    return None if fig is None else save_png(fig, path)


def plot_sparsity(sparsity: dict[str, float], path: str | Path, title: str = "Sparsity per layer and module"
                  ) -> Path | None:
    """Heatmap of the pruned fraction, layers as rows and module types as columns (blank: not reported)."""
    layers, modules, grid = sparsity_grid(sparsity)
    if not layers:
        return None
    fig = _figure()
    ax = fig.add_subplot()
    image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_xticks(range(len(modules)), modules, rotation=30, fontsize=8)
    step = max(1, len(layers) // 16)
    ax.set_yticks(range(0, len(layers), step), [str(layer) for layer in layers[::step]], fontsize=8)
    ax.set_xlabel("module")
    ax.set_ylabel("layer")
    ax.set_title(title)
    if len(layers) * len(modules) <= 64:
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                if not math.isnan(v):
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                            color="white" if v < 0.5 else "black")
    fig.colorbar(image, ax=ax, label="sparsity (pruned fraction)")
    return save_png(fig, path)


def plot_sparsity_profiles(runs: dict[str, dict[str, float]], path: str | Path,
                           title: str = "Mean sparsity per layer") -> Path | None:
    """One line per run: the unweighted mean sparsity of each layer's reported modules."""
    profiles = {name: layer_means(sp) for name, sp in runs.items()}
    profiles = {name: prof for name, prof in profiles.items() if prof[0]}
    if not profiles:
        return None
    fig = _figure()
    ax = fig.add_subplot()
    for name, (layers, means) in profiles.items():
        ax.plot(layers, means, marker="o", markersize=3, label=name)
    ax.set_xlabel("layer")
    ax.set_ylabel("mean sparsity")
    ax.set_ylim(0.0, 1.0)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_png(fig, path)


def plot_grouped_bars(values: dict[str, dict[str, float]], path: str | Path, title: str, ylabel: str,
                      reference_line: float | None = None, value_labels: str | None = None,
                      legend_below: bool = False) -> Path | None:
    """Bars grouped by metric (x axis), one bar per run; NaN/missing values leave a gap. ``value_labels``: a
    format spec (e.g. ``".1f"``) to print each bar's value above it; ``legend_below``: the legend under the
    axes instead of over the bars."""
    runs = [r for r, vals in values.items() if vals]
    metrics = list(dict.fromkeys(k for r in runs for k in values[r]))
    if not runs or not metrics:
        return None
    fig = _figure()
    ax = fig.add_subplot()
    width = 0.8 / len(runs)
    for i, run in enumerate(runs):
        xs = [m + (i - (len(runs) - 1) / 2) * width for m in range(len(metrics))]
        ys = [values[run].get(k, math.nan) for k in metrics]
        bars = ax.bar(xs, [0.0 if math.isnan(y) else y for y in ys], width=width * 0.95, label=run)
        if value_labels:
            ax.bar_label(bars, labels=["" if math.isnan(y) else format(y, value_labels) for y in ys], fontsize=6,
                         rotation=90, padding=2)
    if reference_line is not None:
        ax.axhline(reference_line, color="black", linestyle="--", linewidth=0.8)
    ax.set_xticks(range(len(metrics)), metrics, rotation=20, fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    if legend_below:
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=3)
    else:
        ax.legend(fontsize=8)
    if value_labels:
        ax.margins(y=0.12)
    return save_png(fig, path)


def plot_retention(retentions: dict[str, dict[str, float]], path: str | Path,
                   title: str = "Retention vs the dense model") -> Path | None:
    """Retention ratios per metric and run, with the dense level (1.0) dashed."""
    return plot_grouped_bars(retentions, path, title, "retention (1 = dense)", reference_line=1.0)


def plot_metric_panels(metrics: dict[str, dict[str, float]], path: str | Path, title: str = "Metrics"
                       ) -> Path | None:
    """One panel per metric (own y scale, perplexity and accuracies differ by orders), one bar per run."""
    runs = list(metrics)
    keys = list(dict.fromkeys(k for r in runs for k in metrics[r]))
    if not runs or not keys:
        return None
    fig = _figure()
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    for n, key in enumerate(keys):
        ax = fig.add_subplot(rows, cols, n + 1)
        ys = [metrics[r].get(key, math.nan) for r in runs]
        ax.bar(range(len(runs)), [0.0 if math.isnan(y) else y for y in ys],
               color=[f"C{i}" for i in range(len(runs))])
        ax.set_xticks(range(len(runs)), runs, rotation=30, fontsize=7)
        ax.set_title(key, fontsize=9)
        ax.tick_params(axis="y", labelsize=7)
    fig.suptitle(title)
    return save_png(fig, path)
