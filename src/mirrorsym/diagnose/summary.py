"""The few lines a person reads first about a :class:`DiagnoseReport`."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from .report import DiagnoseReport


def _layer_set(layer: str) -> tuple[frozenset, bool]:
    """The layer names of a table ``layer`` entry, and whether the list is complete (report.layer_name
    writes ``first (+n)`` for more than three layers)."""
    if " (+" in layer:
        return frozenset([layer.split(" (+")[0]]), False
    return frozenset(layer.split(",")), True


def covered(layer: str, units: int, by_layer: str, by_units: int) -> bool:
    """Whether a group over ``layer`` (``units`` units) acts on the units of a permutation group over
    ``by_layer``: the same number of units and layers among the permutation's layers (a layer's rescale,
    sign-flip, scale and BatchNorm-scale groups act on a subset of the tensors its permutation moves)."""
    if units != by_units:
        return False
    mine, full = _layer_set(layer)
    theirs, theirs_full = _layer_set(by_layer)
    return mine <= theirs if full and theirs_full else bool(mine & theirs)


def unit_rows(groups: pd.DataFrame) -> pd.DataFrame:
    """One row per set of units, so that units are counted once: the permutation groups, and the
    non-rotation groups over units that no permutation moves (a layer's rescale, sign-flip, scale and
    BatchNorm-scale groups act on its permutation's units: :func:`covered`)."""
    rows = groups[groups["kind"] != "rotation"].dropna(subset=["dead", "distinct"])
    rows = rows.drop_duplicates(subset=["layer", "units"])
    perms = rows[rows["kind"] == "permutation"]
    keep = [
        r.kind == "permutation"
        or not any(covered(str(r.layer), int(r.units), str(p.layer), int(p.units)) for p in perms.itertuples())
        for r in rows.itertuples()
    ]
    return rows[np.asarray(keep, dtype=bool)]  # (a plain empty list would select columns)


def _pct(a: float, b: float) -> str:
    return f"{100.0 * a / b:.1f}%" if b else "n/a"


def summarize(rep: DiagnoseReport) -> str:
    g = rep.groups
    lines = []
    kinds = ", ".join(f"{n} {k}" for k, n in g["kind"].value_counts().items()) or "none"
    n_layers = g["layer"].nunique()
    lines.append(f"{len(g)} symmetry groups over {n_layers} layer{'s' if n_layers != 1 else ''} ({kinds})")
    units = unit_rows(g)
    if len(units):
        total, dead = int(units["units"].sum()), int(units["dead"].sum())
        worst = units.assign(frac=units["dead"] / units["units"]).sort_values("frac", ascending=False).iloc[0]
        line = f"dead units: {dead} of {total} ({_pct(dead, total)})"
        if dead:
            line += f"; most in {worst['layer']} ({int(worst['dead'])} of {int(worst['units'])})"
        lines.append(line)
        distinct = int(units["distinct"].sum())
        ratio = units.assign(r=units["distinct"] / units["units"]).sort_values("r").iloc[0]
        line = f"distinct units: {distinct} of {total} ({_pct(total - distinct, total)} duplicated or dead)"
        if ratio["distinct"] < ratio["units"]:
            line += f"; most collapsed {ratio['layer']} ({int(ratio['units'])} -> {int(ratio['distinct'])})"
        lines.append(line)
    rot = g[(g["kind"] == "rotation") & g["num_rank"].notna()]
    if len(rot):
        r = rot.assign(frac=rot["num_rank"] / rot["units"]).sort_values(["frac", "eff_rank"]).iloc[0]
        lines.append(
            f"rotation groups: {len(rot)}; lowest rank {r['group']}: num_rank {int(r['num_rank'])} of "
            f"{int(r['units'])}, eff_rank {r['eff_rank']:.2f}"
        )
    dist = g["distance"].dropna()
    if len(dist):
        near = g.loc[dist.idxmin()]
        lines.append(
            f"nearest symmetric surface: {near['group']} ({near['kind']}) at distance {near['distance']:.3g}"
        )
    if rep.activations is not None:
        a = rep.activations
        lines.append(
            f"probe ({rep.meta.get('rows')} rows, {rep.meta.get('mode')} mode, {len(a)} probed layers): "
            f"dead {int(a['dead'].sum())}, dormant {int(a['dormant'].sum())} of {int(a['units'].sum())} "
            f"units; lowest representation eff_rank "
            + (
                f"{a['eff_rank'].min():.2f} ({a.loc[a['eff_rank'].idxmin(), 'layer']})"
                if a["eff_rank"].notna().any()
                else "n/a"
            )
        )
    if rep.neural_collapse:
        nc = rep.neural_collapse
        parts = [f"{k.upper()} {nc[k]:.3g}" for k in ("nc1", "nc3", "nc4") if k in nc]
        if "nc2_equiangular" in nc:
            parts.insert(
                1, f"NC2 equinorm {nc['nc2_equinorm']:.3g} / equiangular {nc['nc2_equiangular']:.3g}"
            )
        lines.append(f"neural collapse at the input of {rep.meta.get('classifier')}: " + ", ".join(parts))
    if rep.embedding_spectrum is not None and len(rep.embedding_spectrum):
        ev = rep.embedding_spectrum
        rows = rep.meta.get("rows")
        measurable = min(len(ev), rows - 1) if rows else len(ev)  # rank(cov of N rows) <= N - 1
        top = float(ev.max())
        small = int((ev[:measurable] <= 1e-6 * top).sum()) if top > 0 else measurable
        line = f"embedding covariance: {small} of {measurable} measurable eigenvalues below 1e-6 x the largest"
        if measurable < len(ev):
            line += (f"; the other {len(ev) - measurable} of {len(ev)} are 0 only because {rows} rows cannot span "
                     f"{len(ev)} dimensions (probe at least {len(ev) + 1} rows)")
        lines.append(line)
    if rep.posterior is not None:
        p = rep.posterior
        lines.append(
            f"posterior: {int(p['active'].sum())} of {len(p)} latents active; total KL {p['kl'].sum():.3g}"
        )
    return "\n".join(lines)
