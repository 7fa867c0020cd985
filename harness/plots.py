"""Report figures (matplotlib, Agg backend, PNG). Each function draws one figure and returns its path.

The functions take tidy pandas frames, so they know nothing about run folders or stat names.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: no display needed, and no GUI backend is ever picked up

import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from harness.artifacts import write_bytes  # noqa: E402

DPI = 120
PANEL_COLUMNS = 2
"""Panels per row of the per-layer delta figure (more would shrink the text when embedded)."""


def effect_by_layer(effect: pd.DataFrame, metric: str, comparison: str, path: Path) -> Path:
    """Per-layer paired Cohen's d with its confidence band and a zero line.

    ``effect`` has columns layer, d, d_ci_low, d_ci_high.
    """
    fig, ax = plt.subplots(figsize=(8, 4.5), layout="constrained")
    ax.axhline(0, color="grey", linewidth=1, linestyle="--", label="no effect")
    ax.fill_between(effect["layer"], effect["d_ci_low"], effect["d_ci_high"], alpha=0.25, label="confidence interval")
    ax.plot(effect["layer"], effect["d"], marker="o", label="Cohen's d")
    _layer_axis(ax)
    ax.set_ylabel(f"paired Cohen's d ({metric})")
    ax.set_title(f"{metric}: effect size by layer ({comparison})")
    ax.legend()
    return _save(fig, path)


def effect_by_relative_depth(effects: pd.DataFrame, metric: str, path: Path) -> Path:
    """Per-layer paired Cohen's d against relative depth (layer / number of layers), a line per
    sweep point, so models of different depth share one axis. ``effects`` has columns point,
    relative_depth, d."""
    fig, ax = plt.subplots(figsize=(8, 4.5), layout="constrained")
    ax.axhline(0, color="grey", linewidth=1, linestyle="--")
    for point, rows in effects.groupby("point", sort=False):
        ax.plot(rows["relative_depth"], rows["d"], marker="o", markersize=3, label=point)
    ax.set_xlim(0, 1)
    ax.set_xlabel("relative depth (layer / number of layers)")
    ax.set_ylabel(f"paired Cohen's d ({metric})")
    ax.set_title(f"{metric}: effect size by relative depth")
    ax.grid(alpha=0.3)
    ax.legend(title="point", fontsize="small")
    return _save(fig, path)


def dose_response(effects: pd.DataFrame, dose: str, metric: str, comparison: str, path: Path) -> Path:
    """The paired Cohen's d (over layers) with its confidence interval against a matrix's
    numeric values (a dose), a point per sweep point. ``effects`` has columns dose, d, d_ci_low, d_ci_high."""
    fig, ax = plt.subplots(figsize=(8, 4.5), layout="constrained")
    ax.axhline(0, color="grey", linewidth=1, linestyle="--", label="no effect")
    ordered = effects.sort_values("dose")
    errors = [ordered["d"] - ordered["d_ci_low"], ordered["d_ci_high"] - ordered["d"]]
    ax.errorbar(ordered["dose"], ordered["d"], yerr=np.abs(np.array(errors, dtype=float)), marker="o", capsize=3,
                label="Cohen's d (confidence interval)")
    ax.set_xlabel(dose)
    ax.set_ylabel(f"paired Cohen's d ({metric})")
    ax.set_title(f"{metric}: effect size against {dose} ({comparison})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return _save(fig, path)


def means_by_layer(means: pd.DataFrame, metric: str, path: Path) -> Path:
    """Per-layer mean of the metric, a line per condition. ``means`` has columns condition, layer, mean."""
    fig, ax = plt.subplots(figsize=(8, 4.5), layout="constrained")
    for condition, rows in means.groupby("condition", sort=False):
        ax.plot(rows["layer"], rows["mean"], marker="o", markersize=3, label=condition)
    _layer_axis(ax)
    ax.set_ylabel(f"mean {metric}")
    ax.set_title(f"{metric} by layer and condition")
    ax.legend(title="condition")
    return _save(fig, path)


def paired_scatter(pairs: pd.DataFrame, x_name: str, y_name: str, path: Path) -> Path:
    """x against y per text, coloured by condition, a thin line joining each sample's texts.

    ``pairs`` has columns sample_id, condition, x, y.
    """
    fig, ax = plt.subplots(figsize=(7, 5.5), layout="constrained")
    for _, sample in pairs.groupby("sample_id"):
        ax.plot(sample["x"], sample["y"], color="grey", linewidth=0.5, alpha=0.5, zorder=1)
    for condition, rows in pairs.groupby("condition", sort=False):
        ax.scatter(rows["x"], rows["y"], s=20, label=condition, zorder=2)
    ax.set_xlabel(x_name)
    ax.set_ylabel(f"{y_name} (mean over layers)")
    ax.set_title(f"{x_name} vs {y_name} (lines join a sample's texts)")
    ax.legend(title="condition")
    return _save(fig, path)


def delta_norms_by_position(deltas: pd.DataFrame, path: Path) -> Path:
    """Mean delta norm by response token position: a panel per layer, a line per condition.

    ``deltas`` has columns layer, condition, position, norm (one row per token step).
    """
    layers = sorted(deltas["layer"].unique())
    columns = min(len(layers), PANEL_COLUMNS)
    rows = math.ceil(len(layers) / columns)
    fig, axes = plt.subplots(
        rows, columns, figsize=(5 * columns + 1.5, 3.8 * rows), squeeze=False, layout="constrained"
    )
    means = _well_supported_means(deltas)
    for ax, layer in zip(axes.flat, layers):
        for condition, points in means[means["layer"] == layer].groupby("condition", sort=False):
            points = points.sort_values("position")
            ax.plot(points["position"], points["norm"], linewidth=1, label=condition)
        ax.set_title(f"layer {layer}")
        ax.set_xlabel("response token position")
        ax.set_ylabel("mean ‖h[i+1] − h[i]‖")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(layers) :]:
        ax.set_visible(False)
    fig.legend(*axes[0][0].get_legend_handles_labels(), title="condition", loc="outside right upper")
    fig.suptitle("Token-to-token delta norm by position (positions that at least half the texts reach)")
    return _save(fig, path)


def per_sample_distribution(values: pd.DataFrame, metric: str, path: Path) -> Path:
    """A violin per condition of the per-sample values, each sample a jittered dot on it.

    ``values`` has columns condition, value (one row per text).
    """
    groups = [(condition, rows["value"].dropna().to_numpy()) for condition, rows in values.groupby("condition", sort=False)]
    groups = [(condition, points) for condition, points in groups if len(points)]
    fig, ax = plt.subplots(figsize=(2.2 * len(groups) + 3, 4.5), layout="constrained")
    positions = range(1, len(groups) + 1)
    if groups:
        ax.violinplot([points for _, points in groups], positions=positions, showmedians=True, widths=0.8)
    jitter = np.random.default_rng(0)  # fixed: the same run draws the same figure
    for position, (_, points) in zip(positions, groups):
        ax.scatter(position + jitter.uniform(-0.12, 0.12, len(points)), points, s=10, alpha=0.6, color="black", zorder=3)
    ax.set_xticks(list(positions), [condition for condition, _ in groups])
    ax.set_ylabel(f"{metric} per sample (mean over layers)")
    ax.set_title(f"{metric} per sample and condition (line: median)")
    ax.grid(alpha=0.3, axis="y")
    return _save(fig, path)


def window_heatmap(effects: pd.DataFrame, metric: str, comparison: str, path: Path) -> Path:
    """Paired Cohen's d by layer (columns) and position window (rows), 0 white; a dot marks a
    cell significant after the windows x layers correction.

    ``effects`` has columns window, layer, d, significant; windows in the order given.
    """
    windows = list(dict.fromkeys(effects["window"]))
    grid = effects.pivot(index="window", columns="layer", values="d").reindex(windows)
    marks = effects.pivot(index="window", columns="layer", values="significant").reindex(windows)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.3 * grid.shape[1] + 3), 0.6 * len(windows) + 2), layout="constrained")
    finite = np.abs(grid.to_numpy(dtype=float))
    limit = np.nanmax(finite) if np.isfinite(finite).any() else 1.0
    image = ax.imshow(grid.to_numpy(dtype=float), cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto")
    rows, columns = np.nonzero(marks.fillna(False).to_numpy(dtype=bool))
    ax.scatter(columns, rows, s=8, color="black", label="significant (Holm, windows x layers)")
    ax.set_xticks(range(grid.shape[1]), [str(layer) for layer in grid.columns], fontsize=7)
    ax.set_yticks(range(len(windows)), windows)
    ax.set_xlabel("layer")
    ax.set_ylabel("response tokens")
    ax.set_title(f"{metric}: paired Cohen's d by layer and position window ({comparison})")
    fig.colorbar(image, ax=ax, label="Cohen's d")
    if len(rows):
        ax.legend(loc="upper left", bbox_to_anchor=(0, -0.18), frameon=False)
    return _save(fig, path)


def projection_by_layer(means: pd.DataFrame, path: Path) -> Path:
    """A panel per projection column (metric and direction set): the mean over samples by layer,
    a line per condition with its confidence band.

    ``means`` has columns column, condition, layer, mean, ci_low, ci_high.
    """
    panels = list(dict.fromkeys(means["column"]))
    columns = min(len(panels), PANEL_COLUMNS)
    rows = math.ceil(len(panels) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(5.5 * columns + 1.5, 3.8 * rows), squeeze=False, layout="constrained")
    for ax, panel in zip(axes.flat, panels):
        for condition, points in means[means["column"] == panel].groupby("condition", sort=False):
            line, = ax.plot(points["layer"], points["mean"], marker="o", markersize=3, label=condition)
            ax.fill_between(points["layer"], points["ci_low"], points["ci_high"], alpha=0.2, color=line.get_color())
        ax.set_title(panel)
        ax.set_ylabel("mean over samples")
        _layer_axis(ax)
    for ax in axes.flat[len(panels) :]:
        ax.set_visible(False)
    fig.legend(*axes[0][0].get_legend_handles_labels(), title="condition", loc="outside right upper")
    fig.suptitle("Projection metrics by layer (bands: confidence interval of the mean)")
    return _save(fig, path)


def _well_supported_means(deltas: pd.DataFrame) -> pd.DataFrame:
    """Mean norm per (layer, condition, position), where at least half the texts reach the position.

    Responses differ in length; the last positions would otherwise be the means of one or two texts.
    """
    keys = ["layer", "condition", "position"]
    grouped = deltas.groupby(keys, sort=False)["norm"].agg(["mean", "size"]).reset_index()
    texts = grouped.groupby(["layer", "condition"])["size"].transform("max")  # position 0: every text with a step
    return grouped[grouped["size"] * 2 >= texts].rename(columns={"mean": "norm"})


def _layer_axis(ax: plt.Axes) -> None:
    ax.set_xlabel("layer")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)


def _save(fig: Figure, path: Path) -> Path:
    """Write the figure atomically and free it (pyplot keeps figures alive otherwise)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    plt.close(fig)
    write_bytes(Path(path), buffer.getvalue())
    return Path(path)
