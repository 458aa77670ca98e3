"""Gradient noise: when minibatch SGD collapses onto a symmetric surface (docs/theory.md#gradient-noise).

Conventions (docs/theory.md#conventions): ``loss_fn(params, batch) -> 0-dim Tensor`` is the **mean** of per-sample
losses over ``batch``, a tuple of tensors indexed along dim 0 from ``data``; weight decay is γ in
L + γ‖θ‖² (torch ``weight_decay = 2γ``); the mirror is R = I − 2OOᵀ with surface S = {Oᵀ(θ − θ′) = 0}.

Near S write z = Oᵀθ. Every per-sample gradient has zero O-component on S, so the linearised SGD step has
no additive noise:

    z_{t+1} = (I − η(Ĥ_t + 2γI)) z_t,     Ĥ_t = Oᵀ∇²L_{B_t}(θ_∥)O,

θ_∥ the projection of θ on S and B_t a uniform random subset of ``batch_size`` samples (without
replacement inside a batch, independent across steps). z_t → 0 (collapse) iff the top Lyapunov exponent
Λ = lim (1/t) log‖z_t‖ (per step, natural log) is negative.

How it is computed
------------------
* **Per-sample blocks.** Because L_B is a mean, Ĥ_B = mean_{i∈B} H_i with H_i = Oᵀ∇²ℓ_i(θ_∥)O. The n
  blocks (n×k×k) are built once, matrix-free: k Hessian-vector products per sample (forward-over-reverse,
  as :class:`~mirrorsym.core.hessian.HVP`), vmapped over samples and directions; O and Oᵀ are applied by
  :meth:`Mirror.direction` / :meth:`Mirror.coefficients`. Sampling 20 000 minibatches afterwards costs
  only index arithmetic on k×k matrices. The mean property is checked on a few samples and a loss that is
  not a mean (e.g. a sum) is refused.
* **Commuting blocks** (e.g. closed form A, whose blocks share eigenvectors; every k = 1 case): in the
  common eigenbasis each direction j is a scalar recursion and Λ = max_j E log|1 − η(h_j + 2γ)|, h_j the
  minibatch curvature. The expectation is **exact** (all C(n, b) minibatches enumerated, stderr 0) when
  C(n, b) ≤ ``max_enumerate``, otherwise a mean over ``num_samples`` minibatches with its standard error.
* **General blocks**: the Benettin/QR method. The matrices of ``num_samples`` steps are multiplied a few
  at a time and re-orthonormalised by QR; Λ_i is the time average of log|R_ii|. The standard error comes
  from batch means (20 consecutive blocks of the trajectory after a 5 % burn-in).

``critical_learning_rate`` evaluates Λ(η) on a grid with **common random numbers** (the same minibatch
sequence for every η), so Λ(η) is a smooth function of η, and finds the first crossing from escape
(Λ > 0) to collapse (Λ < 0), refined on a finer grid and interpolated linearly. Its ``second_order`` is
the paper's expansion E log|1 − ηh| ≈ −ημ − η²(μ² + s²)/2 = 0 ⇒ η ≈ 2|μ|/(μ² + s²), with, for any k,

    v  = the eigenvector of the expected block E[Ĥ] = mean_i H_i with the smallest eigenvalue,
    μ  = vᵀE[Ĥ]v + 2γ,    s² = Var_B[vᵀĤ_B v] = σ²/b · (n − b)/(n − 1),    σ² = mean_i (vᵀH_i v − vᵀE[Ĥ]v)²,

the exact variance of a without-replacement minibatch mean along the most unstable expected direction.

A point that is not on the surface is **projected, with a warning** (the linearisation lives on S).
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.func import grad, jvp, vmap

from ..core.hessian import ProjectedHessian, checked_loss
from ..core.loss import LossFn
from ..core.mirror import Mirror
from ..core.slices import Params, gather
from ..core.threads import single_threaded

DEFAULT_MAX_ENUMERATE = 100_000
COMMUTE_TOL = 1e-9  # relative size of the off-diagonal part in the common eigenbasis
ON_SURFACE_TOL = 1e-10  # relative distance to S below which params count as on the surface
BATCH_MEANS = 20  # blocks for the batch-means standard error of the QR method
BURN_IN = 0.05  # fraction of the QR trajectory discarded before averaging
TIME_CHUNK = 2048  # minibatches drawn at once
HV_BUDGET = 2**24  # numbers held per vmapped chunk of Hessian-vector products



@dataclass(frozen=True)
class LyapunovResult:
    """Top Lyapunov exponent Λ (per step, natural log) of z_{t+1} = (I − η(Ĥ_t + 2γI)) z_t.

    ``value < 0``: SGD collapses onto the surface; ``value > 0``: it escapes. ``method`` is "exact"
    (commuting blocks, every minibatch enumerated, ``stderr == 0``), "commuting" (commuting blocks,
    sampled minibatches) or "qr" (Benettin/QR on sampled minibatches). ``spectrum`` holds every exponent
    (QR) or the per-eigendirection exponents (commuting), in decreasing order.
    """

    value: float
    stderr: float
    lr: float
    batch_size: int
    gamma: float
    method: str
    num_samples: int
    spectrum: tuple[float, ...]

    @property
    def torch_weight_decay(self) -> float:
        """The coupled ``weight_decay`` argument of a torch optimizer that realises ``gamma``: 2γ."""
        return 2.0 * self.gamma


@dataclass(frozen=True)
class LyapunovCurve:
    """Λ(η) over learning rates ``lrs`` with common random numbers: ``values`` (E,), ``stderrs`` (E,),
    ``spectra`` (E, k) in decreasing order, the ``method`` used and ``num_samples`` minibatches."""

    lrs: torch.Tensor
    values: torch.Tensor
    stderrs: torch.Tensor
    spectra: torch.Tensor
    batch_size: int
    gamma: float
    method: str
    num_samples: int

    @property
    def torch_weight_decay(self) -> float:
        """The coupled ``weight_decay`` argument of a torch optimizer that realises ``gamma``: 2γ."""
        return 2.0 * self.gamma


@dataclass(frozen=True)
class SecondOrder:
    """μ = E[h + 2γ], s² = Var[h] along the most unstable expected direction, and 2|μ|/(μ² + s²)
    (NaN when μ ≥ 0: no saddle, no noise-driven threshold)."""

    mu: float
    s2: float
    eta: float


@dataclass(frozen=True)
class CriticalLRResult:
    """The learning rate above which SGD collapses onto the surface: the first root of Λ(η) = 0.

    ``value``: smallest η at which Λ crosses from > 0 (escape) to < 0 (collapse); 0.0 when μ ≥ 0 (the
    surface attracts at every small η); NaN when no crossing lies in the searched bracket. ``upper``: the
    next root, above which the off-surface dynamics turn unstable again (too large a step), NaN if none
    in the bracket. ``second_order``: 2|μ|/(μ² + s²) (docs/theory.md#gradient-noise). ``etas``/``lambdas``: the
    coarse scan.
    """

    value: float
    second_order: float
    mu: float
    s2: float
    upper: float
    batch_size: int
    gamma: float
    method: str
    etas: tuple[float, ...]
    lambdas: tuple[float, ...]

    @property
    def torch_weight_decay(self) -> float:
        """The coupled ``weight_decay`` argument of a torch optimizer that realises ``gamma``: 2γ."""
        return 2.0 * self.gamma


class MinibatchCurvature:
    """The per-sample projected Hessian blocks H_i = Oᵀ∇²ℓ_i(θ_∥)O, shape (n, k, k), float64 on the CPU.

    The HVPs that build them run on the parameters' device and dtype; the blocks are small (n·k² numbers)
    and every Lyapunov computation on them runs in float64 on the CPU (float64 is not on every device).

    Build with :func:`minibatch_curvature`; then :meth:`lyapunov_exponent`, :meth:`lyapunov_curve`,
    :meth:`second_order` and :meth:`critical_learning_rate` evaluate many (lr, batch size, γ) without new HVPs.
    """

    def __init__(self, blocks: torch.Tensor):
        if blocks.dim() != 3 or blocks.shape[1] != blocks.shape[2]:
            raise ValueError(f"blocks must have shape (n, k, k), got {tuple(blocks.shape)}")
        b = blocks.detach().to(device="cpu", dtype=torch.float64)  # small; float64 is not on every device
        self.blocks = (b + b.transpose(1, 2)) / 2
        self.basis, self.eigs = _common_eigenbasis(self.blocks)

    @property
    def n(self) -> int:
        return self.blocks.shape[0]

    @property
    def k(self) -> int:
        return self.blocks.shape[1]

    @property
    def commuting(self) -> bool:
        """Whether all blocks share one eigenbasis (then Λ is an exact scalar expectation per direction)."""
        return self.eigs is not None

    def mean_block(self) -> torch.Tensor:
        """E[Ĥ] = mean_i H_i: the full-batch block Oᵀ∇²L O."""
        return self.blocks.mean(0)

    # ------------------------------------------------------------------ second order
    def second_order(self, batch_size: int, gamma: float = 0.0) -> SecondOrder:
        """μ, s² and 2|μ|/(μ² + s²) along the most unstable expected direction (module docstring)."""
        b = _check_batch(batch_size, self.n)
        _check_gamma(gamma)
        evals, evecs = torch.linalg.eigh(self.mean_block())
        v = evecs[:, 0]
        h = torch.einsum("i,nij,j->n", v, self.blocks, v)
        sigma2 = ((h - h.mean()) ** 2).mean().item()
        s2 = sigma2 / b * (self.n - b) / max(self.n - 1, 1)
        mu = evals[0].item() + 2 * gamma
        eta = 2 * abs(mu) / (mu * mu + s2) if mu < 0 else math.nan
        return SecondOrder(mu, s2, eta)

    # ------------------------------------------------------------------ Lyapunov exponents
    def lyapunov_exponent(
        self,
        lr: float,
        batch_size: int,
        gamma: float = 0.0,
        num_samples: int = 20000,
        generator: torch.Generator | None = None,
        method: str = "auto",
        max_enumerate: int = DEFAULT_MAX_ENUMERATE,
    ) -> LyapunovResult:
        """Λ at one learning rate (see :func:`lyapunov_exponent`)."""
        lr = _check_lr(lr)
        c = self.lyapunov_curve([lr], batch_size, gamma, num_samples, generator, method, max_enumerate)
        return LyapunovResult(
            float(c.values[0]),
            float(c.stderrs[0]),
            lr,
            int(batch_size),
            float(gamma),
            c.method,
            c.num_samples,
            tuple(float(x) for x in c.spectra[0]),
        )

    def lyapunov_curve(
        self,
        lrs: Sequence[float],
        batch_size: int,
        gamma: float = 0.0,
        num_samples: int = 20000,
        generator: torch.Generator | None = None,
        method: str = "auto",
        max_enumerate: int = DEFAULT_MAX_ENUMERATE,
        indices: torch.Tensor | None = None,
    ) -> LyapunovCurve:
        """Λ(η) for every η in ``lrs`` with common random numbers (one minibatch sequence for all η).
        Pass ``indices`` (T, b) to reuse a minibatch sequence across calls."""
        b = _check_batch(batch_size, self.n)
        _check_gamma(gamma)
        etas = torch.tensor([_check_lr(x) for x in lrs], dtype=torch.float64)
        method = self._resolve_method(method, b, max_enumerate)
        if method == "exact":
            indices = _all_subsets(self.n, b)
            values, errors, spectra = _commuting_exponents(self.eigs, indices, etas, gamma, exact=True)
        else:
            if indices is None:
                indices = sample_minibatches(self.n, b, _check_samples(num_samples), generator)
            if method == "commuting":
                values, errors, spectra = _commuting_exponents(self.eigs, indices, etas, gamma, exact=False)
            else:
                with single_threaded():
                    values, errors, spectra = _qr_exponents(self.blocks, indices, etas, gamma)
        return LyapunovCurve(etas, values, errors, spectra, b, float(gamma), method, len(indices))

    def _resolve_method(self, method: str, b: int, max_enumerate: int) -> str:
        if method not in ("auto", "exact", "commuting", "qr"):
            raise ValueError(f"method must be 'auto', 'exact', 'commuting' or 'qr', got {method!r}")
        if method in ("exact", "commuting") and not self.commuting:
            raise ValueError(
                f"method={method!r} needs blocks that commute (one shared eigenbasis); these do "
                "not: use method='qr' or 'auto'"
            )
        if method == "exact" and math.comb(self.n, b) > max_enumerate:
            raise ValueError(
                f"method='exact' would enumerate C({self.n}, {b}) = {math.comb(self.n, b)} "
                f"minibatches > max_enumerate={max_enumerate}; raise max_enumerate or use 'auto'"
            )
        if method != "auto":
            return method
        if not self.commuting:
            return "qr"
        return "exact" if math.comb(self.n, b) <= max_enumerate else "commuting"

    def critical_learning_rate(
        self,
        batch_size: int,
        gamma: float = 0.0,
        num_samples: int = 20000,
        generator: torch.Generator | None = None,
        method: str = "auto",
        bracket: tuple[float, float] | None = None,
        grid: int = 48,
        refine: int = 24,
        max_enumerate: int = DEFAULT_MAX_ENUMERATE,
    ) -> CriticalLRResult:
        """The first root of Λ(η) = 0 (see :func:`critical_learning_rate`)."""
        b = _check_batch(batch_size, self.n)
        second = self.second_order(b, gamma)
        lo, hi = bracket if bracket is not None else self._default_bracket(second, gamma)
        if not 0 < lo < hi:
            raise ValueError(f"bracket must satisfy 0 < lo < hi, got ({lo}, {hi})")
        used = self._resolve_method(method, b, max_enumerate)
        idx = (
            None if used == "exact" else sample_minibatches(self.n, b, _check_samples(num_samples), generator)
        )
        etas = np.geomspace(lo, hi, grid)

        def curve(xs: Sequence[float] | np.ndarray) -> np.ndarray:
            return self.lyapunov_curve(
                list(xs), b, gamma, method=used, max_enumerate=max_enumerate, indices=idx
            ).values.numpy()

        lams = curve(etas)
        onset = (
            0.0 if second.mu >= 0 else _first_crossing(etas, lams, falling=True, curve=curve, refine=refine)
        )
        start = 0 if onset == 0.0 or math.isnan(onset) else int(np.searchsorted(etas, onset))
        upper = (
            _first_crossing(etas[start:], lams[start:], falling=False, curve=curve, refine=refine)
            if not math.isnan(onset)
            else math.nan
        )
        return CriticalLRResult(
            onset,
            second.eta,
            second.mu,
            second.s2,
            upper,
            b,
            float(gamma),
            used,
            tuple(float(x) for x in etas),
            tuple(float(x) for x in lams),
        )

    def _default_bracket(self, second: SecondOrder, gamma: float) -> tuple[float, float]:
        """Around the second-order estimate when there is one, else around 1/‖H‖."""
        if not math.isnan(second.eta):
            return second.eta / 100, second.eta * 100
        shift = 2 * gamma * torch.eye(self.k, dtype=torch.float64)
        rho = torch.linalg.matrix_norm(self.blocks + shift, ord=2).max().item()
        rho = rho if rho > 0 else 1.0
        return 1e-3 / rho, 100 / rho


# ---------------------------------------------------------------------- public functions
def minibatch_curvature(
    loss_fn: LossFn,
    params: Params,
    mirror: Mirror,
    data: Sequence[torch.Tensor],
    vectorize: bool = True,
    chunk_size: int | None = None,
) -> MinibatchCurvature:
    """The per-sample blocks H_i = Oᵀ∇²ℓ_i(θ_∥)O of ``loss_fn`` at the projection θ_∥ of ``params``.

    ``loss_fn(params, batch)`` must be a mean over the samples of ``batch`` (checked). Uses k HVPs per
    sample, vmapped over samples (``chunk_size`` samples at a time; default keeps ~2²⁴ numbers in flight);
    ``vectorize=False`` (or a loss vmap cannot trace) loops over samples with
    :class:`~mirrorsym.core.hessian.ProjectedHessian` instead.
    """
    data = _check_data(data)
    theta = _on_surface(params, mirror)
    checked_loss(loss_fn, theta, data)
    _check_mean_reduction(loss_fn, theta, data)
    if vectorize:
        try:
            return MinibatchCurvature(_vmapped_blocks(loss_fn, theta, mirror, data, chunk_size))
        except (RuntimeError, NotImplementedError) as exc:
            warnings.warn(f"vmap over samples failed ({exc}); looping over samples instead", stacklevel=2)
    return MinibatchCurvature(_looped_blocks(loss_fn, theta, mirror, data))


def lyapunov_exponent(
    loss_fn: LossFn,
    params: Params,
    mirror: Mirror,
    data: Sequence[torch.Tensor],
    lr: float,
    batch_size: int,
    gamma: float = 0.0,
    num_samples: int = 20000,
    generator: torch.Generator | None = None,
    method: str = "auto",
    max_enumerate: int = DEFAULT_MAX_ENUMERATE,
) -> LyapunovResult:
    """Top Lyapunov exponent Λ (per step) of SGD's linearised off-surface dynamics (docs/theory.md#gradient-noise).

    z_{t+1} = (I − η(Ĥ_t + 2γI)) z_t with Ĥ_t the projected Hessian of a uniform random minibatch of
    ``batch_size`` samples at the projection of ``params`` on the surface; γ = ``gamma`` in the
    L + γ‖θ‖² convention (torch ``weight_decay = 2γ``). Λ < 0: SGD at learning rate ``lr`` collapses onto
    the surface; Λ > 0: it escapes. ``method``: "auto" (exact enumeration for commuting blocks when
    C(n, b) ≤ ``max_enumerate``, else sampled; Benettin/QR for non-commuting blocks), "exact",
    "commuting" or "qr". ``num_samples`` minibatches are drawn with ``generator`` (default: seed 0).
    A point off the surface is projected onto it with a warning.
    """
    _check_lr(lr)
    _check_decay_keeps_mirror(mirror, params, gamma)
    curv = minibatch_curvature(loss_fn, params, mirror, _check_data(data, batch_size))
    return curv.lyapunov_exponent(lr, batch_size, gamma, num_samples, generator, method, max_enumerate)


def critical_learning_rate(
    loss_fn: LossFn,
    params: Params,
    mirror: Mirror,
    data: Sequence[torch.Tensor],
    batch_size: int,
    gamma: float = 0.0,
    num_samples: int = 20000,
    generator: torch.Generator | None = None,
    method: str = "auto",
    bracket: tuple[float, float] | None = None,
    max_enumerate: int = DEFAULT_MAX_ENUMERATE,
    grid: int = 48,
) -> CriticalLRResult:
    """The learning rate η_c above which minibatch SGD collapses onto the surface: the first root of
    Λ(η) = 0, and the second-order approximation 2|μ|/(μ² + s²) (docs/theory.md#gradient-noise; definitions for k > 1 in
    the module docstring).

    Λ(η) is evaluated with common random numbers on ``grid`` geometric points over ``bracket`` (default:
    1/100 to 100 times the second-order estimate), the first sign change from + to − is refined on a finer
    grid and interpolated. A collapse window narrower than one grid step (a factor 1.21 by default) can be
    missed: raise ``grid`` or narrow ``bracket``. On a small data set Λ(η) is jagged: every minibatch B
    puts a log-singularity (a sharp dip) at η = 1/(h_B + 2γ), and near Λ ≈ 0 such dips can open
    windows of a few percent. Arguments as in :func:`lyapunov_exponent`.
    """
    _check_decay_keeps_mirror(mirror, params, gamma)
    curv = minibatch_curvature(loss_fn, params, mirror, _check_data(data, batch_size))
    return curv.critical_learning_rate(
        batch_size,
        gamma,
        num_samples,
        generator,
        method,
        bracket,
        grid=grid,
        max_enumerate=max_enumerate,
    )


def sample_minibatches(
    n: int, batch_size: int, num: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """(num, batch_size) indices: each row a uniform random subset of range(n) (no repeats inside a row),
    rows independent. Deterministic for a given ``generator`` (default: seed 0)."""
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    rows = []
    for start in range(0, num, TIME_CHUNK):
        u = torch.rand(min(TIME_CHUNK, num - start), n, generator=gen, dtype=torch.float64)
        rows.append(u.topk(batch_size, dim=1).indices)
    return torch.cat(rows)


# ---------------------------------------------------------------------- exponents
def _commuting_exponents(
    eigs: torch.Tensor, subsets: torch.Tensor, etas: torch.Tensor, gamma: float, exact: bool
):
    """Λ_j = mean over minibatches of log|1 − η(h_j + 2γ)| for every direction j; Λ = max_j."""
    h = eigs[subsets].mean(1) + 2 * gamma  # (T, k)
    values, errors, spectra = [], [], []
    for eta in etas:
        logs = _safe_log(1 - eta * h)
        per_dir = logs.mean(0)
        top = int(per_dir.argmax())
        spread = 0.0 if exact else (logs[:, top].std() / math.sqrt(len(logs))).item()
        values.append(per_dir[top].item())
        errors.append(spread)
        spectra.append(per_dir.sort(descending=True).values)
    return (
        torch.tensor(values, dtype=torch.float64),
        torch.tensor(errors, dtype=torch.float64),
        torch.stack(spectra),
    )


def _qr_exponents(blocks: torch.Tensor, indices: torch.Tensor, etas: torch.Tensor, gamma: float):
    """Benettin/QR: Q_{g+1} R_g = (M_{t+m−1} ⋯ M_t) Q_g, Λ_i = Σ log|R_ii| / steps."""
    E, k, T = len(etas), blocks.shape[1], len(indices)
    eye = torch.eye(k, dtype=torch.float64)
    rho = torch.linalg.matrix_norm(blocks, ord=2).max().item() + 2 * gamma
    growth = math.log1p(etas.max().item() * rho)
    m = int(max(1, min(8, 200 // max(growth, 1e-12))))  # ≤ e^200 growth per product: no overflow
    Q = eye.expand(E, k, k).clone()
    logs = []  # one (E, k) row per product of m steps
    for start in range(0, T - T % m, TIME_CHUNK - TIME_CHUNK % m):
        idx = indices[start : min(start + TIME_CHUNK - TIME_CHUNK % m, T - T % m)]
        H = blocks[idx].mean(1) + 2 * gamma * eye  # (c, k, k)
        M = eye - etas[:, None, None, None] * H[None]  # (E, c, k, k)
        M = M.reshape(E, -1, m, k, k)
        P = M[:, :, 0]
        for j in range(1, m):
            P = M[:, :, j] @ P
        for g in range(P.shape[1]):
            Q, R = torch.linalg.qr(P[:, g] @ Q)
            logs.append(_safe_log(torch.diagonal(R, dim1=-2, dim2=-1)))
    L = torch.stack(logs, 1) / m  # (E, G, k) per-step exponents of each product
    L = L[:, int(BURN_IN * L.shape[1]) :]
    spectra = L.mean(1).sort(dim=-1, descending=True).values
    top = L[..., 0]  # R's first diagonal follows the leading direction: the top exponent
    nb = min(BATCH_MEANS, top.shape[1])
    usable = top[:, : top.shape[1] - top.shape[1] % nb].reshape(E, nb, -1).mean(-1)
    stderr = usable.std(dim=1) / math.sqrt(nb) if nb > 1 else torch.full((E,), math.nan, dtype=torch.float64)
    return top.mean(1), stderr, spectra


def _safe_log(x: torch.Tensor) -> torch.Tensor:
    return torch.log(x.abs().clamp_min(torch.finfo(x.dtype).tiny))


def _first_crossing(
    etas: np.ndarray, lams: np.ndarray, falling: bool, curve: Callable[[np.ndarray], np.ndarray], refine: int
) -> float:
    """First η where Λ changes sign (+ to − if ``falling``), refined on ``refine`` points, interpolated."""
    sign = lams > 0 if falling else lams < 0
    hits = np.nonzero(sign[:-1] & ~sign[1:])[0]
    if len(hits) == 0:
        return math.nan
    a, b = etas[hits[0]], etas[hits[0] + 1]
    fine = np.linspace(a, b, refine)
    vals = curve(fine)
    s = vals > 0 if falling else vals < 0
    j = np.nonzero(s[:-1] & ~s[1:])[0]
    i = int(j[0]) if len(j) else 0
    x0, x1, y0, y1 = fine[i], fine[i + 1], vals[i], vals[i + 1]
    return float(x0 - y0 * (x1 - x0) / (y1 - y0)) if y1 != y0 else float(x0)


def _common_eigenbasis(blocks: torch.Tensor):
    """(V, eigs) with Vᵀ H_i V = diag(eigs[i]) for every i if the blocks commute, else (None, None)."""
    n, k = blocks.shape[0], blocks.shape[1]
    gen = torch.Generator().manual_seed(12345)
    c = torch.randn(n, generator=gen, dtype=torch.float64)
    _, V = torch.linalg.eigh(torch.einsum("n,nij->ij", c, blocks))
    D = V.T @ blocks @ V
    diag = torch.diagonal(D, dim1=-2, dim2=-1)
    off = (D - torch.diag_embed(diag)).abs().max().item() if k > 1 else 0.0
    scale = blocks.abs().max().item()
    if off <= COMMUTE_TOL * max(scale, torch.finfo(torch.float64).tiny):
        return V, diag
    return None, None


def _all_subsets(n: int, b: int) -> torch.Tensor:
    return torch.tensor(list(itertools.combinations(range(n), b)), dtype=torch.long).reshape(-1, b)


# ---------------------------------------------------------------------- per-sample blocks
def _sample(data: Sequence[torch.Tensor], i: int) -> tuple[torch.Tensor, ...]:
    return tuple(t[i : i + 1] for t in data)


def _vmapped_blocks(
    loss_fn: LossFn,
    theta: dict[str, torch.Tensor],
    mirror: Mirror,
    data: tuple[torch.Tensor, ...],
    chunk_size: int | None,
) -> torch.Tensor:
    ref = next(iter(theta.values()))
    k = mirror.dim(theta)
    eye = torch.eye(k, dtype=ref.dtype, device=ref.device)
    dirs = [mirror.direction(eye[j], theta) for j in range(k)]
    V = {name: torch.stack([d[name] for d in dirs]) for name in theta}  # (k, *shape): the columns of O

    def sample_loss(p, sample):
        return loss_fn(p, tuple(t.unsqueeze(0) for t in sample)).reshape(())

    def hvp(sample, v):
        return jvp(lambda p: grad(sample_loss)(p, sample), (theta,), (v,))[1]

    d = sum(t.numel() for t in theta.values())
    chunk = chunk_size or max(1, HV_BUDGET // max(1, k * d))
    hv = vmap(vmap(hvp, in_dims=(None, 0)), in_dims=(0, None), chunk_size=chunk)(data, V)  # (n, k, *shape)
    return mirror.coefficients({n: t.detach() for n, t in hv.items()}, batch_dims=2, tangent=True)


def _looped_blocks(
    loss_fn: LossFn, theta: dict[str, torch.Tensor], mirror: Mirror, data: tuple[torch.Tensor, ...]
) -> torch.Tensor:
    n = data[0].shape[0]
    return torch.stack([ProjectedHessian(loss_fn, theta, mirror, _sample(data, i)).to_dense() for i in range(n)])


# ---------------------------------------------------------------------- checks
def _check_data(data, batch_size: int | None = None) -> tuple:
    if isinstance(data, torch.Tensor):
        data = (data,)
    if not isinstance(data, (tuple, list)) or not data or not all(isinstance(t, torch.Tensor) for t in data):
        raise TypeError("data must be a non-empty tuple of tensors indexed along dim 0, e.g. (x, y)")
    n = data[0].shape[0] if data[0].dim() else 0
    if any(t.dim() == 0 or t.shape[0] != n for t in data):
        raise ValueError(
            f"every tensor in data needs the same number of samples along dim 0, got shapes "
            f"{[tuple(t.shape) for t in data]}"
        )
    if batch_size is not None:
        _check_batch(batch_size, n)
    return tuple(data)


def _check_batch(batch_size, n: int) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)):
        raise TypeError(f"batch_size must be an int, got {batch_size!r}")
    if not 1 <= batch_size <= n:
        raise ValueError(
            f"batch_size={batch_size} must lie in [1, n] with n = {n} samples in data; minibatches "
            "are drawn without replacement"
        )
    return int(batch_size)


def _check_lr(lr) -> float:
    lr = float(lr)
    if not lr > 0 or not math.isfinite(lr):
        raise ValueError(f"lr must be a finite number > 0, got {lr}")
    return lr


def _check_gamma(gamma) -> None:
    if not float(gamma) >= 0:
        raise ValueError(f"gamma (γ in L + γ‖θ‖²; torch weight_decay = 2γ) must be >= 0, got {gamma}")


def _check_samples(num: int) -> int:
    if int(num) < 2 * BATCH_MEANS:
        raise ValueError(
            f"num_samples={num} is too small for a standard error; use at least {2 * BATCH_MEANS}"
        )
    return int(num)


def _check_decay_keeps_mirror(mirror: Mirror, params: Params, gamma: float) -> None:
    """γ‖θ‖² is R-invariant only for a mirror through the origin (Oᵀθ′ = 0, docs/theory.md#mirror-symmetry)."""
    _check_gamma(gamma)
    if gamma == 0:
        return
    zeros = {k: torch.zeros_like(v) for k, v in params.items()}
    shift = mirror.coefficients(zeros).norm().item()
    if shift > 0:
        raise ValueError(
            f"gamma={gamma} > 0 breaks {mirror!r}: its surface misses the origin "
            f"(‖Oᵀθ′‖ = {shift:.3g}), so the decay gradient 2γθ has an O-component and the off-surface "
            "dynamics are not z ↦ (I − η(Ĥ + 2γI))z; use gamma=0 or a mirror through 0"
        )


def _on_surface(params: Params, mirror: Mirror) -> dict:
    p = {k: v.detach() for k, v in params.items()}
    dist = mirror.distance(p).item()
    scale = gather(p, mirror.slices).norm().item()
    if dist > ON_SURFACE_TOL * (1.0 + scale):
        warnings.warn(
            f"params are at distance {dist:.3g} from the surface of {mirror!r}; the noise theory "
            "linearises on the surface, so it is evaluated at their projection mirror.project(params)",
            stacklevel=3,
        )
        p = mirror.project(p)
    return p


def _check_mean_reduction(loss_fn, theta: dict, data: tuple, probe: int = 8) -> None:
    """Refuse a loss that is not the mean of its per-sample losses (Ĥ_B = mean_i H_i needs it)."""
    m = min(probe, data[0].shape[0])
    with torch.no_grad():
        whole = loss_fn(theta, tuple(t[:m] for t in data)).reshape(())
        parts = torch.stack([loss_fn(theta, _sample(data, i)).reshape(()) for i in range(m)])
    err = (whole - parts.mean()).abs().item()
    if err > 1e-6 * max(parts.abs().max().item(), 1e-30):
        raise ValueError(
            f"loss_fn(params, batch) must be the mean of its per-sample losses (the noise theory "
            f"writes the minibatch Hessian as a mean of per-sample Hessians); on the first {m} samples "
            f"it is {whole.item():.6g} but the per-sample mean is {parts.mean().item():.6g}. Use "
            "reduction='mean'"
        )
