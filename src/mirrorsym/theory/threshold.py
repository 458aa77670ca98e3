"""Theorem 1 quantities (docs/theory.md#theorem-1), matrix-free.

Convention: L_γ(θ) = L(θ) + γ‖θ‖²; ``loss_fn(params, batch)`` is L without decay, evaluated on ``batch``
(the one loss convention, :mod:`mirrorsym.core.loss`; None for a loss that closes over its data).
PyTorch's coupled ``weight_decay=λ`` adds λθ to the gradient, so λ = 2γ (:func:`torch_weight_decay`).

Unless ``project=False``, every quantity is evaluated at the orthogonal projection of ``params`` onto
the mirror's surface S, where the theorem speaks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..core.finite import NonFiniteError, check_finite
from ..core.hessian import ProjectedHessian, checked_loss, gradient, lanczos_min_eig
from ..core.loss import Batch, LossFn
from ..core.mirror import Mirror
from ..core.slices import Params

DENSE_MAX_K = 64


def torch_weight_decay(gamma: float) -> float:
    """The ``weight_decay`` argument of a coupled torch optimizer (SGD, Adam) that realises γ‖θ‖²: 2γ.

    Decoupled decay (AdamW) optimises a different objective; the threshold does not transfer to it.
    """
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    return 2.0 * gamma


@dataclass(frozen=True)
class CriticalWeightDecay:
    """λ_min of Oᵀ∇²L O, what it took to get it, and the threshold it implies in both conventions:
    ``gamma`` = γ_c = max(0, −λ_min/2) for L + γ‖θ‖², ``torch_weight_decay`` = 2γ_c for a coupled torch
    optimizer. ``float(result)`` is ``gamma``."""

    lambda_min: float
    hvps: int
    method: str  # "dense" | "lanczos"

    @property
    def gamma(self) -> float:
        return max(0.0, -self.lambda_min / 2.0)

    @property
    def torch_weight_decay(self) -> float:
        return torch_weight_decay(self.gamma)

    def __float__(self) -> float:
        return self.gamma


def _at(params: Params, mirror: Mirror, project: bool) -> dict[str, torch.Tensor]:
    p = {k: v.detach() for k, v in params.items()}
    return mirror.project(p) if project else p


def projected_hessian(loss_fn: LossFn, params: Params, mirror: Mirror, batch: Batch = None, *,
                      project: bool = True) -> ProjectedHessian:
    """The linear operator Oᵀ∇²L(θ)O (k×k) built from HVPs; ``.as_linear_operator()`` for scipy."""
    return ProjectedHessian(loss_fn, _at(params, mirror, project), mirror, batch)


def projected_curvature(loss_fn: LossFn, params: Params, mirror: Mirror, batch: Batch = None, *,
                        project: bool = True, max_hvps: int = 100, tol: float = 1e-10,
                        generator: torch.Generator | None = None) -> CriticalWeightDecay:
    """λ_O = λ_min(Oᵀ∇²L O): dense for k ≤ 64 (k HVPs), Lanczos otherwise (≤ ``max_hvps`` HVPs)."""
    check_finite(params, "parameter")
    op = projected_hessian(loss_fn, params, mirror, batch, project=project)
    if op.k <= DENSE_MAX_K:
        H = op.to_dense().double()
        lam = torch.linalg.eigvalsh(H)[0].item() if bool(torch.isfinite(H).all()) else math.nan
        method = "dense"
    else:
        lam, _ = lanczos_min_eig(op.matvec, op.k, op.dtype, op.device, max_iter=max_hvps, tol=tol,
                                 generator=generator)
        method = "lanczos"
    if not math.isfinite(lam):
        raise NonFiniteError(
            f"the projected Hessian of {mirror!r} is not finite at these parameters (the loss or its "
            "curvature is NaN/Inf there), so γ_c is undefined; check the loss value and the data"
        )
    return CriticalWeightDecay(lam, op.hvp.calls, method)



def critical_weight_decay(loss_fn: LossFn, params: Params, mirror: Mirror, batch: Batch = None, *,
                          project: bool = True, max_hvps: int = 100) -> CriticalWeightDecay:
    """γ_c = max(0, −λ_min(Oᵀ∇²L O)/2) in the L + γ‖θ‖² convention (docs/theory.md, Theorem 1).

    For γ > γ_c a minimum of L_γ restricted to S is a strict local minimum; for γ < γ_c it is a saddle
    that gradient descent escapes along O. The result carries ``.gamma`` (γ_c) and
    ``.torch_weight_decay`` (2γ_c, what a coupled torch optimizer takes).
    """
    return projected_curvature(loss_fn, params, mirror, batch, project=project, max_hvps=max_hvps)


def stationarity_residual(loss_fn: LossFn, params: Params, mirror: Mirror, batch: Batch = None, *,
                          project: bool = True) -> float:
    """‖Oᵀ∇L(θ)‖: zero up to round-off on the surface of a true mirror symmetry (docs/theory.md#stationarity)."""
    p = _at(params, mirror, project)
    checked_loss(loss_fn, p, batch)
    return mirror.coefficients(gradient(loss_fn, p, batch), tangent=True).norm().item()


def hessian_cross_norm(loss_fn: LossFn, params: Params, mirror: Mirror, batch: Batch = None, *,
                       project: bool = True, iters: int = 30, generator: torch.Generator | None = None) -> float:
    """Power-iteration estimate of ‖P∇²L(I − P)‖₂ with P = OOᵀ: zero on the surface of a true mirror
    symmetry (no Hessian cross terms, docs/theory.md#hessian-blocks). Costs 2 HVPs per iteration."""
    op = projected_hessian(loss_fn, params, mirror, batch, project=project)
    hvp, p = op.hvp, op.params
    gen = generator or torch.Generator().manual_seed(0)

    def off(v: Params) -> dict[str, torch.Tensor]:  # (I − P) v
        pv = mirror.project_tangent(v)
        return {k: v[k] - pv[k] for k in v}

    x = off({k: torch.randn(t.shape, generator=gen, dtype=torch.float64).to(t) for k, t in p.items()})
    def norm(v: Params) -> float:
        sq = [(t * t).sum() for t in v.values()]
        return torch.sqrt(sum(sq[1:], sq[0])).item()

    sigma, scale = 0.0, None
    for _ in range(iters):
        xn = norm(x)
        if xn == 0:
            return 0.0
        x = {k: t / xn for k, t in x.items()}
        hx = hvp(x)
        scale = scale or norm(hx)  # ‖H‖-sized: below round-off of it the cross block is zero
        y = mirror.project_tangent(hx)  # A x = P H (I−P) x
        sigma = norm(y)
        if sigma <= 1e-12 * scale:
            return sigma  # renormalising round-off would only amplify noise
        x = off(hvp(y))  # Aᵀ A x
    return sigma
