"""Figures of a :class:`DiagnoseReport` and of a monitor's history (matplotlib, Agg backend, PNG files).

Every figure has a ``*_figure(rep)`` builder returning the matplotlib Figure (or None when the report has
nothing to draw), so its data can be inspected or logged (TensorBoard ``add_figure``), and a writer
``*(rep, path)`` that saves it. Readability rules:

* spectra are normalised by their largest value and clipped below :data:`SPECTRUM_FLOOR` (1e-12) of it:
  values under the floor are drawn at the floor (the axis label says so) and the y-axis spans only the
  drawn range, never down to 1e-300;
* groups of one layer whose spectra coincide (a layer's permutation and rescale / sign-flip groups share
  their canonical units) are drawn once, labelled with every kind; otherwise colour = layer and line
  style = kind;
* ``dead_distinct`` stacks dead / duplicated / distinct units per layer, so each bar is the layer's units.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib

matplotlib.use("Agg", force=False)
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from .summary import covered, unit_rows  # noqa: E402

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from numpy.typing import ArrayLike

    from .report import DiagnoseReport

MAX_SPECTRA = 12
#: spectra are clipped below this fraction of their largest value
SPECTRUM_FLOOR = 1e-12
#: line style per group kind (colour is per layer)
KIND_STYLES = {
    "permutation": "-",
    "rescale": "--",
    "sign_flip": "-.",
    "scale": ":",
    "bn_scale": (0, (3, 1, 1, 1)),
    "rotation": "-",
}
#: the per-group metrics drawn by :func:`history_figure` (when present)
HISTORY_METRICS = ("dead", "distinct", "distance", "eff_rank", "num_rank", "stable_rank")
#: colours of the stacked unit bars
UNIT_COLOURS = {"dead": "#7f7f7f", "duplicated": "#ff7f0e", "distinct": "#1f77b4"}


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return Path(path)


def _saved(fig: Figure | None, path: Path) -> Path | None:
    return None if fig is None else _save(fig, path)


def _short(labels: Iterable[object], width: int = 32) -> list[str]:
    """Tick labels cut to ``width`` characters (keeping the end, where layer names differ)."""
    return [s if len(s) <= width else "…" + s[-(width - 1) :] for s in map(str, labels)]


def _floor_label(what: str, floor: float = SPECTRUM_FLOOR) -> str:
    return f"{what} (clipped below {floor:.0e})"


def clip_spectrum(values: ArrayLike, floor: float = SPECTRUM_FLOOR) -> np.ndarray | None:
    """``values`` sorted descending, divided by the largest and clipped below ``floor`` (NaN and negative
    round-off included); None when the largest value is not a positive finite number."""
    v = np.sort(np.asarray(values, dtype=np.float64).reshape(-1))[::-1]
    if not len(v) or not math.isfinite(float(v[0])) or v[0] <= 0:
        return None
    v = np.nan_to_num(v / v[0], nan=0.0)
    return np.maximum(v, floor)


def _limit_log_axis(ax: Axes, curves: Iterable[np.ndarray], floor: float = SPECTRUM_FLOOR) -> None:
    """y-limits of a log axis of normalised spectra: from just under the smallest drawn value (at least
    the floor) to just above 1."""
    low = min(float(c.min()) for c in curves)
    ax.set_ylim(max(floor, low) / 2, 2.0)


# ---------------------------------------------------------------------------------------- report figures
def correlation_panels(rep: DiagnoseReport) -> list[tuple[str, np.ndarray]]:
    """``(title, matrix)`` per heat map; groups of one layer with the same matrix (a layer's permutation
    and rescale groups) share one panel titled with every kind."""
    info = _group_info(rep)
    panels: list[list] = []
    for name, corr in (rep.correlations or {}).items():
        layer, kind = info.get(name, (name, ""))
        same = next((p for p in panels if p[0] == layer and kind not in p[1] and p[2].shape == corr.shape
                     and np.allclose(p[2], corr, atol=1e-12)), None)
        if same is not None:
            same[1].append(kind)
        else:
            panels.append([layer, [kind], corr, name])
    titles = [f"{layer}: {' = '.join(k for k in kinds if k) or 'group'}" for layer, kinds, _, _ in panels]
    return [(t if titles.count(t) == 1 else name, corr)
            for t, (_, _, corr, name) in zip(titles, panels, strict=True)]


def correlation_figure(rep: DiagnoseReport) -> Figure | None:
    """Neuron correlation of unit parameter vectors, units ordered by cluster (blocks = duplicates)."""
    panels = correlation_panels(rep)
    if not panels:
        return None
    n = len(panels)
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 4), squeeze=False)
    for ax, (title, corr) in zip(axes[0], panels, strict=True):
        im = ax.imshow(corr, cmap="RdBu_r", vmin=-1, vmax=1, interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("unit (ordered by cluster)")
        ax.set_ylabel("unit (ordered by cluster)")
    fig.colorbar(im, ax=axes[0].tolist(), label="correlation of unit parameters", shrink=0.8)
    return fig


def _group_info(rep: DiagnoseReport) -> dict[str, tuple[str, str]]:
    g = rep.groups
    if g is None or not len(g):
        return {}
    return {str(r.group): (str(r.layer), str(r.kind)) for r in g[["group", "layer", "kind"]].itertuples()}


def spectrum_lines(rep: DiagnoseReport) -> list[dict[str, Any]]:
    """The lines :func:`spectra_figure` draws: ``{"label", "layer", "kinds", "groups", "values"}`` with
    ``values`` normalised and clipped (:func:`clip_spectrum`); groups of one layer with the same spectrum
    are merged into one line (their kinds listed in the label)."""
    if not rep.spectra:
        return []
    info = _group_info(rep)
    rot = [k for k in rep.spectra if info.get(k, ("", ""))[1] == "rotation"]
    names = (rot or list(rep.spectra))[:MAX_SPECTRA]
    lines: list[dict[str, Any]] = []
    for name in names:
        values = clip_spectrum(rep.spectra[name])
        if values is None:
            continue
        layer, kind = info.get(name, (name, ""))
        same = next(
            (
                ln
                for ln in lines
                if kind not in ln["kinds"] and len(ln["values"]) == len(values)
                and (covered(layer, len(values), ln["layer"], len(values))
                     or covered(ln["layer"], len(values), layer, len(values)))
                and np.allclose(ln["values"], values, rtol=1e-9, atol=SPECTRUM_FLOOR)
            ),
            None,
        )
        if same is not None:  # e.g. a layer's permutation and rescale groups: the same canonical units
            same["groups"].append(name)
            same["kinds"].append(kind)
            if kind == "permutation":  # name the units by the permutation's (widest) layer list
                same["layer"] = layer
            continue
        lines.append({"layer": layer, "kinds": [kind], "groups": [name], "values": values})
    labels = [f"{ln['layer']}: {' = '.join(k for k in ln['kinds'] if k) or 'group'}" for ln in lines]
    for ln, label in zip(lines, labels, strict=True):
        # several groups of one kind over the same layers (attention heads): name each by its group label
        ln["label"] = label if labels.count(label) == 1 else ln["groups"][0]
    return lines


def spectra_figure(rep: DiagnoseReport) -> Figure | None:
    """σ_i/σ_1 of each group's invariant product (rotation) or unit matrix (others), log scale."""
    lines = spectrum_lines(rep)
    if not lines:
        return None
    rot = any("rotation" in ln["kinds"] for ln in lines)
    colours = {layer: f"C{i % 10}" for i, layer in enumerate(dict.fromkeys(ln["layer"] for ln in lines))}
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for j, ln in enumerate(lines):
        v = ln["values"]
        colour = colours[ln["layer"]] if not rot else f"C{j % 10}"
        style = KIND_STYLES.get(ln["kinds"][0], "-") if ln["kinds"] else "-"
        ax.semilogy(np.arange(1, len(v) + 1), v, marker=".", color=colour, linestyle=style, label=ln["label"])
    _limit_log_axis(ax, [ln["values"] for ln in lines])
    ax.set_xlabel("index i")
    ax.set_ylabel(_floor_label("σ_i / σ_1"), fontsize=8)
    ax.set_title(
        "singular spectra" + (" (rotation groups: invariant products)" if rot else " (unit matrices per layer)"),
        fontsize=9,
    )
    ax.legend(fontsize=7, title="layer: kind", title_fontsize=7)
    return fig


def unit_bars(rep: DiagnoseReport) -> pd.DataFrame:
    """One row per set of units: ``layer, units, dead, duplicated, distinct`` (dead + duplicated +
    distinct = units), the data of :func:`dead_distinct_figure`. Permutation groups define the units;
    a diagonal group (rescale, sign flip, scale, BatchNorm scale) over the same units (:func:`covered`)
    adds no bar, one over units no permutation moves adds its own."""
    rows = unit_rows(rep.groups)
    out = pd.DataFrame(
        {
            "layer": rows["layer"].astype(str).to_numpy(),
            "units": rows["units"].astype(int).to_numpy(),
            "dead": rows["dead"].astype(int).to_numpy(),
            "distinct": rows["distinct"].astype(int).to_numpy(),
        }
    )
    out["duplicated"] = (out["units"] - out["dead"] - out["distinct"]).clip(lower=0)
    return out[["layer", "units", "dead", "duplicated", "distinct"]]


def dead_distinct_figure(rep: DiagnoseReport) -> Figure | None:
    """Per layer, one bar of height = units, stacked: dead, duplicated (living copies of another unit)
    and distinct living units."""
    bars = unit_bars(rep)
    if not len(bars):
        return None
    x = np.arange(len(bars))
    fig, ax = plt.subplots(figsize=(max(5, 0.5 * len(bars) + 2), 4))
    bottom = np.zeros(len(bars))
    for part in ("dead", "duplicated", "distinct"):
        h = bars[part].to_numpy(dtype=float)
        ax.bar(x, h, 0.6, bottom=bottom, label=part, color=UNIT_COLOURS[part])
        bottom += h
    ax.set_xticks(x, _short(bars["layer"]), rotation=60 if len(bars) > 3 else 0,
                  ha="right" if len(bars) > 3 else "center", fontsize=7)
    ax.set_xlim(-0.6, len(bars) - 0.4)
    ax.set_ylim(0, float(bars["units"].max()) * 1.08)
    ax.set_xlabel("layer")
    ax.set_ylabel("number of units")
    ax.set_title("units per layer: dead + duplicated + distinct = units (from parameters)", fontsize=9)
    ax.legend(fontsize=8)
    return fig


def activity_figure(rep: DiagnoseReport) -> Figure | None:
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
    return fig


def embedding_figure(rep: DiagnoseReport) -> Figure | None:
    """λ_i/λ_1 of the embedding covariance (descending, clipped at :data:`SPECTRUM_FLOOR`); a dotted
    line marks the rank bound rows − 1 when the probe had fewer rows than dimensions."""
    v = None if rep.embedding_spectrum is None else clip_spectrum(rep.embedding_spectrum)
    if v is None:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.semilogy(np.arange(1, len(v) + 1), v, marker=".")
    rows = rep.meta.get("rows")
    if rows and rows - 1 < len(v):
        ax.axvline(rows - 0.5, color="0.5", linestyle=":", label=f"rank bound: {rows} rows → ≤ {rows - 1} non-zero")
        ax.legend(fontsize=7)
    _limit_log_axis(ax, [v])
    ax.set_xlabel("index i")
    ax.set_ylabel(_floor_label("λ_i / λ_1 of the covariance"), fontsize=8)
    ax.set_title("embedding spectrum (dimensional collapse: many ≈ 0)", fontsize=9)
    return fig


FIGURES: dict[str, Callable[[DiagnoseReport], Figure | None]] = {
    "correlation_heatmap": correlation_figure,
    "singular_spectra": spectra_figure,
    "dead_distinct": dead_distinct_figure,
    "activity": activity_figure,
    "embedding_spectrum": embedding_figure,
}


def report_figures(rep: DiagnoseReport) -> dict[str, Figure]:
    """``{name: Figure}`` for every figure the report has data for (close them with ``plt.close``)."""
    figs = {name: make(rep) for name, make in FIGURES.items()}
    return {name: fig for name, fig in figs.items() if fig is not None}


# file writers (the figure names are the PNG names of DiagnoseReport.plot)
def correlation_heatmaps(rep: DiagnoseReport, path: Path) -> Path | None:
    return _saved(correlation_figure(rep), path)


def singular_spectra(rep: DiagnoseReport, path: Path) -> Path | None:
    return _saved(spectra_figure(rep), path)


def dead_distinct_bars(rep: DiagnoseReport, path: Path) -> Path | None:
    return _saved(dead_distinct_figure(rep), path)


def activity_bars(rep: DiagnoseReport, path: Path) -> Path | None:
    return _saved(activity_figure(rep), path)


def embedding_spectrum(rep: DiagnoseReport, path: Path) -> Path | None:
    return _saved(embedding_figure(rep), path)


def plot_report(rep: DiagnoseReport, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [_saved(make(rep), out / f"{name}.png") for name, make in FIGURES.items()]
    return [p for p in paths if p is not None]


# ---------------------------------------------------------------------------------------- history figure
def history_figure(history: pd.DataFrame, metrics: Sequence[str] = HISTORY_METRICS) -> Figure | None:
    """A monitor's history: one panel per metric (``metrics`` that have a value), one line per group
    against the step; colour = layer, line style = kind, one legend for the figure. In the dead and
    distinct panels a diagonal group over a permutation's units (same counts) is not drawn again. None
    when empty."""
    if history is None or not len(history):
        return None
    present = [m for m in metrics if m in history and history[m].notna().any()]
    if not present:
        return None
    groups = history.drop_duplicates("group")[["group", "layer", "kind", "units"]]
    perms = groups[groups["kind"] == "permutation"]
    # unit counts of a diagonal group over a permutation's units repeat the permutation's: drawn once
    repeats = {
        g.group for g in groups.itertuples()
        if g.kind != "permutation" and any(covered(str(g.layer), int(g.units), str(p.layer), int(p.units))
                                           for p in perms.itertuples())
    }
    colours = {layer: f"C{i % 10}" for i, layer in enumerate(dict.fromkeys(groups["layer"]))}
    ncols = min(3, len(present))
    nrows = math.ceil(len(present) / ncols)
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(4.2 * ncols, 3.2 * nrows + 0.8), squeeze=False, layout="constrained"
    )
    handles: dict[str, Line2D] = {}
    for ax, metric in zip(axes.flat, present, strict=False):
        for g in groups.itertuples():
            if metric in ("dead", "distinct") and g.group in repeats:
                continue
            rows = history[(history["group"] == g.group) & history[metric].notna()].sort_values("step")
            if not len(rows):
                continue
            (line,) = ax.plot(
                rows["step"], rows[metric], marker="." if len(rows) < 30 else None,
                color=colours[g.layer], linestyle=KIND_STYLES.get(g.kind, "-"),
            )
            handles.setdefault(f"{g.layer}: {g.kind}", line)
        values = history[metric].dropna().to_numpy(dtype=float)
        positive = values[values > 0]
        if metric in ("dead", "distinct", "num_rank", "approx_rank", "srank"):  # counts: 0 … units, integer ticks
            top = float(history.loc[history[metric].notna(), "units"].max())
            ax.set_ylim(-0.02 * top, 1.05 * top)
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        elif metric == "distance" and len(positive) == len(values) and positive.max() > 100 * positive.min():
            ax.set_yscale("log")
        ax.set_title(metric, fontsize=9)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in list(axes.flat)[len(present):]:
        ax.set_visible(False)
    fig.legend(list(handles.values()), list(handles), fontsize=7, loc="outside lower center",
               ncols=min(4, len(handles)), title="layer: kind", title_fontsize=7)
    fig.suptitle("symmetry diagnosis over training", fontsize=10)
    return fig
