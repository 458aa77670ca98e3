"""Figures of a :class:`DiagnoseReport` (matplotlib, Agg backend, PNG files)."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg", force=False)
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .summary import unit_rows  # noqa: E402

MAX_SPECTRA = 12


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def _short(labels, width: int = 32) -> list[str]:
    """Tick labels cut to ``width`` characters (keeping the end, where layer names differ)."""
    return [s if len(s) <= width else "…" + s[-(width - 1) :] for s in map(str, labels)]


def correlation_heatmaps(rep, path: Path) -> Path | None:
    """Neuron correlation of unit parameter vectors, units ordered by cluster (blocks = duplicates)."""
    if not rep.correlations:
        return None
    n = len(rep.correlations)
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 4), squeeze=False)
    for ax, (name, corr) in zip(axes[0], rep.correlations.items(), strict=True):
        im = ax.imshow(corr, cmap="RdBu_r", vmin=-1, vmax=1, interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("unit (ordered by cluster)")
        ax.set_ylabel("unit (ordered by cluster)")
    fig.colorbar(im, ax=axes[0].tolist(), label="correlation of unit parameters", shrink=0.8)
    return _save(fig, path)


def singular_spectra(rep, path: Path) -> Path | None:
    """σ_i/σ_1 of each group's invariant product (rotation) or unit matrix (others), log scale."""
    if not rep.spectra:
        return None
    rot = [k for k in rep.spectra if k in set(rep.groups.loc[rep.groups["kind"] == "rotation", "group"])]
    names = (rot or list(rep.spectra))[:MAX_SPECTRA]
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in names:
        sv = rep.spectra[name]
        if len(sv) and sv[0] > 0:
            tiny = np.finfo(np.float64).tiny
            ax.semilogy(np.arange(1, len(sv) + 1), np.maximum(sv / sv[0], tiny), marker=".", label=name)
    ax.set_xlabel("index i")
    ax.set_ylabel("σ_i / σ_1")
    ax.set_title("singular spectra" + (" (rotation groups: invariant products)" if rot else " (unit matrices)"))
    if names:
        ax.legend(fontsize=7)
    return _save(fig, path)


def dead_distinct_bars(rep, path: Path) -> Path | None:
    """Per layer: units, distinct units and dead units (from parameters)."""
    rows = unit_rows(rep.groups)
    if not len(rows):
        return None
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(max(5, 0.5 * len(rows) + 2), 4))
    w = 0.28
    ax.bar(x - w, rows["units"], w, label="units")
    ax.bar(x, rows["distinct"], w, label="distinct")
    ax.bar(x + w, rows["dead"], w, label="dead")
    ax.set_xticks(x, _short(rows["layer"]), rotation=60, ha="right", fontsize=7)
    ax.set_xlabel("layer")
    ax.set_ylabel("number of units")
    ax.set_title("units, distinct and dead units per layer (from parameters)", fontsize=9)
    ax.legend()
    return _save(fig, path)


def activity_bars(rep, path: Path) -> Path | None:
    """Per probed layer: fraction of dead and dormant units on the probe data."""
    a = rep.activations
    if a is None or not len(a):
        return None
    x = np.arange(len(a))
    fig, ax = plt.subplots(figsize=(max(5, 0.5 * len(a) + 2), 4))
    ax.bar(x - 0.2, a["dead"] / a["units"], 0.4, label="dead (never active)")
    ax.bar(x + 0.2, a["dormant"] / a["units"], 0.4, label="dormant (< 1 % of inputs)")
    ax.set_xticks(x, _short(a["layer"]), rotation=60, ha="right", fontsize=7)
    ax.set_xlabel("layer")
    ax.set_ylabel("fraction of units")
    ax.set_ylim(0, 1)
    ax.set_title("activation-based dead and dormant units", fontsize=9)
    ax.legend()
    return _save(fig, path)


def embedding_spectrum(rep, path: Path) -> Path | None:
    ev = rep.embedding_spectrum
    if ev is None or not len(ev) or not math.isfinite(float(ev[0])) or ev[0] <= 0:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.semilogy(np.arange(1, len(ev) + 1), np.maximum(ev / ev[0], np.finfo(np.float64).tiny), marker=".")
    ax.set_xlabel("index i")
    ax.set_ylabel("λ_i / λ_1 of the embedding covariance")
    ax.set_title("embedding spectrum (dimensional collapse: many ≈ 0)", fontsize=9)
    return _save(fig, path)


def plot_report(rep, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    makers = {
        "correlation_heatmap.png": correlation_heatmaps,
        "singular_spectra.png": singular_spectra,
        "dead_distinct.png": dead_distinct_bars,
        "activity.png": activity_bars,
        "embedding_spectrum.png": embedding_spectrum,
    }
    paths = [maker(rep, out / name) for name, maker in makers.items()]
    return [p for p in paths if p is not None]
