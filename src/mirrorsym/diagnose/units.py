"""Reading one symmetry group's parameters as units and factors.

A group's ``params`` is a slice spec ``{name: (dim, [indices])}`` (THEORY.md, core/slices.py). The
*units* of the group are the positions along each slice's ``dim``: unit u is the concatenation, over the
spec's tensors in order, of ``t.index_select(dim, [idx_u])`` flattened (incoming row, bias entry,
outgoing column, norm parameters, …). A slice may list r·k indices for k units (a packed tensor such as
``nn.MultiheadAttention.in_proj_weight`` holding the query rows then the key rows of one head): then its
indices are read as r consecutive blocks of k, block j being the j-th *piece* of that tensor.

*Factors* (for rotation groups): every piece of a tensor with ≥ 2 dimensions is one factor, a (k, F)
matrix with the unit axis first (biases are not factors). A rotation Q of the unit space maps every factor
M ↦ Q M, so the product M_aᵀ M_b of two factors is invariant. It is the map the symmetry cannot
see into: U W for linear→linear layers, W_Qᵀ W_K per attention head (the bilinear form of the scores
q·k), W_O W_V per head, B A for LoRA.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping

import torch

from ..core.slices import Slice, parse_spec


def group_slices(spec: Mapping[str, object]) -> tuple[Slice, ...]:
    """Checked slices of a group's ``params`` spec."""
    return parse_spec(spec)


def _lookup(params: Mapping[str, torch.Tensor], s: Slice) -> torch.Tensor:
    if s.name not in params:
        known = list(params)
        raise KeyError(
            f"the symmetry group names parameter {s.name!r}, which the model does not have "
            f"(known: {known[:8]}{'...' if len(known) > 8 else ''}); was the map found on another model?"
        )
    return params[s.name]


def num_units(slices: tuple[Slice, ...], hint: int | None = None) -> int:
    """k: the number of units. ``hint`` (the group's own unit count, e.g. a head dimension for a packed
    ``in_proj_weight`` listing query and key rows) is used when it divides every slice's index count;
    otherwise k is the gcd of the counts (each count is r·k)."""
    counts = [len(s.indices) for s in slices]
    if isinstance(hint, int) and hint > 0 and all(c % hint == 0 for c in counts):
        return hint
    k = 0
    for c in counts:
        k = math.gcd(k, c)
    return k


def _pieces(t: torch.Tensor, s: Slice, k: int) -> torch.Tensor:
    """(r, k, F): the slice of ``t`` with the unit axis second and everything else flattened."""
    s.check(t.shape)
    sub = t.detach().index_select(s.dim, s.index(t.device)).movedim(s.dim, 0)
    r = len(s.indices) // k
    return sub.reshape(r, k, -1)


def unit_matrix(
    params: Mapping[str, torch.Tensor], slices: tuple[Slice, ...], k: int | None = None
) -> torch.Tensor:
    """(k, F): row u is unit u's coordinates (every piece of every tensor of the spec, concatenated).

    The dtype is the widest floating dtype among the tensors."""
    k = num_units(slices, k)
    parts = []
    for s in slices:
        p = _pieces(_lookup(params, s), s, k)
        parts.append(p.transpose(0, 1).reshape(k, -1))
    dtype = functools.reduce(torch.promote_types, (x.dtype for x in parts))
    return torch.cat([x.to(dtype) for x in parts], dim=1)


def factors(
    params: Mapping[str, torch.Tensor], slices: tuple[Slice, ...], k: int | None = None
) -> dict[str, torch.Tensor]:
    """The (k, F) weight factors of a rotation group, keyed ``"name"`` or ``"name[j]"`` for piece j.

    1-D tensors (biases) are not factors: the rank columns describe the weight product exactly as named
    in THEORY.md §7 (W_Q W_Kᵀ, W_O W_V, U W), not the affine extension."""
    k = num_units(slices, k)
    out: dict[str, torch.Tensor] = {}
    for s in slices:
        t = _lookup(params, s)
        if t.dim() < 2:
            continue
        p = _pieces(t, s, k)
        for j in range(p.shape[0]):
            out[f"{s.name}[{j}]" if p.shape[0] > 1 else s.name] = p[j]
    return out


def member_factors(members, params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Factors from a detector group's ``members`` (each with ``name``, ``dim``, ``index`` (n, m): unit u
    sits at positions ``index[u]``, and ``buffer``): one (n, F) factor per parameter member with ≥ 2
    dims *and per column j* of its index, since each column is a separate place the rotation acts on
    (a packed ``in_proj_weight`` holds a head's query rows in column 0 and its key rows in column 1).
    Exact where a flat slice spec is ambiguous."""
    out: dict[str, torch.Tensor] = {}
    for m in members:
        if getattr(m, "buffer", False):
            continue
        t = params.get(m.name)
        if t is None:
            raise KeyError(f"the symmetry group names parameter {m.name!r}, which the model does not have")
        if t.dim() < 2:
            continue
        idx = torch.as_tensor(m.index).reshape(len(m.index), -1).to(t.device)
        for j in range(idx.shape[1]):
            key, n = m.name, 0
            while key in out:
                n += 1
                key = f"{m.name}[{n}]"
            out[key] = t.detach().index_select(m.dim, idx[:, j]).movedim(m.dim, 0).reshape(idx.shape[0], -1)
    return out


def invariant_product(fs: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
    """M_aᵀ M_b for exactly two factors ``fs`` (see :func:`factors`), else None (ranks do not apply)."""
    fs = list(fs.values())
    if len(fs) != 2:
        return None
    a, b = fs
    dtype = torch.promote_types(a.dtype, b.dtype)
    return a.to(dtype).T @ b.to(dtype)


def product_spectrum(fs: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, tuple[int, int]] | None:
    """Singular values of the invariant product M_aᵀ M_b without forming it, and the product's shape.

    With QR factorisations M_aᵀ = Q_a R_a, M_bᵀ = Q_b R_b (R: k×k), M_aᵀ M_b = Q_a (R_a R_bᵀ) Q_bᵀ, so
    its non-zero singular values are those of the k×k core R_a R_bᵀ (the remaining min(F_a, F_b) − k
    are exactly zero and change none of the rank metrics). None unless there are exactly two factors.
    """
    fs = list(fs.values())
    if len(fs) != 2:
        return None
    a, b = fs
    dtype = torch.promote_types(a.dtype, b.dtype)
    a, b = a.detach().to(dtype), b.detach().to(dtype)
    shape = (a.shape[1], b.shape[1])
    if a.shape[0] > min(shape):  # more units than the product's rank can show: form it (small anyway)
        return torch.linalg.svdvals(a.T @ b), shape
    ra = torch.linalg.qr(a.T, mode="r").R
    rb = torch.linalg.qr(b.T, mode="r").R
    return torch.linalg.svdvals(ra @ rb.T), shape


def rotation_surface_distance(
    params: Mapping[str, torch.Tensor], slices: tuple[Slice, ...], k: int | None = None
) -> torch.Tensor:
    """Distance to the nearest surface of a rotation group: see :func:`min_singular_value`."""
    return min_singular_value(unit_matrix(params, slices, k))


def min_singular_value(units: torch.Tensor) -> torch.Tensor:
    """σ_min of the (k, F) unit matrix U: the mirror Q = I − 2nnᵀ has surface {nᵀU = 0}, at squared
    distance ‖nᵀU‖², whose minimum over unit n is σ_min(U)² (0 when F < k). Computed from the k×k R
    of a QR factorisation of Uᵀ (same singular values, F·k² work instead of an SVD of U)."""
    U = units.detach().double()
    k, F = U.shape
    if F < k:
        return U.new_zeros(())
    return torch.linalg.svdvals(torch.linalg.qr(U.T, mode="r").R)[-1]


def sign_surface_distance(units: torch.Tensor) -> torch.Tensor:
    """Distance to the nearest dead-unit surface (a sign flip of one unit): min_u ‖u‖."""
    return torch.linalg.vector_norm(units.double(), dim=1).min()


def swap_surface_distance(units: torch.Tensor) -> torch.Tensor:
    """Distance to the nearest identical-units surface (a swap of two units): min_{u≠v} ‖u − v‖/√2."""
    from .metrics import cluster_units

    return cluster_units(units)[1] / math.sqrt(2.0)
