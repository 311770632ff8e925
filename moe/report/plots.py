"""Matplotlib figures of routing: load per expert, load over training, expert x task / token-class heatmaps,
training curves. Shared by ``moe.callbacks.RoutingStatsCallback`` (as ``wandb.Image``) and ``moe.report`` (PNG).

Every function returns a ``matplotlib.figure.Figure`` made without pyplot's global state (safe in threads and
headless runs); the caller saves or logs it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def to_rgb(fig: Figure) -> np.ndarray:
    """The rendered figure as ``[H, W, 3]`` uint8 (what ``wandb.Image`` takes)."""
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def load_bars(load_E: Sequence[float], title: str) -> Figure:
    """Share of the routed slots per expert, with the uniform share as a dashed line."""
    load = np.asarray(load_E, dtype=float)
    share = load / max(load.sum(), 1e-12)
    fig = _figure(max(4.0, 0.25 * len(load) + 2), 3)
    ax = fig.add_subplot()
    ax.bar(np.arange(len(load)), share, color="tab:blue")
    ax.axhline(1 / len(load), color="k", linestyle="--", linewidth=1, label="uniform")
    ax.set(xlabel="expert", ylabel="share of routed slots", title=title)
    ax.legend(loc="upper right")
    return fig


def heatmap(matrix: np.ndarray, row_labels: Sequence[str], col_labels: Sequence[str], title: str,
            xlabel: str, ylabel: str, normalize: str | None = "cols") -> Figure:  # fmt: skip
    """``matrix [rows, cols]`` as an image; ``normalize="cols"`` shows each column as shares (sums to 1)."""
    m = np.asarray(matrix, dtype=float)
    if normalize == "cols":
        m = m / np.maximum(m.sum(0, keepdims=True), 1e-12)
    elif normalize == "rows":
        m = m / np.maximum(m.sum(1, keepdims=True), 1e-12)
    fig = _figure(max(4.0, 0.45 * len(col_labels) + 2.5), max(3.0, 0.3 * len(row_labels) + 1.5))
    ax = fig.add_subplot()
    image = ax.imshow(m, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xticks(np.arange(len(col_labels)), labels=list(col_labels), rotation=45, ha="right")
    step = max(1, len(row_labels) // 32)  # at most ~32 row labels
    ax.set_yticks(np.arange(0, len(row_labels), step), labels=list(row_labels)[::step])
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    fig.colorbar(image, ax=ax, label="share" if normalize else "count")
    return fig


def load_over_training(steps: Sequence[int], loads_SE: np.ndarray, title: str) -> Figure:
    """Step x expert heatmap of each expert's share of the routed slots (rows: logging steps)."""
    loads = np.asarray(loads_SE, dtype=float)
    shares = loads / np.maximum(loads.sum(1, keepdims=True), 1e-12)
    fig = _figure(max(4.0, 0.25 * loads.shape[1] + 2.5), 4)
    ax = fig.add_subplot()
    image = ax.imshow(shares, aspect="auto", cmap="magma", interpolation="nearest", origin="lower",
                      extent=(-0.5, loads.shape[1] - 0.5, -0.5, len(steps) - 0.5))  # fmt: skip
    ticks = np.unique(np.linspace(0, len(steps) - 1, min(len(steps), 8)).astype(int))
    ax.set_yticks(ticks, labels=[str(steps[i]) for i in ticks])
    ax.set(xlabel="expert", ylabel="step", title=title)
    fig.colorbar(image, ax=ax, label="share of routed slots")
    return fig


def curves(series: dict[str, tuple[Sequence[int], Sequence[float]]], title: str, ylabel: str) -> Figure:
    """Line plot of named ``(steps, values)`` series."""
    fig = _figure(6, 3.5)
    ax = fig.add_subplot()
    for name, (xs, ys) in series.items():
        ax.plot(xs, ys, label=name, marker="." if len(xs) < 30 else None)
    ax.set(xlabel="step", ylabel=ylabel, title=title)
    if series:
        ax.legend(loc="best", fontsize="small")
    return fig
