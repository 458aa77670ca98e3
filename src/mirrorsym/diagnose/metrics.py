"""Collapse metrics as pure tensor functions (docs/theory.md#metrics). No model, no hooks, no training here.

Conventions
-----------
* A matrix ``A`` has singular values σ₁ ≥ σ₂ ≥ … ≥ 0. Every rank metric below is a function of σ only
  and is computed from one SVD (:func:`rank_metrics` gives them all at once).
* A *unit matrix* ``U`` has one row per unit (neuron, channel, head dimension): the concatenation of
  the unit's incoming weights, bias and outgoing weights, i.e. the coordinates a permutation swaps.
* An *activation matrix* ``acts`` has shape ``(N, units)``: one row per probe input. A unit is
  *active* on an input when ``|a| > atol`` (default 0: any non-zero value).
* Results are tensors on the input's device (0-dim for scalars, ``int64`` for counts); nothing
  calls ``.item()``. Statistics are computed in float64 unless said otherwise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

#: Threshold of the "approximate rank" and "srank" (docs/theory.md#metrics: 99 % of the mass).
MASS = 0.99
#: Dormant: active on fewer than this fraction of the probe inputs (docs/theory.md#metrics).
DORMANT_FRACTION = 0.01
#: dead unit: ‖u‖ ≤ DEAD_TOL · max_v ‖v‖ over the layer's units (an absolute floor at the layer's scale)
DEAD_TOL = 1e-3
#: duplicated living units: ‖u − v‖ ≤ DUPLICATE_TOL · max(‖u‖, ‖v‖) (a relative distance)
DUPLICATE_TOL = 0.05
#: Posterior collapse: a latent is active when Cov_x E[z_d | x] exceeds this (Burda et al. 2016).
ACTIVE_LATENT_THRESHOLD = 0.01


# ---------------------------------------------------------------------------------------------- ranks
def _as_matrix(A: torch.Tensor, name: str = "A") -> torch.Tensor:
    A = torch.as_tensor(A)
    if A.dim() != 2:
        raise ValueError(f"{name} must be a 2-D matrix, got shape {tuple(A.shape)}; reshape it first")
    if not A.dtype.is_floating_point:
        A = A.to(torch.float64)
    return A


def singular_values(A: torch.Tensor) -> torch.Tensor:
    """σ of the 2-D matrix ``A``, descending, in ``A``'s dtype (float64 for integer input)."""
    return torch.linalg.svdvals(_as_matrix(A))


def _entropy_rank(sv: torch.Tensor) -> torch.Tensor:
    total = sv.sum()
    p = sv / torch.where(total > 0, total, torch.ones_like(total))
    plogp = torch.where(p > 0, p * torch.log(torch.where(p > 0, p, torch.ones_like(p))), torch.zeros_like(p))
    return torch.where(total > 0, torch.exp(-plogp.sum()), torch.zeros_like(total))


def _mass_rank(values: torch.Tensor, mass: float) -> torch.Tensor:
    """Smallest k with Σ_{i≤k} v_i ≥ mass·Σ v_i (values descending, ≥ 0); 0 for an all-zero vector."""
    csum = torch.cumsum(values, 0)
    total = csum[-1] if values.numel() else values.new_zeros(())
    reached = csum >= mass * total
    k = torch.argmax(reached.to(torch.int8)) + 1 if values.numel() else torch.zeros((), dtype=torch.long)
    return torch.where(total > 0, k, torch.zeros_like(k)).to(torch.int64)


def effective_rank(A: torch.Tensor) -> torch.Tensor:
    """Roy–Vetterli effective rank (= RankMe): exp(H(p)), p = σ/‖σ‖₁, H(p) = −Σ p log p (0 log 0 = 0).

    Between 1 (rank one) and min(m, n) (flat spectrum); 0 for the zero matrix.
    """
    return _entropy_rank(singular_values(A))


def approx_rank(A: torch.Tensor, mass: float = MASS) -> torch.Tensor:
    """Approximate rank: smallest k with Σ_{i≤k} σ_i² ≥ mass·Σ σ_i² (docs/theory.md#metrics, mass 0.99)."""
    return _mass_rank(singular_values(A) ** 2, mass)


def srank(A: torch.Tensor, mass: float = MASS) -> torch.Tensor:
    """ "srank" (Kumar et al.): smallest k with Σ_{i≤k} σ_i ≥ mass·Σ σ_i (docs/theory.md#metrics, mass 0.99)."""
    return _mass_rank(singular_values(A), mass)


def stable_rank(A: torch.Tensor) -> torch.Tensor:
    """Classical stable rank ‖A‖²_F / ‖A‖²₂ = Σσ_i² / σ₁² (0 for the zero matrix)."""
    return _stable_rank(singular_values(A))


def _stable_rank(sv: torch.Tensor) -> torch.Tensor:
    top = sv.max() if sv.numel() else sv.new_zeros(())
    return torch.where(
        top > 0, (sv**2).sum() / torch.where(top > 0, top, torch.ones_like(top)) ** 2, torch.zeros_like(top)
    )


def default_rank_tol(sv: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """numpy ``matrix_rank``'s tolerance: σ_max · max(m, n) · eps(dtype)."""
    top = sv.max() if sv.numel() else sv.new_zeros(())
    return top * max(shape) * torch.finfo(sv.dtype).eps


def numerical_rank(A: torch.Tensor, tol: float | None = None) -> torch.Tensor:
    """#{σ_i > tol}. Default ``tol`` = σ_max · max(m, n) · eps(dtype), as ``numpy.linalg.matrix_rank``."""
    A = _as_matrix(A)
    sv = singular_values(A)
    t = default_rank_tol(sv, (A.shape[0], A.shape[1])) if tol is None else torch.as_tensor(tol, dtype=sv.dtype)
    return (sv > t).sum().to(torch.int64)


def rank_metrics(
    A: torch.Tensor | None = None,
    *,
    sv: torch.Tensor | None = None,
    shape: tuple[int, int] | None = None,
    tol: float | None = None,
) -> dict[str, torch.Tensor]:
    """All five rank metrics of ``A`` from one SVD (or from given singular values ``sv`` of a matrix of
    ``shape``): keys ``eff_rank, approx_rank, srank, stable_rank, num_rank`` (docs/theory.md#metrics names)."""
    if sv is None:
        if A is None:
            raise ValueError("rank_metrics needs a matrix A or its singular values sv (with shape=)")
        A = _as_matrix(A)
        sv, shape = singular_values(A), (A.shape[0], A.shape[1])
    elif shape is None:
        raise ValueError("rank_metrics(sv=...) needs the matrix shape too (for the numerical-rank tolerance)")
    sv = torch.sort(sv.clamp_min(0), descending=True).values
    t = default_rank_tol(sv, shape) if tol is None else torch.as_tensor(tol, dtype=sv.dtype)
    return {
        "eff_rank": _entropy_rank(sv),
        "approx_rank": _mass_rank(sv**2, MASS),
        "srank": _mass_rank(sv, MASS),
        "stable_rank": _stable_rank(sv),
        "num_rank": (sv > t).sum().to(torch.int64),
    }


# ----------------------------------------------------------------------------- units from parameters
def default_unit_rtol(dtype: torch.dtype) -> float:
    """√eps(dtype): units agree to about half the significant digits (3.5e-4 float32, 1.5e-8 float64).

    The default of the single-tolerance primitives below (equal up to round-off). ``ms.diagnose`` counts
    with :func:`count_units` instead: a dead floor ``DEAD_TOL`` and a separate ``DUPLICATE_TOL``."""
    return math.sqrt(torch.finfo(dtype).eps)


def dead_units(units: torch.Tensor, rtol: float | None = None) -> torch.Tensor:
    """Boolean mask of units whose parameters are zero within a relative tolerance.

    Unit i (row ``units[i]``: incoming, bias, outgoing) is dead when ‖u_i‖ ≤ rtol · max_j ‖u_j‖; when
    every unit is exactly zero all are dead. Default ``rtol`` = :func:`default_unit_rtol`.
    """
    units = _as_matrix(units, "units")
    rtol = default_unit_rtol(units.dtype) if rtol is None else rtol
    norms = torch.linalg.vector_norm(units.double(), dim=1)
    scale = norms.max() if norms.numel() else norms.new_zeros(())
    return norms <= rtol * scale


def unit_clusters(units: torch.Tensor, rtol: float | None = None) -> np.ndarray:
    """Cluster labels (numpy int array) of identical units: single linkage = connected components of the
    graph with an edge i–j when ‖u_i − u_j‖ ≤ rtol · max(‖u_i‖, ‖u_j‖).

    Exactly-zero units are therefore one cluster (they are identical). Default ``rtol`` =
    :func:`default_unit_rtol` of the dtype. Distances are screened with a float64 Gram matrix and the
    candidate pairs (loose relative distance ≤ max(1e-3, 10·rtol)) are re-measured exactly as
    ‖u_i − u_j‖, so round-off in the Gram trick cannot merge or split units. Labels are numbered in
    order of first appearance.
    """
    return cluster_units(units, rtol)[0]


def cluster_units(
    units: torch.Tensor, rtol: float | None = None, chunk: int = 1 << 22
) -> tuple[np.ndarray, torch.Tensor]:
    """(:func:`unit_clusters` labels, min_{i≠j} ‖u_i − u_j‖) from one Gram matrix. The minimum is
    re-measured exactly on the 64 pairs the Gram matrix ranks closest (NaN for fewer than 2 units)."""
    units = _as_matrix(units, "units")
    rtol = default_unit_rtol(units.dtype) if rtol is None else rtol
    n = units.shape[0]
    U = units.detach().double()
    if n < 2:
        return np.zeros(n, dtype=np.int64), U.new_tensor(float("nan"))
    sq = (U * U).sum(1)
    d2 = (sq[:, None] + sq[None, :] - 2 * U @ U.T).clamp_min(0)
    loose = max(1e-3, 10 * rtol)
    upper = torch.ones(n, n, dtype=torch.bool, device=U.device).triu(1)
    cand = (upper & (d2 <= (loose**2) * torch.maximum(sq[:, None], sq[None, :]) + 1e-300)).nonzero()
    keep = []
    step = max(1, chunk // max(1, U.shape[1]))
    for s in range(0, cand.shape[0], step):
        i, j = cand[s : s + step, 0], cand[s : s + step, 1]
        dist = torch.linalg.vector_norm(U[i] - U[j], dim=1)
        keep.append(cand[s : s + step][dist <= rtol * torch.sqrt(torch.maximum(sq[i], sq[j]))])
    d2.masked_fill_(~upper, float("inf"))
    flat = torch.topk(d2.reshape(-1), k=min(64, n * (n - 1) // 2), largest=False).indices
    closest = torch.linalg.vector_norm(U[flat // n] - U[flat % n], dim=1).min()
    edges = torch.cat(keep).cpu().numpy() if keep else np.zeros((0, 2), dtype=np.int64)
    graph = coo_matrix((np.ones(len(edges)), (edges[:, 0], edges[:, 1])), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    _, first, inverse = np.unique(labels, return_index=True, return_inverse=True)
    return np.argsort(np.argsort(first))[inverse].astype(np.int64), closest


def distinct_units(units: torch.Tensor, rtol: float | None = None) -> int:
    """Number of clusters of identical units ("independent units"), see :func:`unit_clusters`."""
    labels = unit_clusters(units, rtol)
    return int(labels.max()) + 1 if labels.size else 0


@dataclass(frozen=True)
class UnitCounts:
    """Dead and duplicated units of one layer, from its (canonical) unit vectors.

    ``dead``: units with ‖u‖ ≤ dead_tol · max_v ‖v‖ (one absolute floor for the whole layer, so a unit
    at 1e-14 is dead whatever the others do). ``labels``: −1 for dead units, else the cluster of living
    units (single linkage, ‖u − v‖ ≤ duplicate_tol · max(‖u‖, ‖v‖)). ``distinct``: the number of living
    clusters, so dead units are never distinct and ``units − dead − distinct`` living units are
    duplicates of another. ``closest``: min ‖u − v‖ over all pairs (NaN below two units)."""

    labels: np.ndarray
    dead: int
    distinct: int
    closest: float

    @property
    def duplicated(self) -> int:
        return len(self.labels) - self.dead - self.distinct


def count_units(units: torch.Tensor, dead_tol: float = DEAD_TOL, duplicate_tol: float = DUPLICATE_TOL) -> UnitCounts:
    """Dead, distinct and duplicated units of a (n, F) unit matrix (see :class:`UnitCounts`)."""
    units = _as_matrix(units, "units").detach().double()
    dead = dead_units(units, dead_tol)
    labels = np.full(units.shape[0], -1, dtype=np.int64)
    alive = (~dead).nonzero().flatten()
    if alive.numel():
        labels[alive.cpu().numpy()] = cluster_units(units[alive], duplicate_tol)[0]
    closest = cluster_units(units, duplicate_tol)[1] if units.shape[0] >= 2 else float("nan")
    return UnitCounts(labels, int(dead.sum()), int(labels.max()) + 1 if alive.numel() else 0, float(closest))


# ---------------------------------------------------------------------------- units from activations
def unit_activity(acts: torch.Tensor, atol: float = 0.0) -> torch.Tensor:
    """Fraction of probe inputs (rows of ``acts`` (N, units)) on which each unit is active (|a| > atol)."""
    acts = _as_matrix(acts, "acts")
    if acts.shape[0] == 0:
        raise ValueError("acts has no rows: activity needs at least one probe input")
    return (acts.abs() > atol).double().mean(0)


def dead_activations(acts: torch.Tensor, atol: float = 0.0) -> torch.Tensor:
    """Mask of units with zero activation (|a| ≤ atol) on every probe input (docs/theory.md#metrics)."""
    return unit_activity(acts, atol) == 0


def dormant_activations(
    acts: torch.Tensor, fraction: float = DORMANT_FRACTION, atol: float = 0.0
) -> torch.Tensor:
    """Mask of units active on fewer than ``fraction`` (1 %) of the probe inputs; includes dead units."""
    return unit_activity(acts, atol) < fraction


def redo_scores(acts: torch.Tensor) -> torch.Tensor:
    """ReDO dormancy score (Sokar et al. 2023): s_i = E_x|h_i(x)| / ((1/H) Σ_k E_x|h_k(x)|)."""
    acts = _as_matrix(acts, "acts")
    mean_abs = acts.double().abs().mean(0)
    layer = mean_abs.mean()
    return mean_abs / torch.where(layer > 0, layer, torch.ones_like(layer))


def tau_dormant(acts: torch.Tensor, tau: float = 0.0) -> torch.Tensor:
    """ReDO τ-dormant mask: s_i ≤ τ (τ = 0: exactly inactive on average; ReDO uses 0.025 or 0.1)."""
    return redo_scores(acts) <= tau


def effective_rank_from_gram(gram: torch.Tensor) -> torch.Tensor:
    """Effective rank of a matrix Z known only through its Gram matrix G = ZᵀZ (σ_i² = eig_i(G))."""
    ev = torch.linalg.eigvalsh(_as_matrix(gram, "gram").double()).clamp_min(0)
    return _entropy_rank(torch.sort(ev.sqrt(), descending=True).values)


def representation_eff_rank(features: torch.Tensor) -> torch.Tensor:
    """Effective rank (RankMe) of the uncentred representation matrix (N, D): exp(H(σ/‖σ‖₁))."""
    return effective_rank(_as_matrix(features, "features").double())


# ------------------------------------------------------------------------------------ neural collapse
def class_means(
    features: torch.Tensor, labels: torch.Tensor, num_classes: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(means (C, D), counts (C,), global mean (D,)) in float64; global mean over all samples."""
    H = _as_matrix(features, "features").double()
    y = torch.as_tensor(labels, device=H.device).long().reshape(-1)
    if y.shape[0] != H.shape[0]:
        raise ValueError(f"features has {H.shape[0]} rows but labels has {y.shape[0]} entries")
    C = int(y.max()) + 1 if num_classes is None else num_classes
    counts = torch.bincount(y, minlength=C).double()
    if (counts == 0).any():
        missing = torch.nonzero(counts == 0).reshape(-1).tolist()
        raise ValueError(f"classes {missing[:10]} have no samples; neural-collapse metrics need every class")
    sums = torch.zeros(C, H.shape[1], dtype=H.dtype, device=H.device).index_add_(0, y, H)
    return sums / counts[:, None], counts, H.mean(0)


def nc1(features: torch.Tensor, labels: torch.Tensor, num_classes: int | None = None) -> torch.Tensor:
    """NC1 = Tr(Σ_W Σ_B⁺)/C (Papyan et al. 2020): Σ_W = mean_i (h_i − μ_{y_i})(h_i − μ_{y_i})ᵀ,
    Σ_B = mean_c (μ_c − μ_G)(μ_c − μ_G)ᵀ, μ_G the global mean, ⁺ the Moore–Penrose pseudo-inverse."""
    H = _as_matrix(features, "features").double()
    y = torch.as_tensor(labels, device=H.device).long().reshape(-1)
    mu, _, mu_g = class_means(H, y, num_classes)
    C = mu.shape[0]
    within = H - mu[y]
    sigma_w = within.T @ within / H.shape[0]
    centred = mu - mu_g
    sigma_b = centred.T @ centred / C
    return torch.trace(sigma_w @ torch.linalg.pinv(sigma_b, hermitian=True)) / C


def nc2(
    features: torch.Tensor, labels: torch.Tensor, num_classes: int | None = None
) -> dict[str, torch.Tensor]:
    """NC2 on the centred class means m_c = μ_c − μ_G.

    ``equinorm``: coefficient of variation std(‖m_c‖)/mean(‖m_c‖) (population std);
    ``equiangular``: mean over c ≠ c′ of |cos(m_c, m_c′) + 1/(C−1)| (0 for a simplex ETF);
    ``max_angle_dev``: the largest of those deviations.
    """
    mu, _, mu_g = class_means(features, labels, num_classes)
    m = mu - mu_g
    return _nc2_of(m)


def _nc2_of(m: torch.Tensor) -> dict[str, torch.Tensor]:
    C = m.shape[0]
    if C < 2:
        raise ValueError("NC2 needs at least two classes")
    norms = torch.linalg.vector_norm(m, dim=1)
    cos = (m @ m.T) / (norms[:, None] * norms[None, :])
    off = ~torch.eye(C, dtype=torch.bool, device=m.device)
    dev = (cos[off] + 1.0 / (C - 1)).abs()
    return {
        "equinorm": norms.std(unbiased=False) / norms.mean(),
        "equiangular": dev.mean(),
        "max_angle_dev": dev.max(),
    }


def nc3(
    features: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, num_classes: int | None = None
) -> torch.Tensor:
    """NC3 self-duality ‖W/‖W‖_F − Mᵀ/‖M‖_F‖²_F; W (C, D) the classifier weight, M (D, C) the centred
    class means as columns."""
    mu, _, mu_g = class_means(features, labels, num_classes)
    W = _as_matrix(weight, "weight").double().to(mu.device)
    Mt = mu - mu_g
    if W.shape != Mt.shape:
        raise ValueError(
            f"classifier weight has shape {tuple(W.shape)}, expected (classes, features) = {tuple(Mt.shape)}"
        )
    return ((W / torch.linalg.norm(W) - Mt / torch.linalg.norm(Mt)) ** 2).sum()


def nc4(
    features: torch.Tensor,
    labels: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    num_classes: int | None = None,
) -> torch.Tensor:
    """NC4: fraction of samples where argmax_c (W h + b)_c ≠ argmin_c ‖h − μ_c‖ (nearest class mean).
    Class means are those of ``labels``; the comparison itself does not use the labels."""
    H = _as_matrix(features, "features").double()
    mu, _, _ = class_means(H, labels, num_classes)
    W = _as_matrix(weight, "weight").double().to(H.device)
    logits = H @ W.T + (0 if bias is None else torch.as_tensor(bias).double().to(H.device))
    ncc = torch.cdist(H, mu, compute_mode="donot_use_mm_for_euclid_dist").argmin(1)
    return (logits.argmax(1) != ncc).double().mean()


def neural_collapse(
    features: torch.Tensor,
    labels: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    num_classes: int | None = None,
) -> dict[str, torch.Tensor]:
    """NC1–NC4 in one dict (NC3, NC4 only with a classifier ``weight``)."""
    out = {"nc1": nc1(features, labels, num_classes)}
    out.update({f"nc2_{k}": v for k, v in nc2(features, labels, num_classes).items()})
    if weight is not None:
        out["nc3"] = nc3(features, labels, weight, num_classes)
        out["nc4"] = nc4(features, labels, weight, bias, num_classes)
    return out


# ------------------------------------------------------------------ dimensional and posterior collapse
def embedding_spectrum(embeddings: torch.Tensor) -> torch.Tensor:
    """Eigenvalues (descending, ≥ 0) of the embedding covariance (1/(N−1)) Σ (z − z̄)(z − z̄)ᵀ.

    Dimensional collapse shows as many eigenvalues ≈ 0 (Jing et al. 2022)."""
    Z = _as_matrix(embeddings, "embeddings").double()
    if Z.shape[0] < 2:
        raise ValueError("the embedding covariance needs at least two samples")
    Zc = Z - Z.mean(0)
    sv = torch.linalg.svdvals(Zc)
    ev = sv**2 / (Z.shape[0] - 1)
    if ev.shape[0] < Z.shape[1]:  # fewer samples than dimensions: the rest of the spectrum is exactly 0
        ev = torch.cat([ev, ev.new_zeros(Z.shape[1] - ev.shape[0])])
    return ev


def gaussian_kl_per_latent(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Per-latent KL(q(z_d|x) ‖ N(0, 1)) averaged over x: E_x ½(μ_d² + σ_d² − log σ_d² − 1), shape (D,)."""
    mu = _as_matrix(mu, "mu").double()
    logvar = _as_matrix(logvar, "logvar").double()
    if mu.shape != logvar.shape:
        raise ValueError(f"mu {tuple(mu.shape)} and logvar {tuple(logvar.shape)} must have the same shape")
    return (0.5 * (mu**2 + logvar.exp() - logvar - 1)).mean(0)


def active_latents(mu: torch.Tensor, threshold: float = ACTIVE_LATENT_THRESHOLD) -> torch.Tensor:
    """Mask of active latents: A_d = Cov_x(E[z_d | x]) = Var_x μ_d(x) > threshold (0.01; Burda et al.);
    the variance is the population one (mean over x)."""
    mu = _as_matrix(mu, "mu").double()
    if mu.shape[0] < 2:
        raise ValueError("active units need at least two inputs (a variance over x)")
    return mu.var(0, unbiased=False) > threshold
