"""``diagnose``: read a model through its SymmetryMap and report how collapsed it is (docs/theory.md,
collapse metrics).

Layer names: a group's ``layer`` is its layers (module paths) joined by commas, or the first and how
many more when there are more than three (:func:`layer_name`); the activation table uses the same name
for the group whose units a probed module outputs, and keeps the module path in ``module``.

``DiagnoseReport.to_pandas()``, one row per symmetry group (weights only, always):

* ``group``: the group's label; ``kind``: its class (permutation, sign_flip, rescale, scale, bn_scale,
  rotation); ``layer``: as above; ``units``: k, the units it acts on (neurons, channels, head dims);
* ``dead``: units whose orbit representative u (``SymmetryGroup.canonical_units``: balanced incoming
  and outgoing norms, signs fixed for sign-flip groups) is below the layer's floor,
  ‖u‖ ≤ ``dead_tol``·max‖v‖ (default 1e-3);
* ``distinct``: clusters of *living* units, single linkage with ‖u − v‖ ≤ ``duplicate_tol``·max(‖u‖, ‖v‖)
  (default 5 %); dead units are never distinct, so ``units − dead − distinct`` living units duplicate
  another. A permutation group is counted on the representatives of the scaling group over the same
  units (so units that differ only by a rescaling or a sign count as duplicates);
* ``distance``: to the nearest symmetric surface of the group, ``SymmetryGroup.distance(model)``;
* ``eff_rank, approx_rank, srank, stable_rank, num_rank``: for rotation groups, of the invariant
  product of the group's two factors (W_Qᵀ W_K per head, W_O W_V per head, U W for linear→linear);
  NaN where they do not apply. ``dead``/``distinct`` are NaN for rotation groups.

``DiagnoseReport.activations`` with probe ``data``, one row per probed module: ``layer`` (the group name
above, or the module path when no group's units pass through it), ``module``, ``units``, ``rows`` (probe
rows seen), ``dead`` (never above the layer's floor ``dead_tol``·max|h|), ``dormant`` (above it on < 1 %
of rows), ``redo_dormant`` (ReDO τ-dormant), ``eff_rank`` (of the representation). Also neural collapse
NC1–NC4 at the classifier's input, the embedding covariance spectrum, and optional per-latent KL /
active units from given encoder means and log-variances. See probe.py for data forms and modes.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import torch
from torch import nn

from ..core.finite import check_module_finite
from ..detect.groups import Permutation, Rotation, SymmetryGroup
from ..detect.smap import ExampleInputs, SymmetryMap
from . import metrics as M
from . import probe
from .units import product_spectrum

RANK_COLUMNS = ("eff_rank", "approx_rank", "srank", "stable_rank", "num_rank")
GROUP_COLUMNS = ("group", "kind", "layer", "units", "dead", "distinct", "distance", *RANK_COLUMNS)
#: Heat maps are drawn for at most this many groups, each on at most this many units.
MAX_HEATMAPS, MAX_HEATMAP_UNITS = 4, 256

Symmetries = SymmetryMap | Sequence[SymmetryGroup]
"""A SymmetryMap (``ms.find_symmetries``), or symmetry groups built by hand."""


@dataclass
class DiagnoseReport:
    """What :func:`diagnose` found. ``to_pandas()`` is the per-group table; the probe results are in
    ``activations`` (DataFrame per layer), ``neural_collapse`` (dict), ``embedding_spectrum`` (numpy),
    ``posterior`` (DataFrame per latent); ``meta`` says how they were computed."""

    groups: pd.DataFrame
    activations: pd.DataFrame | None = None
    neural_collapse: dict[str, float] | None = None
    embedding_spectrum: np.ndarray | None = None
    posterior: pd.DataFrame | None = None
    spectra: dict[str, np.ndarray] = field(default_factory=dict)
    correlations: dict[str, np.ndarray] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def to_pandas(self) -> pd.DataFrame:
        """One row per symmetry group (columns: see the module docstring)."""
        return self.groups.copy()

    def summary(self) -> str:
        from .summary import summarize

        return summarize(self)

    def plot(self, out: str | Path) -> list[Path]:
        """Write PNG figures to directory ``out`` (created); return their paths."""
        from .plots import plot_report

        return plot_report(self, Path(out))

    def __repr__(self) -> str:
        return f"DiagnoseReport({len(self.groups)} groups)\n{self.summary()}"


# -------------------------------------------------------------------------------------------- groups
def _groups_of(symmetries: SymmetryMap | Iterable[SymmetryGroup]) -> list[SymmetryGroup]:
    groups = list(symmetries.groups if isinstance(symmetries, SymmetryMap) else symmetries)
    for i, g in enumerate(groups):
        if not isinstance(g, SymmetryGroup):
            raise TypeError(
                f"symmetry group {i} is a {type(g).__name__}, not a SymmetryGroup; pass the SymmetryMap "
                "returned by ms.find_symmetries(model, example_inputs), or groups built with "
                "ms.detect.Permutation.from_spec(...) (and the other group classes)"
            )
    return groups


def layer_name(group: SymmetryGroup) -> str:
    """The one name of a group's layers used in every table and plot: the layers joined by commas, or
    the first and how many more when there are more than three."""
    layers = list(group.layers)
    return ",".join(layers) if len(layers) <= 3 else f"{layers[0]} (+{len(layers) - 1})"


def _scalar(x) -> float:
    if x is None:
        return math.nan
    if isinstance(x, torch.Tensor):
        return float(x.detach().double().cpu().reshape(-1)[0]) if x.numel() else math.nan
    return float(x)


def _partners(groups: list[SymmetryGroup]) -> dict[int, SymmetryGroup]:
    """For each permutation group, a diagonal group (rescale / sign flip / scale) over the same units:
    its orbit representatives are the units that the permutation's duplicate count compares."""
    def key(m):
        return (m.name, m.dim, tuple(m.index.reshape(-1).tolist()))

    out = {}
    for i, g in enumerate(groups):
        if not isinstance(g, Permutation):
            continue
        mine = {key(m) for m in g.members}
        for d in groups:
            moved = [m for m in d.members if m.role in ("source", "sink")]
            if d.kind in ("sign_flip", "rescale", "scale") and d.size == g.size and moved and all(
                key(m) in mine for m in moved
            ):
                out[i] = d
                break
    return out


def _count(cache: list, units: torch.Tensor, dead_tol: float, dup_tol: float):
    """(labels with −1 for dead units, distinct living clusters, dead count, min pair distance); groups
    over the very same canonical units (a layer's permutation and rescale groups) reuse the result."""
    for u, result in cache:
        if u.shape == units.shape and torch.equal(u, units):
            return result
    result = M.count_units(units, dead_tol, dup_tol)
    cache.append((units, result))
    del cache[:-2]
    return result


def _plot_units(units: torch.Tensor) -> torch.Tensor:
    """At most MAX_HEATMAP_UNITS evenly spaced units (rows), float64 on the CPU, for the figures."""
    n = units.shape[0]
    keep = np.unique(np.linspace(0, n - 1, min(n, MAX_HEATMAP_UNITS)).round().astype(int))
    return units.detach().double().cpu()[torch.as_tensor(keep)]


def _correlation(units: torch.Tensor) -> np.ndarray:
    """Pearson correlation of unit vectors, units ordered by average-linkage leaves (identical units,
    distance 0, end up adjacent, so clusters show as blocks); dead units correlate 0."""
    from scipy.cluster.hierarchy import leaves_list, linkage
    from scipy.spatial.distance import squareform

    U = _plot_units(units)
    keep = U.shape[0]
    U = U - U.mean(1, keepdim=True)
    norm = torch.linalg.vector_norm(U, dim=1, keepdim=True)
    Z = torch.where(norm > 0, U / torch.where(norm > 0, norm, torch.ones_like(norm)), torch.zeros_like(U))
    corr = (Z @ Z.T).clamp(-1, 1).numpy()
    if keep > 2:
        dist = np.clip(1.0 - corr, 0, 2)
        np.fill_diagonal(dist, 0)
        order = leaves_list(linkage(squareform((dist + dist.T) / 2, checks=False), method="average"))
        corr = corr[np.ix_(order, order)]
    return corr


def _group_row(i, group, partner, model, dead_tol, dup_tol, cache) -> tuple[dict, np.ndarray | None, tuple | None]:
    """One table row; also the spectrum to plot (rotation groups) and the heat-map candidate (others)."""
    k = group.size
    row: dict[str, Any] = dict.fromkeys(GROUP_COLUMNS, math.nan)
    row.update(group=group.label or f"{i}:{group.kind}", kind=group.kind, layer=layer_name(group), units=k)
    row["distance"] = _scalar(group.distance(model))
    if isinstance(group, Rotation):
        spec = product_spectrum(group.factors(model))
        if spec is None:
            return row, None, None
        sv, shape = spec
        row.update({c: _scalar(v) for c, v in M.rank_metrics(sv=sv, shape=shape).items()})
        return row, sv.double().cpu().numpy(), None
    units = (partner or group).canonical_units(model)
    counts = _count(cache, units, dead_tol, dup_tol)
    row["dead"], row["distinct"] = counts.dead, counts.distinct
    candidate = (row["distinct"] / max(k, 1), -row["dead"], i, row["group"], units)
    return row, None, candidate


@contextmanager
def _progress(show: bool, total: int) -> Iterator[Callable[[], None]]:
    """A callable that advances a transient rich progress bar (a no-op when ``show`` is False)."""
    if not show:
        yield lambda: None
        return
    from rich.progress import Progress

    with Progress(transient=True) as bar:
        task = bar.add_task("diagnosing symmetry groups", total=total)
        yield lambda: bar.advance(task)


class GroupTable(NamedTuple):
    """:func:`group_table`'s result: the per-group table and the plot data keyed by group name."""

    table: pd.DataFrame
    spectra: dict[str, np.ndarray]
    correlations: dict[str, np.ndarray]


def group_table(
    model: nn.Module,
    symmetries: Symmetries,
    dead_tol: float = M.DEAD_TOL,
    duplicate_tol: float = M.DUPLICATE_TOL,
    keep_plots: bool = True,
    progress: bool = False,
) -> GroupTable:
    """The weights-only per-group table plus plot data (spectra, correlations); ``progress`` shows a
    rich progress bar over the groups."""
    rows: list[dict[str, Any]] = []
    spectra: dict[str, np.ndarray] = {}
    candidates: list[tuple] = []
    cache: list[tuple[torch.Tensor, M.UnitCounts]] = []
    groups = _groups_of(symmetries)
    partners = _partners(groups)
    with _progress(progress, len(groups)) as advance:
        for i, group in enumerate(groups):
            row, spectrum, candidate = _group_row(
                i, group, partners.get(i), model, dead_tol, duplicate_tol, cache
            )
            rows.append(row)
            if spectrum is not None:
                spectra[row["group"]] = spectrum
            if keep_plots and candidate is not None:  # hold only the few unit matrices a heat map needs
                candidates = sorted([*candidates, candidate], key=lambda c: c[:3])[:MAX_HEATMAPS]
            advance()
    correlations = {}
    for *_, name, units in candidates:
        correlations[name] = _correlation(units)
        # the plotted unit spectrum uses the same (at most MAX_HEATMAP_UNITS) units as the heat map
        spectra.setdefault(name, M.singular_values(_plot_units(units)).numpy())
    table = pd.DataFrame(rows, columns=list(GROUP_COLUMNS))
    return GroupTable(table, spectra, correlations)


# --------------------------------------------------------------------------------------------- probe
def _classifier(model: nn.Module, name: str | None, modules) -> tuple[str | None, nn.Module | None]:
    """The named classifier, or by default the last nn.Linear (none: no NC metrics, no error)."""
    if name is not None:
        return name, probe.get_module(model, name, modules)
    linears = [(n, m) for n, m in modules.items() if isinstance(m, nn.Linear)]
    return linears[-1] if linears else (None, None)


def _activation_table(stats: Mapping[str, probe.LayerStats], redo_tau: float) -> pd.DataFrame:
    rows = []
    for name, st in stats.items():
        if st.active is None or st.abs_sum is None:
            raise RuntimeError(f"the probe of {name!r} recorded no batch")  # stats are made by their first batch
        frac = st.active / st.rows
        mean_abs = st.abs_sum / st.rows
        layer_mean = mean_abs.mean()
        score = mean_abs / torch.where(layer_mean > 0, layer_mean, torch.ones_like(layer_mean))
        eff = M.effective_rank_from_gram(st.gram) if st.gram is not None else torch.tensor(math.nan)
        rows.append(
            {
                "layer": name,
                "module": name,
                "units": int(frac.numel()),
                "rows": st.rows,
                "dead": int((frac == 0).sum()),
                "dormant": int((frac < M.DORMANT_FRACTION).sum()),
                "redo_dormant": int((score <= redo_tau).sum()),
                "eff_rank": _scalar(eff),
            }
        )
    return pd.DataFrame(
        rows, columns=["layer", "module", "units", "rows", "dead", "dormant", "redo_dormant", "eff_rank"]
    )


def _name_activations(acts: pd.DataFrame, model: nn.Module, groups: list[SymmetryGroup]) -> pd.DataFrame:
    """Name each probed module like the permutation group whose units it outputs: a group of the same
    size whose layers come before and after the module in the model's module order."""
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    perms = [g for g in groups if isinstance(g, Permutation)]
    names = []
    for module, units in zip(acts["module"], acts["units"], strict=True):
        at = order.get(module.split("#")[0], -1)
        match = next(
            (g for g in perms if g.size == units
             and min(order.get(lay, 1 << 30) for lay in g.layers) < at < max(order.get(lay, -1) for lay in g.layers)),
            None,
        )
        names.append(layer_name(match) if match is not None else module)
    return acts.assign(layer=names)


def _nc_metrics(features: torch.Tensor, labels: torch.Tensor, clf: nn.Module) -> dict[str, float]:
    present = torch.unique(labels)
    weight = getattr(clf, "weight", None)
    if weight is None or weight.dim() != 2:
        raise ValueError(
            f"the classifier {type(clf).__name__} has no 2-D .weight; NC3/NC4 need a linear head"
        )
    if int(labels.max()) >= weight.shape[0] or int(labels.min()) < 0:
        raise ValueError(
            f"labels range over [{int(labels.min())}, {int(labels.max())}] but the classifier has "
            f"{weight.shape[0]} outputs"
        )
    remap = torch.full((weight.shape[0],), -1, dtype=torch.long, device=labels.device)
    remap[present] = torch.arange(len(present), device=labels.device)
    bias = getattr(clf, "bias", None)
    w, b = (
        weight.detach()[present.to(weight.device)],
        None if bias is None else bias.detach()[present.to(bias.device)],
    )
    nc = M.neural_collapse(features, remap[labels], w, b) if len(present) > 1 else {}
    return {k: _scalar(v) for k, v in nc.items()}


def probe_data(
    model: nn.Module,
    example_inputs: ExampleInputs,
    data: object,
    *,
    layers: Iterable[str] | None = None,
    classifier: str | None = None,
    embedding: str | None = None,
    nc: bool = True,
    mode: str = "eval",
    batch_size: int = 256,
    max_samples: int = 20000,
    dead_tol: float = M.DEAD_TOL,
    redo_tau: float = 0.025,
) -> dict[str, Any]:
    """Run the model on ``data`` with hooks; return the activation table, NC metrics and the embedding
    spectrum (see the module docstrings of report.py and probe.py)."""
    modules = dict(model.named_modules())
    probed = probe.resolve_modules(model, layers)
    if embedding is not None:
        probe.get_module(model, embedding, modules)
    clf_name, clf = _classifier(model, classifier, modules) if nc or classifier else (None, None)
    stats: dict[str, probe.LayerStats] = {}
    calls: dict[str, int] = {}
    feats, labels, embeds, seen = [], [], [], [0]

    def act_hook(name, module):
        def hook(_mod, _inp, out):
            if not isinstance(out, torch.Tensor):
                return
            calls[name] = calls.get(name, 0) + 1  # a module reused in one forward is probed per call
            key = name if calls[name] == 1 else f"{name}#{calls[name]}"
            if key not in stats:
                stats[key] = probe.LayerStats(channel_first=probe.channel_first(module, out))
            stats[key].update(out, dead_tol)

        return hook

    def clf_hook(_mod, args):
        if seen[0] < max_samples and args and isinstance(args[0], torch.Tensor):
            feats.append(args[0].detach().reshape(args[0].shape[0], -1).double())

    def emb_hook(_mod, _inp, out):
        if seen[0] < max_samples and isinstance(out, torch.Tensor):
            embeds.append(out.detach().reshape(out.shape[0], -1).double())

    handles = [m.register_forward_hook(act_hook(n, m)) for n, m in probed.items()]
    if clf is not None:
        handles.append(clf.register_forward_pre_hook(clf_hook))
    if embedding is not None:
        handles.append(modules[embedding].register_forward_hook(emb_hook))
    ref = next(model.parameters(), None)
    device, dtype = (ref.device, ref.dtype) if ref is not None else (torch.device("cpu"), None)
    batches = 0
    try:
        with probe.probe_mode(model, mode):
            for args, y in probe.iter_batches(data, batch_size):
                args = probe.to_device(args, device, dtype)
                calls.clear()
                probe.run_model(model, args, example_inputs)
                if y is not None and seen[0] < max_samples:
                    labels.append(torch.as_tensor(y).reshape(-1).long().to(device))
                seen[0] += probe.batch_rows(args)
                batches += 1
    finally:
        for h in handles:
            h.remove()
    if batches == 0 or seen[0] == 0:
        raise ValueError("data yielded no samples (an empty DataLoader or tensor?); give at least one batch")
    out = {
        "activations": _activation_table(stats, redo_tau),
        "rows": seen[0],
        "mode": mode,
        "classifier": clf_name,
        "neural_collapse": None,
        "embedding_spectrum": None,
    }
    feat = torch.cat(feats)[:max_samples] if feats else None
    emb = torch.cat(embeds)[:max_samples] if embeds else feat
    if feat is not None and clf is not None and labels and nc:  # features come from the classifier's hook
        lab = torch.cat(labels)[:max_samples].to(feat.device)
        if lab.shape[0] != feat.shape[0]:
            raise ValueError(
                f"{lab.shape[0]} labels but {feat.shape[0]} feature rows at classifier {clf_name!r}; "
                "the classifier must run once per input"
            )
        out["neural_collapse"] = _nc_metrics(feat, lab, clf)
    if emb is not None and emb.shape[0] >= 2:
        out["embedding_spectrum"] = M.embedding_spectrum(emb).cpu().numpy()
        if emb.shape[0] <= emb[0].numel():
            warnings.warn(
                f"diagnose: the embedding has {emb[0].numel()} dimensions but only {emb.shape[0]} probe rows, so "
                f"at most {emb.shape[0] - 1} covariance eigenvalues can be non-zero whatever the model; pass at "
                f"least {emb[0].numel() + 1} rows of data for a meaningful dimensional-collapse count",
                UserWarning,
                stacklevel=3,
            )
    return out


def _posterior_table(posterior) -> pd.DataFrame:
    mu, logvar = posterior
    kl = M.gaussian_kl_per_latent(mu, logvar).cpu().numpy()
    var = M._as_matrix(mu, "mu").double().var(0, unbiased=False).cpu().numpy()
    return pd.DataFrame(
        {"latent": np.arange(len(kl)), "kl": kl, "activity": var, "active": var > M.ACTIVE_LATENT_THRESHOLD}
    )


# ------------------------------------------------------------------------------------------- public
def diagnose(
    model: nn.Module,
    example_inputs: ExampleInputs,
    data: object = None,
    *,
    symmetries: Symmetries | None = None,
    dead_tol: float = M.DEAD_TOL,
    duplicate_tol: float = M.DUPLICATE_TOL,
    layers: Iterable[str] | None = None,
    classifier: str | None = None,
    embedding: str | None = None,
    nc: bool = True,
    posterior: tuple[torch.Tensor, torch.Tensor] | None = None,
    mode: str = "eval",
    batch_size: int = 256,
    max_samples: int = 20000,
    plots: bool = True,
    progress: bool = False,
) -> DiagnoseReport:
    """How much of ``model`` sits on (or near) its symmetric surfaces, and where (docs/theory.md#metrics).

    Args:
        model: the network; it is not modified (probe hooks are removed, mode flags restored).
        example_inputs: a Tensor or tuple of Tensors, as for ``ms.find_symmetries``.
        data: optional probe data (a Tensor, ``(x, y)`` Tensors or a DataLoader; probe.py).
        symmetries: a precomputed SymmetryMap (or list of groups); default
            ``ms.find_symmetries(model, example_inputs)``.
        dead_tol: a unit is dead when ‖u‖ ≤ dead_tol · max_v ‖v‖ over the group's canonical units.
        duplicate_tol: two living units are duplicates when ‖u − v‖ ≤ duplicate_tol · max(‖u‖, ‖v‖).
        layers: names of the modules whose outputs are probed (default: activation modules, else every
            Linear/Conv). classifier: the linear head for NC1–NC4 (default: the last nn.Linear); its
            *input* is the feature layer. embedding: module whose output gives the embedding spectrum
            (default: the classifier's input). nc: False skips neural collapse.
        posterior: ``(mu, logvar)`` of a Gaussian encoder, (N, D) each: per-latent KL and active units.
        mode: ``"eval"`` (default; flags restored afterwards) or ``"current"`` for the probe pass.
        plots: keep the data for :meth:`DiagnoseReport.plot` (spectra, correlation heat maps).
        progress: show a rich progress bar over the groups (for large models).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"diagnose needs an nn.Module, got {type(model).__name__}")
    if layers is not None:
        layers = list(layers)
        for name in layers:
            probe.get_module(model, name)
    for named in (classifier, embedding):
        if named is not None:
            probe.get_module(model, named)
    check_module_finite(model)  # NaN weights would read as "not dead, not duplicated"
    if symmetries is None:
        symmetries = default_symmetries(model, example_inputs)
    table, spectra, correlations = group_table(
        model, symmetries, dead_tol, duplicate_tol, keep_plots=plots, progress=progress
    )
    rep = DiagnoseReport(
        groups=table,
        spectra=spectra,
        correlations=correlations,
        meta={"dead_tol": dead_tol, "duplicate_tol": duplicate_tol, "probe": data is not None},
    )
    if data is not None:
        res = probe_data(
            model,
            example_inputs,
            data,
            layers=layers,
            classifier=classifier,
            embedding=embedding,
            nc=nc,
            mode=mode,
            batch_size=batch_size,
            max_samples=max_samples,
            dead_tol=dead_tol,
        )
        rep.activations = _name_activations(res["activations"], model, _groups_of(symmetries))
        rep.neural_collapse = res["neural_collapse"]
        rep.embedding_spectrum = res["embedding_spectrum"]
        rep.meta.update(rows=res["rows"], mode=mode, classifier=res["classifier"])
    if posterior is not None:
        rep.posterior = _posterior_table(posterior)
    return rep


def default_symmetries(model: nn.Module, example_inputs: ExampleInputs) -> SymmetryMap:
    """``ms.find_symmetries(model, example_inputs)`` (imported here: detect is the layer below)."""
    from ..detect import find_symmetries

    return find_symmetries(model, example_inputs)
